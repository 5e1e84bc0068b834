"""Size names as model paths: ``gpt2jax.load("355M")`` and ``gpt2jax finetune 355M ...``.

One of OpenAI's sizes (:data:`gpt2jax.config.PRESETS`) names the download cache,
``<models_root>/<size>`` (:func:`gpt2jax.store.download.models_root`), downloaded first if it
is not complete there; see :func:`resolve_model`.
"""

from __future__ import annotations

import os
import sys

from gpt2jax.config import PRESETS
from gpt2jax.errors import CheckpointError
from gpt2jax.store.download import download, is_complete, models_root

CONVERTED_SUFFIX = "-gpt2jax"


def converted_dir(directory: str | os.PathLike) -> str:
    """Where ``gpt2jax download --convert`` puts the gpt2jax model of an OpenAI directory."""
    return os.fspath(directory).rstrip("/\\") + CONVERTED_SUFFIX


def resolve_model(name_or_path: str | os.PathLike, *, progress: bool = True) -> str:
    """The model directory that ``name_or_path`` names, downloading a size if needed.

    An existing path wins over a size name (a local folder called ``124M`` is used as it is).
    A complete cached size costs no network request. Anything else raises
    :class:`~gpt2jax.errors.CheckpointError`.

    The OpenAI directory is read directly (``gpt2jax.load`` converts it in memory);
    ``gpt2jax download --convert`` also writes a gpt2jax model directory ``<size>-gpt2jax``
    beside it (:func:`converted_dir`), which is then preferred because it loads without
    conversion.
    """
    path = os.fspath(name_or_path)
    if os.path.exists(os.path.expanduser(path)):
        return os.path.expanduser(path)
    if path not in PRESETS:
        raise CheckpointError(
            f"{path}: no such file or directory (nor a model size: {', '.join(PRESETS)})"
        )
    directory = os.path.join(models_root(), path)
    if os.path.isdir(converted_dir(directory)):
        return converted_dir(directory)
    if not is_complete(directory):
        gigabytes = PRESETS[path].num_params() * 4 / 1e9  # float32 weights dominate
        print(
            f"gpt2jax: downloading {path} (about {gigabytes:.1f} GB) into {directory}",
            file=sys.stderr,
        )
        download([path], progress=progress)
    return directory


def convert_downloaded(directory: str | os.PathLike, *, progress: bool = True) -> str:
    """Writes the gpt2jax model directory of the OpenAI checkpoint ``directory`` once.

    Returns :func:`converted_dir` of it; an existing one is kept (the write is atomic, so a
    directory that exists is whole).
    """
    out = converted_dir(directory)
    if not os.path.isdir(out):
        from gpt2jax.convert.openai_tf import convert_openai_dir

        convert_openai_dir(directory, out, show_progress=progress)
    return out
