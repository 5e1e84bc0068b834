"""CRC-32C: the numpy lane algorithm against published vectors and a bytewise reference."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2jax.formats import crc32c as crc_module
from gpt2jax.formats.crc32c import crc32c, crc32c_bytewise, crc32c_numpy, mask, unmask

# RFC 3720 (iSCSI) appendix B.4 and the usual check value.
KNOWN = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize(("data", "expected"), KNOWN)
def test_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c_bytewise(data) == expected
    assert crc32c_numpy(data) == expected
    assert crc32c(data) == expected


def _random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def test_numpy_matches_bytewise_on_odd_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = [*range(0, 80), 127, 128, 129, 1021, 4099, 32771, 65537, 100003]
    for n in lengths:
        data = _random_bytes(rng, n)
        assert crc32c_numpy(data) == crc32c_bytewise(data), n


def test_widest_lanes_and_all_stages() -> None:
    # > 8 rows of the widest lanes (2 MiB), plus a ragged tail that takes every smaller stage
    rng = np.random.default_rng(1)
    data = _random_bytes(rng, 4 * crc_module._MAX_LANES * crc_module._MIN_ROWS + 4 * 4097 + 3)
    assert crc32c_numpy(data) == crc32c_bytewise(data)


def test_continuation_equals_whole() -> None:
    rng = np.random.default_rng(2)
    data = _random_bytes(rng, 50001)
    whole = crc32c_numpy(data)
    for cut in (0, 1, 3, 4, 31, 32, 4096, 25000, 50000, 50001):
        assert crc32c_numpy(data[cut:], crc32c_numpy(data[:cut])) == whole, cut


def test_buffer_kinds() -> None:
    rng = np.random.default_rng(3)
    arr = rng.standard_normal((37, 11)).astype(np.float32)
    expected = crc32c_bytewise(arr.tobytes())
    assert crc32c_numpy(arr) == expected
    assert crc32c_numpy(memoryview(arr)) == expected  # a 2-D float memoryview
    assert crc32c_numpy(bytearray(arr.tobytes())) == expected
    # an unaligned uint8 view and a non-contiguous array (checksummed as its C-order bytes)
    shifted = np.frombuffer(b"x" + arr.tobytes(), dtype=np.uint8)[1:]
    assert crc32c_numpy(shifted) == expected
    assert crc32c_numpy(arr.T) == crc32c_bytewise(np.ascontiguousarray(arr.T).tobytes())
    assert crc32c_numpy(np.zeros(0, np.float64)) == 0


def test_input_is_not_modified() -> None:
    data = np.arange(10000, dtype=np.uint32)
    before = data.copy()
    crc32c_numpy(data)
    assert np.array_equal(data, before)


def test_mask_unmask() -> None:
    assert mask(0) == 0xA282EAD8
    rng = np.random.default_rng(4)
    for crc in [0, 1, 0xFFFFFFFF, *map(int, rng.integers(0, 2**32, 100))]:
        assert unmask(mask(crc)) == crc
        assert unmask(unmask(mask(mask(crc)))) == crc
        assert mask(crc) != crc and mask(mask(crc)) != crc  # LevelDB's crc32c_test
    assert mask(crc32c(b"foo")) == ((crc32c(b"foo") >> 15 | crc32c(b"foo") << 17) + 0xA282EAD8) % (
        1 << 32
    )


def test_optional_fast_path_agrees() -> None:
    """With ``google_crc32c`` installed (the ``fast`` extra) :func:`crc32c` uses it, for every
    kind of buffer a reader hands it (it takes read-only ones only), continued or not."""
    google_crc32c = pytest.importorskip("google_crc32c")
    from gpt2jax.formats import crc32c as module

    assert module._google_crc32c is google_crc32c  # the fast path is the one in use
    rng = np.random.default_rng(5)
    for n in (0, 1, 9, 1000, 100003):
        data = _random_bytes(rng, n)
        want = crc32c_numpy(data)
        assert google_crc32c.value(data) == want == crc32c(data)
        arr = np.frombuffer(data, np.uint8).copy()  # writable
        for buf in (arr, bytearray(data), memoryview(bytearray(data)), arr.view(np.uint8)[::1]):
            assert crc32c(buf) == want
        half = n // 2
        assert crc32c(arr[half:], crc32c(arr[:half])) == want
