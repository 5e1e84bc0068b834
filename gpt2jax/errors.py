"""User-facing errors.

Every problem a user can cause (a wrong path, a corrupt checkpoint, bad data) is raised as a
:class:`Gpt2JaxError` subclass whose message is one line naming the file and what is wrong. The
CLI prints that line and exits non-zero, without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations


class Gpt2JaxError(Exception):
    """Base class of the errors the CLI reports as one clear line."""


class CheckpointError(Gpt2JaxError):
    """A checkpoint or model directory is missing, corrupt, truncated or inconsistent."""


class ConfigError(Gpt2JaxError):
    """A configuration (``hparams.json``, ``config.json``, flags) is invalid."""


class DataError(Gpt2JaxError):
    """A training or evaluation dataset is missing, empty or unusable."""
