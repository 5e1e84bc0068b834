"""The one table of floating-point dtypes by name (flags, ``run.json``, model files), and which
names each use accepts."""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
#: What stored weights may be (model directories, exports).
STORAGE = ("float32", "bfloat16", "float16")
#: What training computes and keeps its state in.
TRAINING = ("float32", "bfloat16")
#: What training's matmuls may run in: float16 trains with loss scaling
#: (:mod:`gpt2jax.loss_scale`); ``auto`` is the device's choice (:mod:`gpt2jax.device`).
COMPUTE = ("auto", *TRAINING, "float16")


def dtype(name: str) -> np.dtype:
    """The dtype called ``name`` (a key of :data:`DTYPES`)."""
    return DTYPES[name]
