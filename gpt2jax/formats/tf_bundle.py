"""Read and write TensorFlow "tensor bundle" checkpoints (TF1 ``Saver`` V2, TF2) without TF.

A bundle with prefix ``P`` is ``P.index``, a LevelDB-style table mapping each tensor name to its
dtype, shape, shard, offset, size and CRC-32C, plus data shards ``P.data-00000-of-0000N``. Both
directions follow TensorFlow's own ``tensor_bundle.cc`` and ``core/lib/io`` table code and were
checked against them; the protobufs are decoded by hand (no ``protobuf`` dependency), and every
problem with the files is a one-line :class:`~gpt2jax.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import math
import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from gpt2jax.errors import CheckpointError
from gpt2jax.files import kind_of

from .crc32c import crc32c, mask, unmask

__all__ = ["BundleReader", "write_bundle", "data_filename"]

#: tensorflow/core/lib/io/format.h: kTableMagicNumber, Footer::kEncodedLength, kBlockTrailerSize.
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_TRAILER_SIZE = 5
#: table_options.h defaults, as the bundle writer uses them (with compression off).
_BLOCK_SIZE = 262144
_RESTART_INTERVAL = 16
#: tensor_bundle.cc: kTensorBundleVersion; readers refuse bundles whose min_consumer is newer.
_BUNDLE_VERSION = 1
#: An index is a few KB per hundred tensors; past this the file is not an index we should load.
_MAX_INDEX_BYTES = 256 << 20
#: TensorShape::MaxDimensions().
_MAX_DIMS = 254

# tensorflow/core/framework/types.proto DataType -> little-endian numpy dtype.
_DT_STRING, _DT_BFLOAT16, _DT_VARIANT = 7, 14, 21
_NUMPY_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    8: np.dtype("<c8"),  # DT_COMPLEX64
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    18: np.dtype("<c16"),  # DT_COMPLEX128
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}


def _bfloat16() -> np.dtype | None:
    """``ml_dtypes.bfloat16`` (jax depends on ml_dtypes), imported only when a bundle has one:
    the import takes a second, which a float32 conversion does not pay."""
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return np.dtype(ml_dtypes.bfloat16)


_DT_NAMES = {
    0: "invalid",
    7: "string",
    11: "qint8",
    12: "quint8",
    13: "qint32",
    14: "bfloat16",
    15: "qint16",
    16: "quint16",
    20: "resource",
    21: "variant",
}


def data_filename(prefix: str | os.PathLike, shard: int, num_shards: int) -> str:
    """``<prefix>.data-<shard>-of-<num_shards>`` with 5-digit fields (tensor_bundle.cc)."""
    return f"{os.fspath(prefix)}.data-{shard:05d}-of-{num_shards:05d}"


# ---- wire formats: varints, protobuf fields --------------------------------------------------


class _Malformed(Exception):
    """A structural problem in the index; the reader turns it into a CheckpointError."""


class _Unsupported(Exception):
    """A valid feature of the format this reader does not implement."""


def _varint(buf: bytes, pos: int, limit: int, max_bytes: int = 10) -> tuple[int, int]:
    """Decode a base-128 varint at ``buf[pos:limit]``; returns ``(value, new_pos)``."""
    value = shift = 0
    for i in range(max_bytes):
        if pos + i >= limit:
            raise _Malformed("truncated varint")
        b = buf[pos + i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos + i + 1
        shift += 7
    raise _Malformed("varint too long")


def _put_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # protobuf encodes negative int32/int64 as 10-byte two's complement
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(field_number, wire_type, value)`` of a serialized protobuf message.

    ``value`` is an int for varint/fixed fields and bytes for length-delimited ones.
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Malformed("protobuf field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if pos + n > end:
                raise _Malformed("truncated protobuf field")
            value, pos = int.from_bytes(buf[pos : pos + n], "little"), pos + n
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Malformed("truncated protobuf field")
            value, pos = buf[pos : pos + n], pos + n
        else:  # 3/4 are deprecated groups, 6/7 do not exist; TF never writes them
            raise _Malformed(f"protobuf wire type {wire}")
        yield field, wire, value


def _want(wire: int, expected: int, what: str) -> None:
    if wire != expected:
        raise _Malformed(f"{what} has protobuf wire type {wire}, expected {expected}")


def _tag(field: int, wire: int) -> bytes:
    return _put_varint(field << 3 | wire)


# ---- BundleHeaderProto / BundleEntryProto ----------------------------------------------------


@dataclass(frozen=True)
class _Header:
    num_shards: int
    big_endian: bool
    min_consumer: int
    bad_consumers: tuple[int, ...]


@dataclass(frozen=True)
class _Entry:
    dtype: int  # DataType enum
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    sliced: bool  # has "slices": a partitioned variable's full-tensor entry


def _parse_header(buf: bytes) -> _Header:
    num_shards, big, min_consumer, bad = 0, False, 0, []
    for field, wire, value in _proto_fields(buf):
        if field == 1:
            _want(wire, 0, "num_shards")
            num_shards = _signed64(value)
        elif field == 2:
            _want(wire, 0, "endianness")
            big = value == 1
        elif field == 3:  # VersionDef: producer = 1, min_consumer = 2, bad_consumers = 3
            _want(wire, 2, "version")
            for vf, vw, vv in _proto_fields(value):
                if vf == 2 and vw == 0:
                    min_consumer = _signed64(vv)
                elif vf == 3 and vw == 0:
                    bad.append(_signed64(vv))
                elif vf == 3 and vw == 2:  # packed repeated int32
                    pos = 0
                    while pos < len(vv):
                        v, pos = _varint(vv, pos, len(vv))
                        bad.append(_signed64(v))
    return _Header(num_shards, big, min_consumer, tuple(bad))


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    """TensorShapeProto: ``repeated Dim dim = 2`` (``int64 size = 1``); ``unknown_rank = 3``."""
    dims: list[int] = []
    for field, wire, value in _proto_fields(buf):
        if field == 2:
            _want(wire, 2, "shape dim")
            size = 0
            for df, dw, dv in _proto_fields(value):
                if df == 1:
                    _want(dw, 0, "dim size")
                    size = _signed64(dv)
            if size < 0:
                raise _Malformed(f"shape has an unknown or negative dimension ({size})")
            dims.append(size)
            if len(dims) > _MAX_DIMS:
                raise _Malformed(f"shape has more than {_MAX_DIMS} dimensions")
        elif field == 3 and value:
            raise _Malformed("shape has unknown rank")
    return tuple(dims)


def _parse_entry(buf: bytes) -> _Entry:
    dtype, shape, shard_id, offset, size, crc, sliced = 0, (), 0, 0, 0, 0, False
    for field, wire, value in _proto_fields(buf):
        if field == 1:
            _want(wire, 0, "dtype")
            dtype = value
        elif field == 2:
            _want(wire, 2, "shape")
            shape = _parse_shape(value)
        elif field == 3:
            _want(wire, 0, "shard_id")
            shard_id = _signed64(value)
        elif field == 4:
            _want(wire, 0, "offset")
            offset = _signed64(value)
        elif field == 5:
            _want(wire, 0, "size")
            size = _signed64(value)
        elif field == 6:
            _want(wire, 5, "crc32c")
            crc = value
        elif field == 7:
            sliced = True
    if offset < 0 or size < 0:
        raise _Malformed(f"negative offset ({offset}) or size ({size})")
    return _Entry(dtype, shape, shard_id, offset, size, crc, sliced)


def _encode_header() -> bytes:
    version = _tag(1, 0) + _put_varint(_BUNDLE_VERSION)  # producer; min_consumer 0 is omitted
    # num_shards = 1; endianness LITTLE (0) is proto3's default, so omitted as TF does
    return _tag(1, 0) + _put_varint(1) + _tag(3, 2) + _put_varint(len(version)) + version


def _encode_entry(e: _Entry) -> bytes:
    """Serialize like proto3 does: fields at their default value are left out."""
    dims = b""
    for d in e.shape:
        dim = _tag(1, 0) + _put_varint(d) if d else b""
        dims += _tag(2, 2) + _put_varint(len(dim)) + dim
    out = _tag(1, 0) + _put_varint(e.dtype) + _tag(2, 2) + _put_varint(len(dims)) + dims
    if e.shard_id:
        out += _tag(3, 0) + _put_varint(e.shard_id)
    if e.offset:
        out += _tag(4, 0) + _put_varint(e.offset)
    if e.size:
        out += _tag(5, 0) + _put_varint(e.size)
    if e.crc32c:
        out += _tag(6, 5) + e.crc32c.to_bytes(4, "little")
    return out


# ---- the SSTable (LevelDB table format as in tensorflow/core/lib/io) ---------------------------


def _read_block(data: bytes, handle: bytes | tuple[int, int], limit: int) -> bytes:
    """The contents of the block at ``handle`` in the table ``data``, CRC-checked."""
    if isinstance(handle, tuple):
        offset, size = handle
    else:
        offset, pos = _varint(handle, 0, len(handle))
        size, _ = _varint(handle, pos, len(handle))
    if offset + size + _TRAILER_SIZE > limit:
        raise _Malformed(
            f"block at offset {offset} ({size} bytes) runs past the table's end ({limit} bytes)"
        )
    stored = int.from_bytes(data[offset + size + 1 : offset + size + _TRAILER_SIZE], "little")
    # the CRC covers the contents plus the compression-type byte
    if crc32c(memoryview(data)[offset : offset + size + 1]) != unmask(stored):
        raise _Malformed(f"block at offset {offset} fails its CRC32C check")
    kind = data[offset + size]
    if kind == 1:
        raise _Unsupported("Snappy-compressed table blocks")
    if kind != 0:
        raise _Malformed(f"block at offset {offset} has unknown compression type {kind}")
    return data[offset : offset + size]


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The ``(key, value)`` pairs of a block, undoing the prefix compression (block.cc)."""
    if len(block) < 4:
        raise _Malformed("block shorter than its restart count")
    num_restarts = int.from_bytes(block[-4:], "little")
    if num_restarts > (len(block) - 4) // 4:
        raise _Malformed(f"block claims {num_restarts} restart points, more than fit")
    if num_restarts == 0:  # block.cc: an empty iterator
        return
    limit = len(block) - 4 * (1 + num_restarts)  # entries end where the restart array starts
    key, pos = b"", 0
    while pos < limit:
        shared, pos = _varint(block, pos, limit, 5)
        unshared, pos = _varint(block, pos, limit, 5)
        value_len, pos = _varint(block, pos, limit, 5)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise _Malformed("bad entry in block")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _read_table(data: bytes) -> list[tuple[bytes, bytes]]:
    """All ``(key, value)`` records of an SSTable, in stored order, every block CRC-checked.

    The table (``tensorflow/core/lib/io/{format,block,block_builder,table_builder}.cc``): data
    blocks hold sorted, prefix-compressed entries (``varint32 shared, varint32 unshared, varint32
    value_len, key_delta, value``) followed by the restart array (``uint32[num_restarts]``,
    ``uint32 num_restarts``); every block is followed by a 5-byte trailer (1 compression byte,
    masked CRC-32C of the block plus that byte). An index block (restart interval 1) maps a
    separator key per data block to its ``BlockHandle`` (``varint64 offset, varint64 size``); a
    metaindex block (empty in TF) comes before it. The file ends with a 48-byte footer: two block
    handles padded to 40 bytes, then the magic number ``0xdb4775248b80fb57`` as two little-endian
    uint32 (low half first).
    """
    if len(data) < _FOOTER_SIZE:
        raise _Malformed(f"shorter than the {_FOOTER_SIZE}-byte table footer")
    footer = data[-_FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != _TABLE_MAGIC:  # low uint32 first, then high
        raise _Malformed("not a TensorFlow checkpoint index (bad magic number)")
    limit = len(data) - _FOOTER_SIZE  # blocks all lie before the footer
    meta_offset, pos = _varint(footer, 0, 40)
    meta_size, pos = _varint(footer, pos, 40)
    index_offset, pos = _varint(footer, pos, 40)
    index_size, _ = _varint(footer, pos, 40)
    _read_block(data, (meta_offset, meta_size), limit)  # only checked: TF writes it empty
    index = _read_block(data, (index_offset, index_size), limit)
    records: list[tuple[bytes, bytes]] = []
    for _separator, handle in _block_entries(index):
        for key, value in _block_entries(_read_block(data, handle, limit)):
            if records and key <= records[-1][0]:
                raise _Malformed("keys out of order")
            records.append((key, value))
    return records


class _BlockBuilder:
    """block_builder.cc: prefix-compressed entries, a restart point every ``interval`` keys."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.interval:
            n = min(len(key), len(self.last))
            while shared < n and key[shared] == self.last[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += _put_varint(shared) + _put_varint(len(key) - shared)
        self.buf += _put_varint(len(value)) + key[shared:] + value
        self.last = key
        self.counter += 1

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        restarts = b"".join(r.to_bytes(4, "little") for r in self.restarts)
        return bytes(self.buf) + restarts + len(self.restarts).to_bytes(4, "little")


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    """table_builder.cc FindShortestSeparator: a short key in ``[start, limit)``."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start  # one is a prefix of the other, or no shorter key fits


def _short_successor(key: bytes) -> bytes:
    """table_builder.cc FindShortSuccessor: a short key ``>= key``."""
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


def _build_table(records: list[tuple[bytes, bytes]]) -> bytes:
    """An SSTable of sorted ``records``, uncompressed, byte for byte as table_builder.cc writes it.

    Layout: data blocks, the (empty) metaindex block, the index block, the footer. A data block
    is cut once it reaches ``_BLOCK_SIZE``; its index entry waits for the next key, so that the
    index can hold a short separator between the two blocks instead of a full key.
    """
    out = bytearray()

    def write_block(contents: bytes) -> bytes:
        handle = _put_varint(len(out)) + _put_varint(len(contents))
        crc = crc32c(b"\x00", crc32c(contents))  # the CRC also covers the type byte (0: none)
        out.extend(contents + b"\x00" + mask(crc).to_bytes(4, "little"))
        return handle

    index = _BlockBuilder(1)
    block = _BlockBuilder(_RESTART_INTERVAL)
    pending: bytes | None = None  # handle of the last block written, not yet in the index
    last = b""
    for key, value in records:
        if block.buf and len(key) + len(value) >= 2 * _BLOCK_SIZE:  # keep huge entries apart
            pending = write_block(block.finish())
            block = _BlockBuilder(_RESTART_INTERVAL)
        if pending is not None:
            index.add(_shortest_separator(last, key), pending)
            pending = None
        block.add(key, value)
        last = key
        if block.size_estimate() >= _BLOCK_SIZE:
            pending = write_block(block.finish())
            block = _BlockBuilder(_RESTART_INTERVAL)
    if block.buf:
        pending = write_block(block.finish())
    meta_handle = write_block(_BlockBuilder(_RESTART_INTERVAL).finish())
    if pending is not None:
        index.add(_short_successor(last), pending)
    index_handle = write_block(index.finish())
    footer = (meta_handle + index_handle).ljust(_FOOTER_SIZE - 8, b"\x00")
    magic = _TABLE_MAGIC.to_bytes(8, "little")  # == low uint32 LE, then high uint32 LE
    return bytes(out + footer + magic)


# ---- reader -----------------------------------------------------------------------------------


def _decode_key(key: bytes) -> str:
    # surrogateescape: keys of partitioned-variable slices are not UTF-8, keep them lossless
    return key.decode("utf-8", "surrogateescape")


def _encode_key(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


class _Shard:
    """One open data file, read with ``readinto`` (no mapping: what a conversion reads stays in
    the OS page cache, not in the process's resident set). Read from one thread at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: IO[bytes] | None = open(path, "rb", buffering=0)  # noqa: SIM115 - close()
        self.size = os.fstat(self.file.fileno()).st_size

    def read_at(self, offset: int, out: np.ndarray) -> None:
        """Fills ``out`` (a writable, contiguous uint8 array) with the bytes at ``offset``."""
        assert self.file is not None
        view, done = memoryview(out), 0
        self.file.seek(offset)
        while done < out.size:
            n = self.file.readinto(view[done:])
            if not n:  # the file shrank since the index was checked against its size
                raise CheckpointError(
                    f"truncated: {self.path} ends at byte {offset + done}, expected "
                    f"{offset + out.size}"
                )
            done += n

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class BundleReader:
    """Tensors of a TensorFlow tensor bundle (``<prefix>.index`` + ``<prefix>.data-*``).

    ``prefix`` is what TF calls the checkpoint path, e.g. ``models/124M/model.ckpt``. Opening
    reads and checks the whole index (every block CRC, the header, that each data shard a tensor
    lives in exists); each :meth:`read` then reads just that tensor's bytes from its data shard,
    so reading tensor by tensor never holds more than one in memory. :meth:`read_into` reads
    into the caller's array (a slice of a stacked one: no second copy), and
    :meth:`copy_tensors` streams many tensors in file order, their CRCs checked on threads.

    :meth:`read` returns a fresh, writable, C-contiguous array that owns its memory, in the
    stored little-endian dtype and shape. Use as a context manager or call :meth:`close` to
    close the data files.

    The format (``tensorflow/core/util/tensor_bundle/tensor_bundle.cc`` and
    ``tensor_bundle.proto``): the index maps each tensor name to a ``BundleEntryProto`` (dtype,
    shape, shard_id, offset, size, masked CRC-32C of the raw tensor bytes, slices); the empty key
    ``""`` holds the ``BundleHeaderProto`` (num_shards, endianness, version). A tensor's bytes are
    its C-order, little-endian element bytes at ``[offset, offset + size)`` of its shard. Sizes and
    shapes from the index are checked against the real file sizes before anything is allocated,
    so a hostile index cannot make the reader allocate terabytes.

    Not supported (a clear ``CheckpointError`` "unsupported: ..."): string and variant tensors,
    partitioned (sliced) variables, big-endian bundles, Snappy-compressed index blocks (TF never
    writes them for bundles).
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        prefix = os.fspath(prefix)
        if prefix.endswith(".index"):  # be forgiving: the index file's own path was given
            prefix = prefix[: -len(".index")]
        self.prefix = prefix
        self.index_path = prefix + ".index"
        self._shards: dict[int, _Shard] = {}
        self._entries: dict[str, _Entry] = {}
        self._load_index()

    # -- index --

    def _load_index(self) -> None:
        path = self.index_path
        if os.path.exists(path) and not os.path.isfile(path):
            what = kind_of(os.stat(path).st_mode)
            raise CheckpointError(f"checkpoint index {path} is {what}, not a regular file")
        if not os.path.isfile(path):
            hint = ""
            if os.path.isdir(self.prefix):
                hint = " (give the checkpoint prefix, e.g. <dir>/model.ckpt, not the directory)"
            raise CheckpointError(f"missing: checkpoint index {path} does not exist{hint}")
        size = os.path.getsize(path)
        if size == 0:
            raise CheckpointError(f"truncated: checkpoint index {path} is empty (0 bytes)")
        if size > _MAX_INDEX_BYTES:
            raise CheckpointError(
                f"corrupt: checkpoint index {path} has {size} bytes, too large for an index"
            )
        with open(path, "rb") as f:
            data = f.read()
        try:
            records = _read_table(data)
            if not records or records[0][0] != b"":
                raise _Malformed("no bundle header entry")
            header = _parse_header(records[0][1])
            entries = {}
            for key, value in records[1:]:
                name = _decode_key(key)
                try:
                    entries[name] = _parse_entry(value)
                except _Malformed as e:
                    raise _Malformed(f"entry {name!r}: {e}") from None
        except _Malformed as e:
            raise CheckpointError(f"corrupt: checkpoint index {path}: {e}") from None
        except _Unsupported as e:
            raise CheckpointError(f"unsupported: checkpoint index {path} uses {e}") from None
        if header.big_endian:
            raise CheckpointError(
                f"unsupported: {path} is a big-endian tensor bundle; only little-endian is read"
            )
        if header.min_consumer > _BUNDLE_VERSION or _BUNDLE_VERSION in header.bad_consumers:
            raise CheckpointError(
                f"unsupported: {path} needs a tensor-bundle reader of version "
                f"{header.min_consumer} or newer (this one is {_BUNDLE_VERSION})"
            )
        if not 1 <= header.num_shards < 1 << 31:
            raise CheckpointError(f"corrupt: {path} claims {header.num_shards} data shards")
        self.num_shards = header.num_shards
        for name, e in entries.items():
            if not e.sliced and not 0 <= e.shard_id < self.num_shards:
                raise CheckpointError(
                    f"corrupt: tensor {name!r} in {path} is in shard {e.shard_id}, "
                    f"but the bundle has {self.num_shards}"
                )
        for shard in sorted({e.shard_id for e in entries.values() if not e.sliced}):
            data_path = data_filename(self.prefix, shard, self.num_shards)
            if os.path.exists(data_path) and not os.path.isfile(data_path):
                what = kind_of(os.stat(data_path).st_mode)
                raise CheckpointError(f"data shard {data_path} is {what}, not a regular file")
            if not os.path.isfile(data_path):
                raise CheckpointError(
                    f"missing: data shard {data_path} does not exist (listed by {path})"
                )
        self._entries = entries

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"missing: no tensor {name!r} in {self.index_path}") from None

    # -- metadata --

    def names(self) -> list[str]:
        """Tensor names in stored (bytewise sorted) order, without the header entry."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name``."""
        return self._entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        """The numpy dtype ``read(name)`` returns (``ml_dtypes.bfloat16`` for DT_BFLOAT16)."""
        e = self._entry(name)
        dtype = _bfloat16() if e.dtype == _DT_BFLOAT16 else _NUMPY_DTYPES.get(e.dtype)
        if dtype is None:
            what = _DT_NAMES.get(e.dtype, f"DataType {e.dtype}")
            if e.dtype == _DT_BFLOAT16:
                what += " (install ml_dtypes to read it)"
            raise CheckpointError(
                f"unsupported: tensor {name!r} in {self.index_path} has dtype {what}"
            )
        return dtype

    # -- data --

    def _shard(self, shard_id: int) -> _Shard:
        shard = self._shards.get(shard_id)
        if shard is None:
            path = data_filename(self.prefix, shard_id, self.num_shards)
            try:
                shard = _Shard(path)
            except FileNotFoundError:
                raise CheckpointError(f"missing: data shard {path} does not exist") from None
            except (OSError, ValueError) as e:
                raise CheckpointError(f"unreadable: data shard {path}: {e}") from None
            self._shards[shard_id] = shard
        return shard

    def _locate(self, name: str) -> tuple[_Entry, np.dtype, _Shard]:
        """Tensor ``name``'s entry, dtype and open shard, after checking that its size agrees
        with its shape and that its bytes lie within the real file."""
        e = self._entry(name)
        dtype = self.dtype(name)
        if e.sliced:
            raise CheckpointError(
                f"unsupported: tensor {name!r} in {self.index_path} is a partitioned variable"
            )
        nbytes = math.prod(e.shape) * dtype.itemsize  # Python ints: no overflow on hostile shapes
        if math.prod(d for d in e.shape if d) * dtype.itemsize >= 1 << 63:
            # numpy cannot make such an array even when a zero dimension leaves it empty
            raise CheckpointError(
                f"corrupt: tensor {name!r} in {self.index_path} has shape {list(e.shape)}, "
                "too large for any array"
            )
        if nbytes != e.size:
            raise CheckpointError(
                f"corrupt: tensor {name!r} in {self.index_path} has size {e.size} bytes, "
                f"but shape {list(e.shape)} of {dtype.name} needs {nbytes}"
            )
        shard = self._shard(e.shard_id)
        end = e.offset + e.size
        if end > shard.size:
            raise CheckpointError(
                f"truncated: {shard.path} has {shard.size} bytes, tensor {name!r} needs bytes "
                f"{e.offset}..{end}"
            )
        return e, dtype, shard

    def _crc_error(self, name: str, shard: _Shard) -> CheckpointError:
        return CheckpointError(f"corrupt: tensor {name!r} in {shard.path} fails its CRC32C check")

    def read_into(self, name: str, out: np.ndarray, *, verify: bool = True) -> None:
        """Reads tensor ``name`` into ``out``: a writable C-contiguous array of the tensor's
        size in bytes (any shape and dtype; e.g. a layer's slice of a stacked array). The bytes
        checked against the stored CRC32C are those in ``out``."""
        e, _, shard = self._locate(name)
        if not (out.flags.c_contiguous and out.flags.writeable) or out.nbytes != e.size:
            raise ValueError(
                f"read_into: {name!r} needs a writable C-contiguous array of {e.size} bytes"
            )
        raw = out.reshape(-1).view(np.uint8)
        if e.size:
            shard.read_at(e.offset, raw)
        if verify and crc32c(raw) != unmask(e.crc32c):
            raise self._crc_error(name, shard)

    def read(self, name: str, *, verify: bool = True) -> np.ndarray:
        """Tensor ``name`` as a new array (little-endian, C order, stored dtype and shape).

        ``verify`` checks the bytes against the CRC32C stored in the index (the index's own
        block CRCs are always checked, when the reader is opened).
        """
        e, dtype, _ = self._locate(name)
        out = np.empty(e.size, dtype=np.uint8)  # size is now known to fit in the real file
        self.read_into(name, out, verify=verify)
        return out.view(dtype).reshape(e.shape)

    def copy_tensors(
        self,
        sinks: Mapping[str, Callable[[int, np.ndarray], object]],
        *,
        workers: int = 2,
        piece: int = 16 << 20,
        progress: Callable[[int], object] | None = None,
    ) -> None:
        """Streams the tensors named in ``sinks``, in the order they lie in the data files, to
        their sinks: ``sink(offset, data)`` gets the tensor's bytes from ``offset`` on (uint8,
        valid only during the call), piece by piece, in order, on a worker thread. The main
        thread reads the next pieces while ``workers`` threads check each tensor's CRC32C and
        call the sinks; a tensor that fails its check raises (after some of its bytes went to
        its sink: the caller discards what it wrote). Everything is checked before any byte is
        read, so a bad index fails first. Pieces are ``piece`` bytes (a tensor's last one may be
        shorter): with a multiple of the itemsize, no element is split. Memory: ``2 * workers
        + 1`` buffers of ``piece`` bytes."""
        located = sorted(
            ((name, *self._locate(name)) for name in sinks),
            key=lambda t: (t[1].shard_id, t[1].offset),
        )
        largest = max((t[1].size for t in located), default=0)
        free: queue.Queue = queue.Queue()
        for _ in range(2 * workers + 1 if largest else 0):
            free.put(np.empty(min(piece, largest), np.uint8))
        todo: list[queue.Queue] = [queue.Queue() for _ in range(workers)]
        failures: list[BaseException] = []
        stop = threading.Event()

        def work(items: queue.Queue) -> None:
            crc = 0
            while (item := items.get()) is not None:
                name, e, shard, offset, buf, n = item
                try:
                    if not stop.is_set():
                        data = buf[:n] if buf is not None else np.empty(0, np.uint8)
                        crc = crc32c(data, crc if offset else 0)
                        sinks[name](offset, data)
                        if offset + n == e.size and crc != unmask(e.crc32c):
                            raise self._crc_error(name, shard)
                except BaseException as err:  # handed to the main thread
                    failures.append(err)
                    stop.set()
                finally:
                    if buf is not None:
                        free.put(buf)

        threads = [
            threading.Thread(target=work, args=(q,), name="gpt2jax-bundle", daemon=True)
            for q in todo
        ]
        for t in threads:
            t.start()
        try:
            for k, (name, e, _, shard) in enumerate(located):
                if e.size == 0:
                    todo[k % workers].put((name, e, shard, 0, None, 0))
                offset = 0
                while offset < e.size and not stop.is_set():
                    buf = free.get()
                    n = min(buf.size, e.size - offset)
                    try:
                        shard.read_at(e.offset + offset, buf[:n])
                    except BaseException:
                        free.put(buf)
                        raise
                    todo[k % workers].put((name, e, shard, offset, buf, n))
                    offset += n
                    if progress is not None:
                        progress(n)
                if stop.is_set():
                    break
        except BaseException:
            stop.set()  # the workers skip what is queued; their sinks are not called again
            raise
        finally:
            for q in todo:
                q.put(None)
            for t in threads:
                t.join()
        if failures:
            raise failures[0]

    def items(self, *, verify: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, array)`` for every tensor in stored order, reading one tensor at a time."""
        for name in self.names():
            yield name, self.read(name, verify=verify)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return self.items()

    def close(self) -> None:
        """Close the data shards (the reader reopens them if read again)."""
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __repr__(self) -> str:
        return f"BundleReader({self.prefix!r}, {len(self._entries)} tensors)"


# ---- writer -----------------------------------------------------------------------------------


def _dtype_enum(dtype: np.dtype) -> int | None:
    if dtype.name == "bfloat16":
        return _DT_BFLOAT16
    for enum, known in _NUMPY_DTYPES.items():
        if dtype.kind == known.kind and dtype.itemsize == known.itemsize:
            return enum
    return None


def write_bundle(
    prefix: str | os.PathLike, items: Iterable[tuple[str, np.ndarray]] | Mapping[str, Any]
) -> None:
    """Write ``items`` as a single-shard tensor bundle that TensorFlow (and :class:`BundleReader`)
    reads: ``<prefix>.index`` and ``<prefix>.data-00000-of-00001``.

    ``items`` (``(name, array)`` pairs, or a mapping) may be a generator: arrays are streamed to
    the data file one at a time and only their metadata is kept; the index is sorted at the end.
    Both files are written under temporary names and renamed into place only when complete, so
    a failure leaves no partial bundle. Supported dtypes are those :class:`BundleReader` reads;
    arrays are stored little-endian in C order.
    """
    prefix = os.fspath(prefix)
    index_path = prefix + ".index"
    data_path = data_filename(prefix, 0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    token = secrets.token_hex(8)
    tmp_data, tmp_index = f"{data_path}.tempstate{token}", f"{index_path}.tempstate{token}"
    pairs = items.items() if isinstance(items, Mapping) else items
    entries: dict[bytes, _Entry] = {}
    try:
        offset = 0
        with open(tmp_data, "wb") as f:
            for name, value in pairs:
                if not isinstance(name, str) or not name:
                    raise CheckpointError(
                        f"cannot write {data_path}: tensor name {name!r} must be a non-empty str"
                    )
                key = _encode_key(name)
                if key in entries:
                    raise CheckpointError(f"cannot write {data_path}: duplicate tensor {name!r}")
                arr = np.asarray(value)
                enum = _dtype_enum(arr.dtype)
                if enum is None:
                    raise CheckpointError(
                        f"cannot write {data_path}: tensor {name!r} has unsupported dtype "
                        f"{arr.dtype}"
                    )
                if arr.dtype != arr.dtype.newbyteorder("<"):  # big-endian input: swap to LE
                    arr = arr.astype(arr.dtype.newbyteorder("<"))
                raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)  # C-order bytes
                f.write(raw.data)
                entries[key] = _Entry(
                    enum, tuple(arr.shape), 0, offset, raw.size, mask(crc32c(raw)), False
                )
                offset += raw.size
                del value, arr, raw  # hold no array while the next one is being produced
            f.flush()
            os.fsync(f.fileno())
        records = [(b"", _encode_header())]
        records += [(k, _encode_entry(entries[k])) for k in sorted(entries)]
        with open(tmp_index, "wb") as f:
            f.write(_build_table(records))
            f.flush()
            os.fsync(f.fileno())
        # data first, then the index that points into it (tensor_bundle.cc does the same)
        os.replace(tmp_data, data_path)
        os.replace(tmp_index, index_path)
    except BaseException:
        for tmp in (tmp_data, tmp_index):
            try:
                os.remove(tmp)
            except OSError:
                pass
        raise
