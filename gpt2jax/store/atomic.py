"""Write an output directory atomically: build it under a temporary name, rename it into place.

A failed or interrupted export then never leaves a half-written model where a good one is
expected, and ``--force`` replaces an old directory only once the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from gpt2jax.errors import Gpt2JaxError


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yields an empty temporary directory beside ``path``; on success it becomes ``path``.

    An existing non-empty ``path`` is refused unless ``overwrite``; then it is replaced only
    after the new directory is complete. On any error the temporary directory is removed.
    """
    path = os.path.abspath(os.fspath(path))
    exists = os.path.lexists(path)
    if exists and not overwrite and (not os.path.isdir(path) or os.listdir(path)):
        raise Gpt2JaxError(f"{path}: already exists and is not empty (use --force to replace it)")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    except OSError as e:
        raise Gpt2JaxError(f"{parent}: cannot write here ({e.strerror})") from None
    try:
        yield tmp
        if exists:
            # Move the old one aside first: the rename below is then the only moment of change.
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Gpt2JaxError(f"{path}: writing failed ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
