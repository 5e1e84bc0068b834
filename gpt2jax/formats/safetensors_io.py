"""Read and write the safetensors format in pure numpy (no torch, no ``safetensors`` package).

The format, as huggingface/safetensors specifies it (``README.md`` "Format", ``src/tensor.rs``)::

    8 bytes   N, the header's length, unsigned little-endian
    N bytes   UTF-8 JSON {"__metadata__": {str: str} (optional), name: {"dtype": "F32",
              "shape": [2, 3], "data_offsets": [begin, end]}, ...}, padded with spaces
    rest      the tensors' bytes, C order, little-endian; offsets count from here

Reading (:class:`SafetensorsFile`) checks all of it before handing out an array; writing
(:func:`write_file`) streams the tensors one at a time, so a model is never held twice.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes  # a dependency of jax: numpy's bfloat16 and float8 types
import numpy as np

from gpt2jax.errors import CheckpointError
from gpt2jax.files import apply_umask, open_regular

#: safetensors dtype name -> numpy dtype (little-endian), as ``safetensors.numpy`` maps them.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

#: safetensors' own limit (tensor.rs MAX_HEADER_SIZE): a bigger header is not a real file.
MAX_HEADER_SIZE = 100_000_000
METADATA_KEY = "__metadata__"

#: ``(name, dtype, shape)``: one header entry, in file order.
Spec = tuple[str, Any, Sequence[int]]


def dtype_name(dtype: Any) -> str:
    """The safetensors name (``F32``, ``BF16``...) of a numpy dtype."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _NAMES[dt]
    except KeyError:
        raise CheckpointError(f"dtype {dt} cannot be stored in safetensors") from None


class SafetensorsFile:
    """A validated, memory-mapped safetensors file.

    ``get(name)`` returns a read-only numpy view into the map (no copy; pages are read on
    first touch). The map stays open while any such view is alive.

    Opening checks everything a hostile or truncated file could get wrong before handing out a
    single array: the header length against the file size, the JSON, every dtype, shape and
    offset pair, that the tensors tile the data section exactly (contiguous, in bounds, no
    overlap, no trailing bytes) and that each span is ``prod(shape) * itemsize`` bytes. Any
    problem is a :class:`~gpt2jax.errors.CheckpointError` naming the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            with open_regular(self.path, CheckpointError) as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise CheckpointError(f"{self.path}: {size} bytes is too short for safetensors")
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER_SIZE or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: header length {n} is impossible for a file of {size} bytes"
                    )
                header = f.read(n)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        self._data_start = 8 + n
        self.metadata, self._entries = _parse_header(header, size - 8 - n, self.path)

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a read-only view of the mapped file."""
        dtype, shape, begin, _ = self._entry(name)
        count = math.prod(shape)
        offset = self._data_start + begin
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._entries:
            yield name, self.get(name)

    def _entry(self, name: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None


def _parse_header(
    raw: bytes, data_size: int, path: str
) -> tuple[dict[str, str] | None, dict[str, tuple[np.dtype, tuple[int, ...], int, int]]]:
    """Validates the JSON header against a data section of ``data_size`` bytes."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise CheckpointError(f"{path}: header names {dup!r} twice")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:  # ValueError: also ints past 4300 digits
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop(METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")

    entries = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: needs exactly dtype, shape and data_offsets")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(f"{where}: unknown dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of sizes")
        if math.prod(d for d in shape if d) * dtype.itemsize >= 1 << 63:
            # numpy cannot make such an array even when a zero dimension leaves it empty
            raise CheckpointError(f"{where}: shape {shape} is too large")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(
                f"{where}: {info['dtype']}{shape} needs {nbytes} bytes, "
                f"data_offsets span {end - begin}"
            )
        entries[name] = (dtype, tuple(shape), begin, end)

    # The tensors must tile the data section exactly: this rules out overlaps, gaps, spans past
    # the end of the file and trailing bytes in one pass.
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != position:
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at byte {begin} of the data, expected {position} "
                "(tensors must be contiguous and must not overlap)"
            )
        position = end
    if position != data_size:
        raise CheckpointError(
            f"{path}: tensors cover {position} bytes but the data section has {data_size} "
            f"({'truncated file' if position > data_size else 'trailing bytes'})"
        )
    return metadata, entries


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of ``path`` as read-only memory-mapped arrays, in file order."""
    return dict(SafetensorsFile(path).items())


def encode_header(specs: Sequence[Spec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length plus the space-padded JSON header for tensors laid out in order."""
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in specs:
        if not isinstance(name, str) or name == METADATA_KEY or name in header:
            raise CheckpointError(f"invalid or duplicate tensor name {name!r}")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": dtype_name(dtype),
            "shape": [int(d) for d in shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad like the reference writer, so data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw


def write_file(
    path: str | os.PathLike,
    specs: Sequence[Spec],
    tensors: Iterable[tuple[str, Any]],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Writes a safetensors file, streaming ``tensors`` one at a time; returns its size.

    ``specs`` lists ``(name, dtype, shape)`` in file order; ``tensors`` (any iterable, typically
    a generator) must yield exactly those names in that order, each array with that dtype and
    shape. The file appears at ``path`` only once complete.

    The header is written up front (names, dtypes, shapes: all known before any weight is
    computed), then each tensor as it arrives, so a model is never held twice; the file is
    written under a temporary name and renamed into place when complete.
    """
    path = os.fspath(path)
    header = encode_header(specs, metadata)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path) or "."
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            pending = iter(specs)
            for name, value in tensors:
                want = next(pending, None)
                arr = np.asarray(value)
                if want is None or want[0] != name:
                    expected = "no more tensors" if want is None else repr(want[0])
                    raise CheckpointError(f"{path}: got tensor {name!r}, expected {expected}")
                if arr.dtype != np.dtype(want[1]) or arr.shape != tuple(want[2]):
                    raise CheckpointError(
                        f"{path}: tensor {name!r} is {arr.dtype}{arr.shape}, "
                        f"the header says {np.dtype(want[1])}{tuple(want[2])}"
                    )
                _write_array(f, arr)
            left = next(pending, None)
            if left is not None:
                raise CheckpointError(f"{path}: tensor {left[0]!r} was never written")
            size = f.tell()
        apply_umask(tmp)  # mkstemp made it 0600: a served model must be readable by others
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return size


def save_file(
    tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> int:
    """Writes a mapping of arrays (the ``safetensors.numpy.save_file`` argument order)."""
    arrays = {name: np.asarray(value) for name, value in tensors.items()}
    specs = [(name, a.dtype, a.shape) for name, a in arrays.items()]
    return write_file(path, specs, arrays.items(), metadata)


def _write_array(f: Any, arr: np.ndarray) -> None:
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    # A C-contiguous array is written straight from its memory; others are copied once.
    f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
