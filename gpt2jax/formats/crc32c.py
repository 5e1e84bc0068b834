"""CRC-32C (Castagnoli) in pure numpy, fast enough for multi-gigabyte checkpoints.

TensorFlow checksums every tensor of a tensor bundle, and every block of its index table, with
CRC-32C (``tensorflow/core/lib/hash/crc32c.h``, LevelDB's ``util/crc32c``) and stores it masked
(:func:`mask`). :func:`crc32c` uses the optional C package ``google_crc32c`` when importable, else
:func:`crc32c_numpy` (lane-parallel, no compiled dependency; the two must agree);
:func:`crc32c_bytewise` is the slow textbook reference the tests compare to.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["crc32c", "crc32c_numpy", "crc32c_bytewise", "mask", "unmask"]

#: CRC-32C polynomial 0x1EDC6F41, bit-reflected (the LSB-first form every implementation uses).
_POLY = 0x82F63B78
#: LevelDB/TF mask constant: a masked CRC is rotated right by 15 bits plus this.
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF

#: Most lanes stepped at once: 65536 words = 256 KiB rows, measured fastest on a 2 MiB L2.
_MAX_LANES = 1 << 16
#: A stage needs at least this many rows, so the per-stage merge tree stays a small overhead.
_MIN_ROWS = 8
#: Below this many bytes the plain bytewise loop beats numpy's per-call overhead (measured).
_MIN_STAGE_BYTES = 512

BufferLike = bytes | bytearray | memoryview | np.ndarray


def _byte_table() -> np.ndarray:
    """The classic 256-entry table: ``T[b]`` is the state after feeding byte ``b`` to state 0."""
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_TABLE = _byte_table()
_TABLE_LIST = [int(v) for v in _TABLE]

try:  # optional C fast path; never required
    import google_crc32c as _google_crc32c  # type: ignore[import-not-found]

    if getattr(_google_crc32c, "implementation", "c") != "c":
        _google_crc32c = None  # its pure-Python fallback is far slower than the numpy path
except ImportError:  # pragma: no cover - depends on the environment
    _google_crc32c = None


def mask(crc: int) -> int:
    """Mask a CRC as TF/LevelDB store it: rotate right by 15 bits, add ``0xA282EAD8`` (mod 2**32).

    Masking keeps a CRC of data that itself contains CRCs from being degenerate.
    """
    crc &= _U32
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    """Inverse of :func:`mask`."""
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


def _as_u8(data: BufferLike) -> np.ndarray:
    """A flat uint8 view of ``data`` (no copy, except for a non-contiguous ndarray)."""
    if isinstance(data, np.ndarray):
        arr = np.ascontiguousarray(data)  # the C-order bytes, as TF writes them
        return arr.reshape(-1).view(np.uint8)
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("crc32c needs a C-contiguous buffer")
    return np.frombuffer(view.cast("B") if view.ndim != 1 or view.format != "B" else view, np.uint8)


def crc32c_bytewise(data: BufferLike, crc: int = 0) -> int:
    """Reference CRC-32C, one byte at a time (slow: for tests and tiny tails only)."""
    state = (crc & _U32) ^ _U32
    table = _TABLE_LIST
    for b in _as_u8(data).tobytes():
        state = (state >> 8) ^ table[(state ^ b) & 0xFF]
    return state ^ _U32


# ---- GF(2) operators "feed n zero bytes" as 32 basis images, and their lookup tables ----------


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The operator ``a . b`` (apply ``b`` first); each is 32 uint32 images of the basis bits."""
    # bits[i, k] = bit k of b's image of basis bit i; (a . b)(e_i) = XOR_k bits[i, k] * a[k]
    bits = ((b[:, None] >> np.arange(32, dtype=np.uint32)[None, :]) & 1).astype(bool)
    return np.bitwise_xor.reduce(np.where(bits, a[None, :], np.uint32(0)), axis=1).astype(np.uint32)


@functools.cache
def _zeros_operator(nbytes: int) -> np.ndarray:
    """``L_n`` as 32 images (uint32[32]): image ``i`` is the state after feeding ``nbytes`` zero
    bytes to the state ``1 << i``. Built by square-and-multiply from the one-byte operator."""
    basis = (np.uint64(1) << np.arange(32, dtype=np.uint64)).astype(np.uint32)
    one = (basis >> np.uint32(8)) ^ _TABLE[basis & np.uint32(0xFF)]  # one zero byte
    result, power, n = basis, one, nbytes
    while n:
        if n & 1:
            result = _compose(power, result)
        power = _compose(power, power)
        n >>= 1
    return result


