"""Fuzz target: the safetensors reader, :class:`gpt2jax.formats.safetensors_io.SafetensorsFile`.

Files of random tensors with: hostile header lengths (``2**63``...), headers that are not JSON
objects, entries with unknown dtypes, shapes whose product overflows (or that are empty but
enormous), offsets out of bounds or overlapping, duplicate keys, NaN/Infinity/5000-digit
literals, deep nesting; optionally re-laid out so the hostile entries tile the data and reach
the reads; then byte mutations. Every tensor is then read and checked against its header.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from hypothesis import strategies as st

from fuzzing.harness import Target, fresh_path, write_bytes
from fuzzing.mutations import (
    byte_ops,
    dumps_pairs,
    field_ints,
    hostile_dims,
    inject_literal,
    json_literal_ops,
    json_values,
    mutate,
    random_array,
)
from gpt2jax.formats import safetensors_io

_ST_NAMES = sorted(safetensors_io.DTYPES)
#: Names that are not safetensors dtypes (the real format has more: we refuse those too).
_ST_UNKNOWN = ["f32", "F32 ", "STR", "F8_E4M3FNUZ", "I4", "F4", "", "__metadata__"]

safetensors_tensors = st.dictionaries(
    st.text(min_size=1, max_size=10).filter(lambda s: s != safetensors_io.METADATA_KEY),
    st.tuples(
        st.sampled_from(_ST_NAMES), st.lists(st.integers(0, 5), max_size=3), st.integers(0, 2**32)
    ),
    max_size=5,
)
_FIELDS = ["dtype", "shape", "data_offsets", "extra"]
header_ops = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 99), st.sampled_from(_FIELDS), json_values),
    st.tuples(st.just("del"), st.integers(0, 99), st.sampled_from(_FIELDS)),
    st.tuples(st.just("dtype"), st.integers(0, 99), st.sampled_from(_ST_NAMES + _ST_UNKNOWN)),
    # a hostile shape; with ``adjust`` the offsets are made to agree with it
    st.tuples(st.just("shape"), st.integers(0, 99), hostile_dims, st.booleans()),
    st.tuples(st.just("offsets"), st.integers(0, 99), field_ints, field_ints),
    st.tuples(st.just("overlap"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("rename"), st.integers(0, 99), st.sampled_from(["__metadata__", "", "a"])),
    st.tuples(st.just("duplicate"), st.integers(0, 99)),
    st.tuples(st.just("metadata"), json_values),
    st.tuples(st.just("add"), st.text(max_size=6), json_values),
    st.tuples(st.just("root"), json_values),  # the header is not an object at all
)
safetensors_cases = st.tuples(
    safetensors_tensors,
    st.lists(st.one_of(header_ops, json_literal_ops), max_size=4),
    # the header length: recomputed, left as it was, or hostile
    st.one_of(st.just("exact"), st.just("keep"), field_ints),
    st.lists(byte_ops, max_size=2),
    # lay the (edited) entries out afresh so that they tile the data: hostile shapes then reach
    # the reads instead of failing the layout check
    st.booleans(),
)


def _edit_header(pairs: list[list], ops: list[tuple]) -> tuple[list[list], Any]:
    """Applies header ``ops`` to the ``[name, info]`` pairs; also returns a root replacement."""
    root = None
    for op in ops:
        kind = op[0]
        entries = [p for p in pairs if isinstance(p[1], dict)]
        if kind in ("set", "del", "dtype", "shape", "offsets", "overlap"):
            if not entries:
                continue
            pick = entries[op[1] % len(entries)]
        if kind == "set":
            pick[1][op[2]] = op[3]
        elif kind == "del":
            pick[1].pop(op[2], None)
        elif kind == "dtype":
            pick[1]["dtype"] = op[2]
        elif kind == "shape":
            pick[1]["shape"] = op[2]
            dtype = pick[1].get("dtype")
            known = isinstance(dtype, str) and dtype in safetensors_io.DTYPES
            itemsize = safetensors_io.DTYPES[dtype].itemsize if known else 1
            offsets = pick[1].get("data_offsets")
            if op[3] and isinstance(offsets, list) and offsets and isinstance(offsets[0], int):
                pick[1]["data_offsets"] = [offsets[0], offsets[0] + math.prod(op[2]) * itemsize]
        elif kind == "offsets":
            pick[1]["data_offsets"] = [op[2], op[3]]
        elif kind == "overlap":
            other = entries[op[2] % len(entries)]
            pick[1]["data_offsets"] = other[1].get("data_offsets")
        elif kind == "rename" and pairs:
            pairs[op[1] % len(pairs)][0] = op[2]
        elif kind == "duplicate" and pairs:
            pairs.append(list(pairs[op[1] % len(pairs)]))
        elif kind == "metadata":
            pairs.insert(0, [safetensors_io.METADATA_KEY, op[1]])
        elif kind == "add":
            pairs.append([op[1], op[2]])
        elif kind == "root":
            root = op[1]
    return pairs, root


def _retile(pairs: list[list]) -> bytes:
    """Rewrites the offsets of every entry whose size is computable (and small) so that they
    tile a data section; returns random bytes for it."""
    position = 0
    for _, info in pairs:
        if not isinstance(info, dict):
            continue
        dtype, shape = info.get("dtype"), info.get("shape")
        if not (isinstance(dtype, str) and dtype in safetensors_io.DTYPES):
            continue
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            continue
        nbytes = math.prod(shape) * safetensors_io.DTYPES[dtype].itemsize
        if nbytes <= 1 << 16:
            info["data_offsets"] = [position, position + nbytes]
            position += nbytes
    return np.random.default_rng(position).bytes(position)


def prepare_safetensors(case: tuple, workdir: str) -> str:
    tensors, ops, length, file_ops, retile = case
    specs, data = [], []
    for name, (dtype, shape, seed) in tensors.items():
        specs.append((name, safetensors_io.DTYPES[dtype], shape))
        data.append(random_array(safetensors_io.DTYPES[dtype], shape, seed).tobytes())
    encoded = safetensors_io.encode_header(specs, {"format": "pt"})
    n = int.from_bytes(encoded[:8], "little")
    header = json.loads(encoded[8 : 8 + n])
    pairs, root = _edit_header([[k, v] for k, v in header.items()], ops)
    if retile:
        data = [_retile(pairs)]
    text = json.dumps(root).encode() if root is not None else dumps_pairs(pairs)
    for op in ops:
        if op[0] == "literal":
            text = inject_literal(text, op[1], op[2])
    text += b" " * (-len(text) % 8)
    if length == "exact":
        n = len(text)
    elif length != "keep":
        n = length
    blob = (n % 2**64).to_bytes(8, "little") + text + b"".join(data)
    path = fresh_path(workdir, "model") + ".safetensors"
    write_bytes(path, mutate(blob, file_ops))
    return path


def read_safetensors(path: str, workdir: str) -> str:
    """Opens the file and reads every tensor, checking each against the header it declared."""
    f = safetensors_io.SafetensorsFile(path)
    total = 0
    for name in f.names():
        assert name in f
        array = f.get(name)
        assert array.dtype == f.dtype(name) and array.shape == f.shape(name), name
        total += len(array.tobytes())  # touch every byte
    assert total <= os.path.getsize(path)
    return "accepted"


TARGET = Target(
    "safetensors", safetensors_cases, prepare_safetensors, read_safetensors, quick_examples=300
)
