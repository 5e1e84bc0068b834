"""User-facing errors.

Every problem a user can cause (a wrong path, a corrupt checkpoint, bad data) is raised as a
:class:`Gpt2JaxError` subclass whose message is one line naming the file and what is wrong. The
CLI prints that line and exits non-zero, without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import os
import re


class Gpt2JaxError(Exception):
    """Base class of the errors the CLI reports as one clear line."""


class CheckpointError(Gpt2JaxError):
    """A checkpoint or model directory is missing, corrupt, truncated or inconsistent."""


class ConfigError(Gpt2JaxError):
    """A configuration (``hparams.json``, ``config.json``, flags) is invalid."""


class DataError(Gpt2JaxError):
    """A training or evaluation dataset is missing, empty or unusable."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception where a command must clean up before it ends (exit
    status 143, as if killed by the signal)."""


def chain_text(e: BaseException) -> str:
    """The messages of ``e`` and the exceptions it was raised from or during."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def reason(e: BaseException) -> str:
    """What went wrong, in a few words on one line: the OS error behind an orbax / TensorStore
    failure (which reports it as ``[os_error_code='28']``), else TensorStore's own status line
    (``OUT_OF_RANGE: Error reading "wte/0.0" in OCDBT database at ...``, without the spec dump
    that follows it), else the exception's first line."""
    text = chain_text(e)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        return os.strerror(int(code.group(1)))
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    status = re.findall(r"^([A-Z_]{4,}: .*)$", text, re.MULTILINE)
    if status:
        line = re.sub(r" \[(tensorstore_spec|source locations)=.*$", "", status[-1])
        return line[:300]
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__