@functools.cache
def _shift_tables(nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Two uint32[65536] tables with ``L_n(s) == lo[s & 0xFFFF] ^ hi[s >> 16]``."""
    images = _zeros_operator(nbytes)
    byte = np.arange(256, dtype=np.uint32)
    bits = ((byte[:, None] >> np.arange(8, dtype=np.uint32)[None, :]) & 1).astype(bool)
    # per8[k][b] = L_n(b << 8k), for each of the state's 4 bytes
    per8 = [
        np.bitwise_xor.reduce(np.where(bits, images[None, 8 * k : 8 * k + 8], np.uint32(0)), 1)
        for k in range(4)
    ]
    # index = (high byte << 8) | low byte, so row = high byte, column = low byte
    lo = (per8[1][:, None] ^ per8[0][None, :]).astype(np.uint32).reshape(-1)
    hi = (per8[3][:, None] ^ per8[2][None, :]).astype(np.uint32).reshape(-1)
    return lo, hi


def _apply(tables: tuple[np.ndarray, np.ndarray], s: np.ndarray) -> np.ndarray:
    """``L_n`` applied to every state in ``s`` (uint32[k])."""
    lo, hi = tables
    return lo[s & np.uint32(0xFFFF)] ^ hi[s >> np.uint32(16)]


def _lanes(words: np.ndarray, state: int) -> int:
    """Feed ``words`` (uint32[m, C], C a power of two) to the raw ``state``; the new raw state."""
    m, lanes = words.shape
    lo, hi = _shift_tables(4 * lanes)
    a = words[0].astype(np.uint32)  # copy: never write into the caller's buffer
    a[0] ^= np.uint32(state)  # the incoming state enters with the first word
    idx = np.empty(lanes, dtype=np.uint32)
    tmp = np.empty(lanes, dtype=np.uint32)
    for r in range(1, m):  # a <- L_{4C}(a) ^ row, all lanes at once; preallocated, no temporaries
        np.bitwise_and(a, 0xFFFF, out=idx)
        np.take(lo, idx, out=tmp)
        np.right_shift(a, 16, out=idx)
        np.take(hi, idx, out=a)
        np.bitwise_xor(a, tmp, out=a)
        np.bitwise_xor(a, words[r], out=a)
    # lane j now holds its words as if the message ended at its last word; merge neighbours,
    # shifting the left one past the right one's d words: d = 1, 2, 4, ... (lanes - 1 words max)
    d = 1
    while a.size > 1:
        a = _apply(_shift_tables(4 * d), a[0::2]) ^ a[1::2]
        d *= 2
    return int(_apply(_shift_tables(4), a)[0])  # the last word itself is 4 bytes before the end


def _update(u8: np.ndarray, state: int) -> int:
    """Feed the bytes ``u8`` (uint8[n]) to the raw (un-inverted) ``state``."""
    pos, n = 0, u8.size
    while n - pos >= _MIN_STAGE_BYTES:
        nwords = (n - pos) // 4
        lanes = min(_MAX_LANES, 1 << ((nwords // _MIN_ROWS).bit_length() - 1))
        rows = nwords // lanes
        nbytes = rows * lanes * 4
        # '<u4': the CRC reads words little-endian whatever the host; unaligned views are fine
        words = u8[pos : pos + nbytes].view("<u4").reshape(rows, lanes)
        state = _lanes(words, state)
        pos += nbytes
    table = _TABLE_LIST
    for b in u8[pos:].tobytes():  # fewer than _MIN_STAGE_BYTES left
        state = (state >> 8) ^ table[(state ^ b) & 0xFF]
    return state


def crc32c_numpy(data: BufferLike, crc: int = 0) -> int:
    """CRC-32C of ``data`` continuing from ``crc`` (0 to start), with the numpy algorithm.

    ``data`` may be bytes, bytearray, a contiguous memoryview, or any ndarray (its C-order bytes,
    e.g. a ``np.memmap`` slice). ``crc32c_numpy(b, crc32c_numpy(a)) == crc32c_numpy(a + b)``.

    How it is fast in numpy. A CRC with the init/final inversions peeled off is linear over
    GF(2): ``L_n`` -- "feed n zero bytes to a state" -- is a 32x32 bit matrix, and feeding a
    little-endian 32-bit word ``w`` to a state ``s`` gives ``L_4(s ^ w)``. So for a message of
    ``m * C`` words laid out as ``m`` rows of ``C`` words (row-major, i.e. just the buffer
    reshaped):

    * lane ``j`` runs ``a_j <- L_{4C}(a_j) ^ row[r, j]`` down its column -- the words it sees are
      ``4C`` bytes apart -- and all ``C`` lanes step together as one numpy op on a contiguous row;
    * then neighbouring lanes are merged pairwise, ``L_{4d}(left) ^ right`` with ``d`` = 1, 2, 4,
      ... words (the same "shift by length" step as zlib's ``crc32_combine``), and a last ``L_4``.

    Each ``L_n`` is applied as two lookups in 65536-entry tables (low and high 16 bits of the
    state), built once per ``n`` from the operator's 32 basis images (cached: at most 17 pairs of
    uint32[65536], about 9 MB). The last few hundred bytes, and short buffers, go through a plain
    bytewise loop.
    """
    u8 = _as_u8(data)
    return _update(u8, (crc & _U32) ^ _U32) ^ _U32


def crc32c(data: BufferLike, crc: int = 0) -> int:
    """Standard CRC-32C of ``data`` continuing from ``crc``: ``crc32c(b"123456789") == 0xE3069283``.

    Uses ``google_crc32c`` when it is installed with its C extension, else :func:`crc32c_numpy`.
    """
    if _google_crc32c is not None:
        u8 = _as_u8(data)
        view = u8.view()
        view.flags.writeable = False  # it takes read-only buffers only ("y#")
        try:
            return int(_google_crc32c.extend(crc & _U32, view if u8.size else b""))
        except TypeError:  # a numpy whose arrays it does not accept: the numpy algorithm
            pass
    return crc32c_numpy(data, crc)
