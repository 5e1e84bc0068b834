"""Hypothesis strategies for hostile inputs: byte-level mutations, hostile integers, JSON junk.

Generic building blocks of the fuzz targets in ``the ``target_*`` modules``: they know nothing about
any one file format. A mutation is a small tuple (``("flip", pos, bit)``...) so that Hypothesis
can shrink a failing input to the one operation that matters and print it readably.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
from hypothesis import strategies as st

#: Where a size/offset/count field lies: the edges of int32/int64/uint64 and of exact floats.
HUGE_INTS = [
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**53 + 1,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**70 - 1,  # a 10-byte varint: more than 64 bits
]
#: An unsigned field's value: small, at an edge, or anything in 64 bits.
field_ints = st.one_of(st.integers(0, 300), st.sampled_from(HUGE_INTS), st.integers(0, 2**64 - 1))

#: Mutation positions are taken modulo the buffer's length, so any value is a valid position.
_POS = st.integers(0, 1 << 24)

byte_ops = st.one_of(
    st.tuples(st.just("flip"), _POS, st.integers(0, 7)),
    st.tuples(st.just("truncate"), _POS),
    st.tuples(st.just("insert"), _POS, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _POS, st.integers(1, 64)),
    st.tuples(st.just("overwrite"), _POS, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("varint"), _POS, field_ints),  # a protobuf/LevelDB length or offset
    st.tuples(st.just("u64"), _POS, field_ints),  # a little-endian 64-bit size field
)


#: A tensor shape: small, hostile (int64 -1 as a varint, sizes past any file), or empty but
#: enormous (a zero dimension beside dimensions no array can have).
hostile_dims = st.one_of(
    st.lists(st.one_of(st.integers(0, 6), field_ints, st.just(2**64 - 1)), max_size=6),
    st.permutations([0, 2**31, 2**40, 2**62, 2**63 - 1]).map(lambda dims: dims[:3]),
)


def random_array(dtype: Any, shape: list[int], seed: int) -> np.ndarray:
    """Random bytes of ``shape`` viewed as ``dtype`` (NaNs, odd bools and all)."""
    dt = np.dtype(dtype)
    raw = np.random.default_rng(seed).bytes(math.prod(shape) * dt.itemsize)
    return np.frombuffer(raw, dtype=dt).reshape(shape).copy()


def varint(value: int) -> bytes:
    """Base-128 varint, any size (a hostile one may exceed 64 bits)."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def proto_field(number: int, wire: int, payload: bytes | int) -> bytes:
    """One protobuf field; ``payload`` an int for varint/fixed wires, bytes otherwise."""
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(payload % 2**70)
    if wire in (1, 5):
        return key + (payload % 2 ** (64 if wire == 1 else 32)).to_bytes(
            8 if wire == 1 else 4, "little"
        )
    return key + varint(len(payload)) + payload


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    """``data`` with the byte-level mutations ``ops`` applied in order."""
    buf = bytearray(data)
    for op in ops:
        kind, pos = op[0], op[1] % (len(buf) + 1)
        if kind == "flip":
            if buf:
                buf[pos % len(buf)] ^= 1 << op[2]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = op[2]
        elif kind == "delete":
            del buf[pos : pos + op[2]]
        elif kind == "overwrite":
            buf[pos : pos + len(op[2])] = op[2]
        elif kind == "varint":
            raw = varint(op[2])
            buf[pos : pos + len(raw)] = raw
        elif kind == "u64":
            buf[pos : pos + 8] = (op[2] % 2**64).to_bytes(8, "little")
        else:  # pragma: no cover - a typo in a strategy
            raise ValueError(f"unknown mutation {kind!r}")
    return bytes(buf)


# ---- JSON ---------------------------------------------------------------------------------------

#: Scalars a config or header field should never be, and a few it should.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2, 3, 5, 97, 10_000_001, *HUGE_INTS, -(2**63), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 1e-5, -0.0, 5.0, 1e-320, 1e308]),
    st.text(max_size=12),
    st.sampled_from(["", "gpt2", "F32", "gelu_new", "12", "\x00", "\ud800"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)

#: Text Python's ``json`` parses into something odd, or refuses with an unusual exception:
#: NaN/Infinity, a float that overflows, an int past the 4300-digit conversion limit, nesting
#: past the recursion limit, a lone surrogate, a BOM.
JSON_LITERALS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "9" * 5000,
    "-" + "9" * 5000,
    "1" + "0" * 30,
    "0.1e-400",
    '"\\ud800"',
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 50_000 + "1" + "}" * 50_000,
    "\ufeff{}",
    "",
    "null",
    "[]",
    '"text"',
]
json_literal_ops = st.tuples(
    st.just("literal"), st.integers(0, 1000), st.sampled_from(JSON_LITERALS)
)

_NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


def inject_literal(text: bytes, index: int, literal: str) -> bytes:
    """``text`` with its ``index``-th number (modulo the count) replaced by ``literal``, or
    all of ``text`` replaced when it holds no number."""
    numbers = list(_NUMBER.finditer(text))
    raw = literal.encode("utf-8", "surrogatepass")
    if not numbers:
        return raw
    m = numbers[index % len(numbers)]
    return text[: m.start()] + raw + text[m.end() :]


def dumps_pairs(pairs: list[tuple[str, Any]]) -> bytes:
    """A JSON object written from ``pairs`` as given: duplicate keys stay duplicated."""
    items = (json.dumps(k) + ":" + json.dumps(v, allow_nan=True) for k, v in pairs)
    return ("{" + ",".join(items) + "}").encode("utf-8", "surrogatepass")
