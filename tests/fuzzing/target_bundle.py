"""Fuzz target: the TF tensor-bundle reader, :class:`gpt2jax.formats.tf_bundle.BundleReader`.

Bundles are made from the committed fixtures or from random tensors (``write_bundle``), then:
bytes of the index mutated (optionally with every block's CRC re-sealed, so the corruption
reaches the parsers behind the checksum); index records replaced by hostile ``BundleEntryProto``
/ ``BundleHeaderProto`` messages (sizes, offsets and shapes that claim terabytes, huge varints,
wrong wire types, unknown dtypes, the same bytes reinterpreted as another dtype); garbage index
files with a valid footer; bytes of the data file mutated. Every tensor is then read, and read
again unverified when its CRC check fails.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from fuzzing.harness import Target, check_clean, fresh_path, write_bytes
from fuzzing.mutations import (
    byte_ops,
    field_ints,
    hostile_dims,
    mutate,
    proto_field,
    random_array,
    varint,
)
from gpt2jax.errors import Gpt2JaxError
from gpt2jax.formats import tf_bundle
from gpt2jax.formats.crc32c import crc32c, mask

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BUNDLE_FIXTURES = {
    "openai_tiny": FIXTURES / "openai_tiny" / "model.ckpt",
    "tf_bundle_dtypes": FIXTURES / "tf_bundle_dtypes" / "model.ckpt",
}

_TF_DTYPES = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    5: np.int16,
    6: np.int8,
    8: np.complex64,
    9: np.int64,
    10: np.bool_,
    14: ml_dtypes.bfloat16,
    17: np.uint16,
    18: np.complex128,
    19: np.float16,
    22: np.uint32,
    23: np.uint64,
}
#: DataType enums: every readable one, then unsupported/invalid ones (string, resource, ...).
_DT_ENUMS = [*_TF_DTYPES, 0, 7, 11, 20, 21, 24, 101, 2**31]

random_tensors = st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.tuples(
        st.sampled_from(list(_TF_DTYPES.values())),
        st.lists(st.integers(0, 5), max_size=3),
        st.integers(0, 2**32 - 1),
    ),
    min_size=1,
    max_size=5,
)

#: A field with any number and wire type, whose length prefix may lie about what follows.
junk_fields = st.builds(
    lambda number, wire, value, blob, lie: (
        varint(number << 3 | wire)
        + (varint(value) if wire in (0, 2) else b"")
        + (blob if wire != 0 or lie else b"")
    ),
    st.integers(0, 20),
    st.integers(0, 7),
    field_ints,
    st.binary(max_size=12),
    st.booleans(),
)
#: A shard id or offset that usually points where the data is, so reads get past that check.
_near = st.one_of(st.just(0), st.integers(0, 64), field_ints)


@st.composite
def entry_protos(draw: st.DrawFn) -> bytes:
    """A ``BundleEntryProto``: hostile values in the right wire types; half of them also
    malformed (junk fields, a ``slices`` field, cut short)."""
    dtype = draw(st.one_of(st.sampled_from(list(_TF_DTYPES)), st.sampled_from(_DT_ENUMS)))
    dims = draw(hostile_dims)
    size = draw(field_ints)
    if dtype in _TF_DTYPES and draw(st.booleans()):
        # consistent with the shape, so the read gets past the size check to the file bounds
        size = math.prod(dims) * np.dtype(_TF_DTYPES[dtype]).itemsize
    shape = b"".join(proto_field(2, 2, proto_field(1, 0, d)) for d in dims)
    fields = [
        proto_field(1, 0, dtype),
        proto_field(2, 2, shape),
        proto_field(3, 0, draw(_near)),  # shard_id
        proto_field(4, 0, draw(_near)),  # offset
        proto_field(5, 0, size % 2**70),
        proto_field(6, 5, draw(st.integers(0, 2**32 - 1))),  # crc32c
    ]
    if not draw(st.booleans()):
        return b"".join(draw(st.permutations(fields)))
    fields.append(proto_field(2, 2, proto_field(3, 0, draw(st.integers(0, 2)))))  # unknown_rank
    fields.append(proto_field(7, 2, draw(st.binary(max_size=8))))  # slices
    fields += draw(st.lists(junk_fields, max_size=2))
    blob = b"".join(draw(st.lists(st.sampled_from(fields), min_size=1, max_size=8)))
    return blob[: draw(st.integers(0, len(blob)))]


@st.composite
def header_protos(draw: st.DrawFn) -> bytes:
    """A ``BundleHeaderProto``: shard count, endianness and version, hostile or junk."""
    version = proto_field(1, 0, draw(st.integers(0, 3)))
    version += proto_field(2, 0, draw(st.one_of(st.integers(0, 3), field_ints)))  # min_consumer
    bad = draw(st.lists(st.one_of(st.integers(0, 3), field_ints), max_size=3))
    if draw(st.booleans()):
        version += proto_field(3, 2, b"".join(varint(b) for b in bad))  # packed
    else:
        version += b"".join(proto_field(3, 0, b) for b in bad)
    fields = [
        proto_field(1, 0, draw(st.one_of(st.integers(0, 5), field_ints))),  # num_shards
        proto_field(2, 0, draw(st.integers(0, 3))),  # endianness
        proto_field(3, 2, version),
        *draw(st.lists(junk_fields, max_size=2)),
    ]
    return b"".join(draw(st.permutations(fields)))


record_ops = st.one_of(
    st.tuples(st.just("entry"), st.integers(0, 99), entry_protos()),
    st.tuples(
        st.just("reinterpret"),
        st.integers(0, 99),
        st.sampled_from(list(_TF_DTYPES)),
        st.sampled_from(["flat", "2d", "zero", "scalar"]),
    ),
    st.tuples(st.just("header"), header_protos()),
    st.tuples(st.just("drop"), st.integers(0, 99)),
    st.tuples(st.just("add"), st.binary(max_size=12), entry_protos()),
    st.tuples(st.just("rekey"), st.integers(0, 99), st.binary(max_size=12)),
    st.tuples(st.just("unsorted")),
)

bundle_cases = st.tuples(
    st.one_of(st.sampled_from(sorted(BUNDLE_FIXTURES)), random_tensors),
    st.one_of(
        st.just(("keep",)),
        # (ops, reseal): re-sealing every block's CRC lets the corruption reach the parsers
        st.tuples(st.just("bytes"), st.lists(byte_ops, min_size=1, max_size=4), st.booleans()),
        st.tuples(st.just("records"), st.lists(record_ops, min_size=1, max_size=4)),
        # every tensor replaced by hostile entries, against the same data file
        st.tuples(
            st.just("records"),
            st.lists(st.tuples(st.just("entry"), st.integers(0, 99), entry_protos()), max_size=5),
        ),
        st.tuples(
            st.just("garbage"),
            st.binary(max_size=600),
            st.lists(st.integers(0, 700), min_size=4, max_size=4),
        ),
    ),
    st.lists(byte_ops, max_size=2),  # the data file's mutations
)


def _blocks(index: bytes) -> list[tuple[int, int]]:
    """``(offset, size)`` of every block of a valid index: data blocks, metaindex, index."""
    footer = index[-48:]
    meta_offset, pos = tf_bundle._varint(footer, 0, 40)
    meta_size, pos = tf_bundle._varint(footer, pos, 40)
    index_offset, pos = tf_bundle._varint(footer, pos, 40)
    index_size, _ = tf_bundle._varint(footer, pos, 40)
    blocks = [(meta_offset, meta_size), (index_offset, index_size)]
    for _, handle in tf_bundle._block_entries(index[index_offset : index_offset + index_size]):
        offset, pos = tf_bundle._varint(handle, 0, len(handle))
        blocks.append((offset, tf_bundle._varint(handle, pos, len(handle))[0]))
    return blocks


def _seal(index: bytearray, blocks: list[tuple[int, int]]) -> None:
    """Rewrites the CRC trailer of each block that still fits, whatever its contents now."""
    for offset, size in blocks:
        end = offset + size
        if end + 5 <= len(index):
            crc = mask(crc32c(bytes(index[offset : end + 1])))
            index[end + 1 : end + 5] = crc.to_bytes(4, "little")


def _edit_records(records: list[tuple[bytes, bytes]], ops: list[tuple]) -> tuple[list, int]:
    """Applies record-level ``ops``; returns the records and the shard count they declare."""
    records, shards, ordered = list(records), 1, True
    for op in ops:
        kind = op[0]
        tensors = [i for i, (key, _) in enumerate(records) if key]
        if kind == "entry" and tensors:
            i = tensors[op[1] % len(tensors)]
            records[i] = (records[i][0], op[2])
        elif kind == "reinterpret" and tensors:
            # same bytes (and so the same CRC) read as another dtype and shape
            i = tensors[op[1] % len(tensors)]
            try:
                e = tf_bundle._parse_entry(records[i][1])
            except tf_bundle._Malformed:  # an earlier op made it unparsable
                continue
            itemsize = np.dtype(_TF_DTYPES[op[2]]).itemsize
            n = e.size // itemsize
            shape = {"flat": (n,), "2d": (1, n), "zero": (0, n + 1), "scalar": ()}[op[3]]
            e = tf_bundle._Entry(op[2], shape, e.shard_id, e.offset, e.size, e.crc32c, e.sliced)
            records[i] = (records[i][0], tf_bundle._encode_entry(e))
        elif kind == "header":
            records = [(k, op[1] if not k else v) for k, v in records]
            num_shards = next((v for f, w, v in _fields(op[1]) if f == 1 and w == 0), 1)
            shards = num_shards if 1 <= num_shards <= 4 else 1
        elif kind == "drop" and records:
            del records[op[1] % len(records)]
        elif kind == "add":
            records.append((op[1], op[2]))
        elif kind == "rekey" and records:
            i = op[1] % len(records)
            records[i] = (op[2], records[i][1])
        elif kind == "unsorted":
            ordered = False
    return (sorted(records) if ordered else records[::-1]), shards


def _fields(blob: bytes) -> list[tuple[int, int, Any]]:
    """The top-level fields of a protobuf we generated (possibly cut short: then fewer)."""
    try:
        return list(tf_bundle._proto_fields(blob))
    except tf_bundle._Malformed:
        return []


@functools.cache
def _fixture_index(name: str) -> bytes:
    return Path(f"{BUNDLE_FIXTURES[name]}.index").read_bytes()


def _link_or_write(path: str, src: str, data: bytes | None) -> None:
    """The data file: a symlink to the unmodified original, or the mutated bytes."""
    if data is None:
        os.symlink(src, path)
    else:
        write_bytes(path, data)


def prepare_bundle(case: tuple, workdir: str) -> str:
    base, index_mode, data_ops = case
    prefix = fresh_path(workdir, "bundle")
    if isinstance(base, str):
        index, data_src = _fixture_index(base), tf_bundle.data_filename(BUNDLE_FIXTURES[base], 0, 1)
    else:
        tensors = [(name, random_array(*spec)) for name, spec in base.items()]
        tf_bundle.write_bundle(prefix + "-base", tensors)
        index = Path(prefix + "-base.index").read_bytes()
        data_src = tf_bundle.data_filename(prefix + "-base", 0, 1)
    shards = 1
    if index_mode[0] == "bytes":
        mutated = bytearray(mutate(index, index_mode[1]))
        if index_mode[2]:
            _seal(mutated, _blocks(index))
        index = bytes(mutated)
    elif index_mode[0] == "records":
        records, shards = _edit_records(tf_bundle._read_table(index), index_mode[1])
        index = tf_bundle._build_table(records)
    elif index_mode[0] == "garbage":
        blob, (a, b, c, d) = bytearray(index_mode[1]), index_mode[2]
        footer = (varint(a) + varint(b) + varint(c) + varint(d)).ljust(40, b"\0")
        _seal(blob, [(a, b), (c, d)])
        index = bytes(blob) + footer + tf_bundle._TABLE_MAGIC.to_bytes(8, "little")
    write_bytes(prefix + ".index", index)
    data = mutate(Path(data_src).read_bytes(), data_ops) if data_ops else None
    for shard in range(shards):
        _link_or_write(tf_bundle.data_filename(prefix, shard, shards), data_src, data)
    return prefix


def read_bundle(prefix: str, workdir: str) -> str:
    """Opens the bundle and reads every tensor (unverified too when the CRC check fails)."""
    outcome = "accepted"
    with tf_bundle.BundleReader(prefix) as reader:
        for name in reader.names():
            assert name in reader
            shape = reader.shape(name)
            for verify in (True, False):
                try:
                    dtype = reader.dtype(name)
                    array = reader.read(name, verify=verify)
                except Gpt2JaxError as e:
                    check_clean(e, workdir)
                    outcome = "clean"
                    continue
                assert array.shape == shape and array.dtype == dtype, (name, array, shape)
                assert array.flags.c_contiguous and array.flags.writeable
                root = array
                while isinstance(root.base, np.ndarray):
                    root = root.base
                assert root.base is None, "the array still refers to the mapped file"
                break
    return outcome


TARGET = Target("tf_bundle", bundle_cases, prepare_bundle, read_bundle, quick_examples=300)
