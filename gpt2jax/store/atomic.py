"""Write an output directory atomically: build it under a temporary name, rename it into place.

A failed or interrupted export then never leaves a half-written model where a good one is
expected, and ``--force`` replaces an old directory only once the new one is complete. The
output is checked before anything is written (:func:`gpt2jax.files.check_destination`): it never
is, contains or lies inside an input, and ``--force`` replaces only a model directory. The
temporary directory is named after its process (``.<name>.tmp-<pid>@<host>-...``), so that one
a killed process left is removed by the next write to the same place; SIGTERM removes it too.
The result gets the modes the user's umask gives.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from gpt2jax.errors import Gpt2JaxError, Terminated
from gpt2jax.files import apply_umask, check_destination, remove_stale_temps, temp_dir


@contextmanager
def atomic_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    reads: Iterable[str | os.PathLike | None] = (),
    utf8: bool = False,
) -> Iterator[str]:
    """Yields an empty temporary directory beside ``path``; on success it becomes ``path``.

    An existing non-empty ``path`` is refused unless ``overwrite`` (and then it must be a model
    directory); it is replaced only after the new directory is complete. ``inputs`` are the
    paths the output is made from, ``reads`` folders a few files are read from
    (:func:`gpt2jax.files.check_not_overlapping`); ``utf8`` refuses a path orbax cannot use.
    On any error (or SIGTERM) the temporary directory is removed.
    """
    path = os.path.abspath(os.fspath(path))
    check_destination(path, overwrite=overwrite, inputs=inputs, reads=reads, utf8=utf8)
    exists = os.path.lexists(path)
    parent, name = os.path.dirname(path), os.path.basename(path)
    try:
        os.makedirs(parent, exist_ok=True)
        for prefix in (f".{name}.tmp-", f".{name}.old-"):  # what killed writers left here
            remove_stale_temps(parent, prefix)
        tmp = temp_dir(parent, f".{name}.tmp-")
    except OSError as e:
        raise Gpt2JaxError(f"{parent}: cannot write here ({e.strerror})") from None
    try:
        with _sigterm_interrupts():
            yield tmp
        apply_umask(tmp)
        if exists:
            # Move the old one aside first: the rename below is then the only moment of change.
            old = temp_dir(parent, f".{name}.old-")
            os.replace(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise Gpt2JaxError(f"{path}: writing failed ({e.strerror or e})") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: str) -> None:
    """Removes the temporary directory, again while an abandoned writer (an interrupted orbax
    save, still running on its threads) adds files to it; what it adds after the last try is
    removed by the next write to the same place (the directory names its process)."""
    for _ in range(10):
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.lexists(tmp):
            return
        time.sleep(0.02)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM raises :class:`Terminated` instead of
    killing the process, so that the temporary directory is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
