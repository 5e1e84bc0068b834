"""Writes a params tree in orbax's checkpoint layout directly: numpy and the OS only, no orbax.

The layout is the one orbax's ``PyTreeCheckpointHandler`` writes for numpy leaves with
``use_ocdbt=False`` and no compression: per leaf a zarr v2 array (``<a.b.c>/.zarray`` and one
chunk file of C-order bytes), plus ``_METADATA`` (the tree) and ``_CHECKPOINT_METADATA``. Every
orbax version restores it (tests restore it with orbax itself). The chunk files are created at
full size up front and filled at any offset (:meth:`OrbaxLayoutWriter.write`), so a converter
streams tensors into place without holding a leaf, without jax, and at the speed of the disk.
No fsync (as ``cp``): the directory appears only once complete (``atomic_dir``), which guards
against a failed or killed process, not against a power cut (the source can be converted again).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

#: What orbax's PyTreeCheckpointHandler records as the handler of the item.
_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
_DICT_KEY = 2  # orbax's KeyType.DICT


def zarr_dtype(dtype: np.dtype) -> str:
    """The zarr v2 dtype string TensorStore writes: ``<f4``, ``<f2``, or ``bfloat16``."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return "bfloat16"
    return dtype.newbyteorder("<").str


class OrbaxLayoutWriter:
    """Creates ``params_dir`` with a full-size chunk file for every leaf of ``leaves``
    (``{"h/attn/c_attn/w": (shape, dtype)}``, ``/``-joined dict paths); fill them with
    :meth:`write` (from any thread), then :meth:`close` writes the metadata that makes the
    directory a checkpoint. Used as a context manager, an error leaves no metadata behind
    (the caller removes the directory, e.g. :func:`gpt2jax.store.atomic.atomic_dir`)."""

    def __init__(self, params_dir: str, leaves: Mapping[str, tuple[tuple[int, ...], Any]]):
        self.params_dir = os.path.abspath(params_dir)
        self.leaves = {path: (tuple(shape), np.dtype(dt)) for path, (shape, dt) in leaves.items()}
        self.fds: dict[str, int] = {}
        self._start = time.time_ns()
        os.makedirs(self.params_dir)
        try:
            for path, (shape, dtype) in self.leaves.items():
                self.fds[path] = self._create_leaf(path, shape, dtype)
        except BaseException:
            self._close_files()
            raise

    def _create_leaf(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
        folder = os.path.join(self.params_dir, path.replace("/", "."))
        os.mkdir(folder)
        zarray = {
            "chunks": list(shape),
            "compressor": None,
            "dimension_separator": ".",
            "dtype": zarr_dtype(dtype),
            "fill_value": None,
            "filters": None,
            "order": "C",
            "shape": list(shape),
            "zarr_format": 2,
        }
        with open(os.path.join(folder, ".zarray"), "w") as f:
            json.dump(zarray, f, separators=(",", ":"))
        chunk = ".".join("0" * max(len(shape), 1))  # the one chunk's key: 0.0.0 (0 for 0-d)
        fd = os.open(os.path.join(folder, chunk), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if nbytes and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)  # a full disk fails here, before any copying
            else:
                os.ftruncate(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write(self, path: str, offset: int, data: Any) -> None:
        """Writes the bytes of ``data`` (a contiguous buffer) at ``offset`` of leaf ``path``."""
        view = memoryview(data).cast("B")
        fd = self.fds[path]
        while view.nbytes:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> None:
        """Closes the chunk files and writes ``_METADATA`` and ``_CHECKPOINT_METADATA``."""
        self._close_files()
        tree = {}
        for path in self.leaves:
            keys = path.split("/")
            tree[str(tuple(keys))] = {
                "key_metadata": [{"key": k, "key_type": _DICT_KEY} for k in keys],
                "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
            }
        metadata = {
            "tree_metadata": tree,
            "use_ocdbt": False,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        }
        with open(os.path.join(self.params_dir, "_METADATA"), "w") as f:
            json.dump(metadata, f)
        checkpoint = {
            "item_handlers": _HANDLER,
            "metrics": {},
            "performance_metrics": {},
            "init_timestamp_nsecs": self._start,
            "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": {},
        }
        with open(os.path.join(self.params_dir, "_CHECKPOINT_METADATA"), "w") as f:
            json.dump(checkpoint, f)

    def _close_files(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> OrbaxLayoutWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_files()


def write_params(params_dir: str, flat: Mapping[str, np.ndarray]) -> None:
    """Writes numpy leaves (``{"wte": array, "h/ln_1/g": array, ...}``) as an orbax checkpoint."""
    arrays = {path: np.ascontiguousarray(a) for path, a in flat.items()}
    with OrbaxLayoutWriter(params_dir, {p: (a.shape, a.dtype) for p, a in arrays.items()}) as w:
        for path, a in arrays.items():
            w.write(path, 0, a.reshape(-1).view(np.uint8))
