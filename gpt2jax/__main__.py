"""``python -m gpt2jax``: the same as the ``gpt2jax`` command."""

import sys

from gpt2jax.cli.main import main

sys.exit(main())
