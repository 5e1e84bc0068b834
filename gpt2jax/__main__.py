"""``python -m gpt2jax``: the same as the ``gpt2jax`` command."""

import sys

from gpt2jax.cli import main

sys.exit(main())
