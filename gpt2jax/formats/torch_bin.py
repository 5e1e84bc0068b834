"""PyTorch ``pytorch_model.bin`` state dicts, read only through ``torch.load(weights_only=True)``.

A ``.bin`` file is a pickle, and unpickling runs whatever code the file names. PyTorch's
``weights_only`` unpickler (``torch/_weights_only_unpickler.py``) accepts only tensors,
storages and plain containers and refuses every other global, so that is the only way this
project ever opens one; nothing here calls :mod:`pickle`. torch is an optional extra
(``pip install 'gpt2jax[torch]'``) and imported only when a ``.bin`` is read or written.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np

from gpt2jax.errors import CheckpointError, Gpt2JaxError


def require_torch(purpose: str) -> Any:
    """``import torch``, or a clear error saying what needed it and how to install it."""
    try:
        import torch
    except ImportError:
        raise Gpt2JaxError(
            f"{purpose} needs PyTorch, which is not installed (pip install 'gpt2jax[torch]')"
        ) from None
    return torch


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The ``{name: torch.Tensor}`` in a ``.bin`` file, loaded with ``weights_only=True``.

    Files in PyTorch's zip format are memory-mapped, so tensors are read when first used.
    """
    path = os.fspath(path)
    torch = require_torch(f"reading {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        state = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused or unreadable as a plain tensor state dict ({first})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is not a named tensor")
    return state


def to_numpy(tensor: Any) -> np.ndarray:
    """A CPU tensor as numpy without a float32 detour (bfloat16 stays bfloat16)."""
    torch = require_torch("converting a tensor")
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def from_numpy(array: np.ndarray) -> Any:
    """A numpy array as a tensor sharing its memory where possible (bfloat16 included)."""
    torch = require_torch("writing a .bin file")
    array = np.ascontiguousarray(array)
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def save_state_dict(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """``torch.save`` of a plain ``{name: tensor}`` dict, as ``transformers`` writes ``.bin``.

    Needs the whole dict at once (``torch.save`` pickles it in one go); the tensors share
    memory with the arrays, so a float32 export costs no extra copy.
    """
    torch = require_torch("exporting --format bin")
    state = {name: from_numpy(value) for name, value in tensors}
    torch.save(state, os.fspath(path))
