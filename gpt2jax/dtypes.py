"""The one table of floating-point dtypes by name (flags, ``run.json``, model files), and which
names each use accepts. ``DTYPES`` is built on first use: bfloat16 comes from ``ml_dtypes``,
a slow import that a float32 ``convert`` does without."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

#: What stored weights may be (model directories, exports).
STORAGE = ("float32", "bfloat16", "float16")
#: What training computes and keeps its state in.
TRAINING = ("float32", "bfloat16")
#: What training's matmuls may run in: float16 trains with loss scaling
#: (:mod:`gpt2jax.loss_scale`); ``auto`` is the device's choice (:mod:`gpt2jax.device`).
COMPUTE = ("auto", *TRAINING, "float16")


@functools.cache
def _table() -> dict[str, np.dtype]:
    import ml_dtypes

    return {
        "float32": np.dtype(np.float32),
        "bfloat16": np.dtype(ml_dtypes.bfloat16),
        "float16": np.dtype(np.float16),
    }


def __getattr__(name: str) -> Any:
    if name == "DTYPES":  # dict[str, np.dtype]: "float32", "bfloat16", "float16"
        return _table()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype(name: str) -> np.dtype:
    """The dtype called ``name`` (a key of :data:`DTYPES`)."""
    return np.dtype(np.float32) if name == "float32" else _table()[name]
