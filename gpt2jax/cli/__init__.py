"""The ``gpt2jax`` command: ``main`` (entry point, model-file commands), ``train`` (finetune, eval),
``generate`` and ``plan``; each command parses flags and calls the library."""
