"""The tensor-bundle reader and writer, against checkpoints written by real TensorFlow.

The fixtures were made by ``scripts/make_tf_fixture.py`` (TensorFlow's own ``Saver``); TensorFlow
itself is not needed here.
"""

from __future__ import annotations

import gc
import inspect
import os
import shutil
import tracemalloc
import weakref
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from gpt2jax.errors import CheckpointError
from gpt2jax.formats import tf_bundle
from gpt2jax.formats.tf_bundle import BundleReader, data_filename, write_bundle

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OPENAI = FIXTURES / "openai_tiny" / "model.ckpt"
DTYPES = FIXTURES / "tf_bundle_dtypes" / "model.ckpt"


def _reference(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _tensors(ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in ref.items() if not k.startswith("__")}


def _copy_bundle(src: Path, dst_dir: Path) -> Path:
    """Copy the bundle with prefix ``src`` to ``dst_dir``; the new prefix."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in src.parent.glob(src.name + ".*"):
        shutil.copyfile(f, dst_dir / f.name)
    return dst_dir / src.name


def _error(excinfo: pytest.ExceptionInfo, *parts: object) -> str:
    """The error's message, checked to be one line containing every one of ``parts``."""
    msg = str(excinfo.value)
    assert "\n" not in msg
    for part in parts:
        assert str(part) in msg, (part, msg)
    return msg


# ---- reading TensorFlow's files ----------------------------------------------------------------


def test_reads_openai_fixture_bitwise() -> None:
    expected = _tensors(_reference(FIXTURES / "openai_tiny_reference.npz"))
    with BundleReader(OPENAI) as reader:
        assert sorted(reader.names()) == sorted(expected)
        assert len(reader) == len(expected) == 28
        for name, want in expected.items():
            assert reader.shape(name) == want.shape
            assert reader.dtype(name) == np.float32
            got = reader.read(name)
            assert got.dtype == np.float32 and got.shape == want.shape
            assert got.tobytes() == want.tobytes(), name
        assert reader.shape("model/h1/attn/c_attn/w") == (1, 12, 36)
        assert reader.shape("model/wte") == (50257, 12)


def test_reads_dtypes_fixture_bitwise() -> None:
    ref = _reference(FIXTURES / "tf_bundle_dtypes_reference.npz")
    bf16_names = set(ref["__bfloat16_as_uint16__"].tolist())
    expected_dtypes = {
        "dtypes/bfloat16": np.dtype(ml_dtypes.bfloat16),
        "dtypes/bool": np.dtype(bool),
        "dtypes/complex64": np.dtype(np.complex64),
        "dtypes/empty": np.dtype(np.float32),
        "dtypes/float16": np.dtype(np.float16),
        "dtypes/float64": np.dtype(np.float64),
        "dtypes/int16": np.dtype(np.int16),
        "dtypes/int32": np.dtype(np.int32),
        "dtypes/int64": np.dtype(np.int64),
        "dtypes/int8": np.dtype(np.int8),
        "dtypes/scalar": np.dtype(np.float32),
        "dtypes/uint8": np.dtype(np.uint8),
    }
    with BundleReader(DTYPES) as reader:
        assert sorted(reader.names()) == sorted(_tensors(ref)) == sorted(expected_dtypes)
        for name, want in _tensors(ref).items():
            got = reader.read(name)
            assert got.dtype == reader.dtype(name) == expected_dtypes[name], name
            assert got.shape == reader.shape(name) == want.shape, name
            if name in bf16_names:
                got = got.view(np.uint16)
            assert got.tobytes() == want.tobytes(), name
        assert reader.read("dtypes/scalar").shape == ()
        assert reader.read("dtypes/empty").shape == (0, 4)


def test_iteration_streams_in_stored_order() -> None:
    with BundleReader(OPENAI) as reader:
        names = reader.names()
        assert names == sorted(names, key=lambda s: s.encode())
        stream = reader.items()
        assert inspect.isgenerator(stream)
        assert [name for name, _ in stream] == names
        first_name, first = next(iter(reader))
        assert first_name == names[0] and isinstance(first, np.ndarray)


def test_read_returns_an_independent_copy() -> None:
    with BundleReader(OPENAI) as reader:
        a = reader.read("model/ln_f/g")
        assert a.flags.writeable and a.flags.c_contiguous
        a[:] = 0
        assert reader.read("model/ln_f/g").any()
    assert a.sum() == 0  # still usable after close
    assert "model/wte" in reader and "model/nope" not in reader


def test_accepts_the_index_path_and_pathlike() -> None:
    with BundleReader(str(OPENAI) + ".index") as reader:
        assert len(reader.names()) == 28


# ---- writing ----------------------------------------------------------------------------------


def test_write_bundle_reproduces_tensorflow_bytes(tmp_path: Path) -> None:
    # re-writing TF's checkpoint, streamed from the reader, gives TF's exact files back
    with BundleReader(OPENAI) as reader:
        write_bundle(tmp_path / "model.ckpt", reader.items())
    for suffix in (".index", ".data-00000-of-00001"):
        ours = (tmp_path / ("model.ckpt" + suffix)).read_bytes()
        assert ours == Path(str(OPENAI) + suffix).read_bytes(), suffix
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.ckpt.data-00000-of-00001",
        "model.ckpt.index",
    ]


def _all_dtypes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": np.array([np.nan, np.inf, -0.0, 6e-8, 1.5], np.float16),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "f64": np.array([np.nan, -np.inf, 5e-324]),
        "i8": np.array([-128, 0, 127], np.int8),
        "i16": np.array([-32768, 32767], np.int16),
        "i32": np.array([-(2**31), 2**31 - 1], np.int32),
        "i64": np.array([[-(2**63)], [2**63 - 1]], np.int64),
        "u8": np.array([0, 255], np.uint8),
        "u16": np.array([0, 65535], np.uint16),
        "u32": np.array([0, 2**32 - 1], np.uint32),
        "u64": np.array([0, 2**64 - 1], np.uint64),
        "bool": np.array([[True, False], [False, True]]),
        "c64": np.array([1 + 2j, -3.5j], np.complex64),
        "c128": np.array([np.pi - 1j]),
        "scalar": np.array(7.25, np.float32),
        "empty": np.zeros((0, 5), np.float32),
        "empty_mid": np.zeros((3, 0, 2), np.int64),
        "nested/scope/name": np.arange(6, dtype=np.float32).reshape(2, 3),
        "unicode/ünï/名前": np.ones(1, np.float32),
    }


@pytest.mark.parametrize("as_generator", [False, True])
def test_round_trip_all_dtypes(tmp_path: Path, as_generator: bool) -> None:
    arrays = _all_dtypes()
    items = ((k, v) for k, v in reversed(arrays.items())) if as_generator else arrays
    write_bundle(tmp_path / "sub" / "ckpt", items)  # creates the directory
    with BundleReader(tmp_path / "sub" / "ckpt") as reader:
        assert reader.names() == sorted(arrays, key=lambda s: s.encode())
        for name, got in reader.items():
            want = arrays[name]
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert got.tobytes() == want.tobytes(), name


def test_round_trip_converts_layout_and_byte_order(tmp_path: Path) -> None:
    base = np.arange(20, dtype=np.float64).reshape(4, 5)
    write_bundle(tmp_path / "m", [("t", base.T), ("be", base.astype(">f8")), ("py", [1, 2])])
    with BundleReader(tmp_path / "m") as reader:
        assert np.array_equal(reader.read("t"), base.T)
        assert reader.read("be").dtype == np.dtype("<f8")
        assert np.array_equal(reader.read("be"), base)
        assert reader.read("py").dtype == np.dtype(int)


def _handle(buf: bytes, pos: int) -> tuple[int, int]:
    offset, pos = tf_bundle._varint(buf, pos, len(buf))
    return offset, tf_bundle._varint(buf, pos, len(buf))[0]


def test_round_trip_many_tensors_multi_block_index(tmp_path: Path) -> None:
    # enough long, unshared names that the index needs several 256 KiB data blocks
    rng = np.random.default_rng(1)
    names = [f"{rng.bytes(40).hex()}/{i}" for i in range(3000)]
    write_bundle(tmp_path / "m", ((n, np.full(i % 3, i, np.int32)) for i, n in enumerate(names)))
    data = (tmp_path / "m.index").read_bytes()
    footer = data[-48:]
    _, pos = tf_bundle._varint(footer, 0, 40)  # skip the metaindex handle
    _, pos = tf_bundle._varint(footer, pos, 40)
    index_block = tf_bundle._read_block(data, _handle(footer, pos), len(data) - 48)
    assert len(list(tf_bundle._block_entries(index_block))) >= 2  # data blocks
    with BundleReader(tmp_path / "m") as reader:
        assert reader.names() == sorted(names)
        for name in names[::97]:
            i = int(name.rsplit("/", 1)[1])
            assert np.array_equal(reader.read(name), np.full(i % 3, i, np.int32))


def test_write_bundle_streams_one_array_at_a_time(tmp_path: Path) -> None:
    alive: list[weakref.ref] = []

    def items() -> Iterator[tuple[str, np.ndarray]]:
        for i in range(3):
            gc.collect()
            assert all(ref() is None for ref in alive), "write_bundle kept an earlier array"
            arr = np.full((1000,), i, np.float32)
            alive.append(weakref.ref(arr))
            yield f"t{i}", arr
            del arr

    write_bundle(tmp_path / "m", items())
    with BundleReader(tmp_path / "m") as reader:
        assert [int(a[0]) for _, a in reader] == [0, 1, 2]


def test_write_bundle_leaves_nothing_on_failure(tmp_path: Path) -> None:
    def failing() -> Iterator[tuple[str, np.ndarray]]:
        yield "a", np.zeros(3)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_bundle(tmp_path / "m", failing())
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(CheckpointError) as e:
        write_bundle(tmp_path / "m", [("a", np.zeros(1)), ("a", np.ones(1))])
    _error(e, "duplicate", "'a'", tmp_path / "m")
    with pytest.raises(CheckpointError) as e:
        write_bundle(tmp_path / "m", [("s", np.array(["text"]))])
    _error(e, "unsupported dtype", "'s'")
    with pytest.raises(CheckpointError) as e:
        write_bundle(tmp_path / "m", [("", np.zeros(1))])
    _error(e, "non-empty")
    assert list(tmp_path.iterdir()) == []


# ---- missing, truncated and corrupt files -----------------------------------------------------


def test_missing_index(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        BundleReader(tmp_path / "model.ckpt")
    _error(e, "missing", tmp_path / "model.ckpt.index")
    with pytest.raises(CheckpointError) as e:
        BundleReader(tmp_path)  # a directory instead of a prefix gets a hint
    _error(e, "missing", "prefix")


def test_missing_data_shard(tmp_path: Path) -> None:
    prefix = _copy_bundle(OPENAI, tmp_path)
    data = Path(data_filename(prefix, 0, 1))
    data.unlink()
    with pytest.raises(CheckpointError) as e:
        BundleReader(prefix)
    _error(e, "missing", data)


def test_truncated_data_file(tmp_path: Path) -> None:
    prefix = _copy_bundle(OPENAI, tmp_path)
    data = Path(data_filename(prefix, 0, 1))
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 1)
    with BundleReader(prefix) as reader:  # opening only reads the index
        failures = []
        for name in reader.names():
            try:
                reader.read(name)
            except CheckpointError as exc:
                failures.append((name, str(exc)))
    assert len(failures) == 1  # only the tensor at the very end of the file
    name, msg = failures[0]
    assert "\n" not in msg
    assert f"truncated: {data} has {size - 1} bytes, tensor {name!r} needs bytes" in msg
    assert msg.endswith(f"..{size}")


def test_zero_length_files(tmp_path: Path) -> None:
    prefix = _copy_bundle(OPENAI, tmp_path)
    data = Path(data_filename(prefix, 0, 1))
    data.write_bytes(b"")
    with BundleReader(prefix) as reader, pytest.raises(CheckpointError) as e:
        reader.read("model/wte")
    _error(e, "truncated", data, "has 0 bytes", "'model/wte'")
    Path(str(prefix) + ".index").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        BundleReader(prefix)
    _error(e, "truncated", str(prefix) + ".index", "empty")


def test_flipped_byte_in_tensor_fails_crc(tmp_path: Path) -> None:
    prefix = _copy_bundle(OPENAI, tmp_path)
    data = Path(data_filename(prefix, 0, 1))
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # inside model/wte, the bulk of the file
    data.write_bytes(bytes(blob))
    with BundleReader(prefix) as reader:
        with pytest.raises(CheckpointError) as e:
            reader.read("model/wte")
        _error(e, "corrupt", "'model/wte'", data, "CRC32C")
        unchecked = reader.read("model/wte", verify=False)
        reader.read("model/wpe")  # other tensors are fine
    original = _reference(FIXTURES / "openai_tiny_reference.npz")["model/wte"]
    assert (unchecked != original).sum() == 1


def test_read_into_and_copy_tensors_give_the_bytes_read_gives() -> None:
    """``read_into`` (into a slice of a bigger array) and ``copy_tensors`` (pieces smaller than
    a tensor, CRCs checked on threads) hand out exactly the bytes ``read`` returns."""
    with BundleReader(DTYPES) as reader:
        names = [n for n in reader.names() if reader.dtype(n).kind in "fiucb"]
        for name in names:
            want = reader.read(name)
            stacked = np.zeros((3, *want.shape), want.dtype)
            reader.read_into(name, stacked[1:2].reshape(want.shape))  # a view, 0-d ones too
            assert stacked[1].tobytes() == want.tobytes() and not stacked[[0, 2]].any()
        pieces: dict[str, list[tuple[int, bytes]]] = {n: [] for n in names}
        reader.copy_tensors(
            {n: lambda off, b, n=n: pieces[n].append((off, b.tobytes())) for n in names},
            workers=2,
            piece=16,
        )
        for name in names:
            offsets = [off for off, _ in pieces[name]]
            assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
            assert b"".join(b for _, b in pieces[name]) == reader.read(name).tobytes(), name
        with pytest.raises(ValueError, match="writable C-contiguous"):
            reader.read_into(names[0], np.zeros(10**6, np.uint8))


def test_copy_tensors_fails_on_a_bad_crc_and_stops(tmp_path: Path) -> None:
    prefix = _copy_bundle(OPENAI, tmp_path)
    data = Path(data_filename(prefix, 0, 1))
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # inside model/wte
    data.write_bytes(bytes(blob))
    with BundleReader(prefix) as reader:
        names = reader.names()
        seen: set[str] = set()
        with pytest.raises(CheckpointError) as e:
            reader.copy_tensors({n: lambda off, b, n=n: seen.add(n) for n in names}, piece=4096)
        _error(e, "corrupt", "'model/wte'", data, "CRC32C")
        assert "model/wte" in seen


def test_flipped_byte_in_index(tmp_path: Path) -> None:
    prefix = _copy_bundle(OPENAI, tmp_path)
    index = Path(str(prefix) + ".index")
    good = index.read_bytes()
    blob = bytearray(good)
    blob[10] ^= 0x40  # inside the first data block
    index.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError) as e:
        BundleReader(prefix)
    _error(e, "corrupt", index, "block at offset 0 fails its CRC32C check")
    blob = bytearray(good)
    blob[-3] ^= 0x01  # the magic number
    index.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError) as e:
        BundleReader(prefix)
    _error(e, "corrupt", index, "bad magic number")


def test_every_corruption_of_the_index_is_a_clean_error(tmp_path: Path) -> None:
    # any flipped byte or truncation: a CheckpointError, or (footer padding, which TF ignores
    # too) the same tensors -- never another exception
    prefix = _copy_bundle(DTYPES, tmp_path)
    good = Path(str(prefix) + ".index").read_bytes()
    with BundleReader(prefix) as reader:
        expected = {n: a.tobytes() for n, a in reader.items()}
    variants = [good[:n] for n in range(0, len(good), 7)]
    variants += [good[:i] + bytes([good[i] ^ 0x10]) + good[i + 1 :] for i in range(len(good))]
    clean = 0
    for i, blob in enumerate(variants):
        # a fresh file per variant (overwriting a file in place is slow on ext4), same data
        variant = tmp_path / f"v{i}"
        index = Path(str(variant) + ".index")
        index.write_bytes(blob)
        os.link(data_filename(prefix, 0, 1), data_filename(variant, 0, 1))
        try:
            with BundleReader(variant) as reader:
                assert {n: a.tobytes() for n, a in reader.items()} == expected
            clean += 1
        except CheckpointError as exc:
            assert str(index) in str(exc) and "\n" not in str(exc)
    assert clean < 40  # at most the footer's padding bytes


def test_garbage_index(tmp_path: Path) -> None:
    prefix = tmp_path / "model.ckpt"
    index = tmp_path / "model.ckpt.index"
    index.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(CheckpointError) as e:
        BundleReader(prefix)
    _error(e, "corrupt", index, "bad magic number")
    index.write_bytes(b"short")
    with pytest.raises(CheckpointError) as e:
        BundleReader(prefix)
    _error(e, "corrupt", index, "footer")


# ---- hand-made indexes: hostile or unsupported entries ------------------------------------------


def _entry(dtype: int, shape: tuple[int, ...], size: int, *, offset: int = 0, sliced: bool = False):
    return tf_bundle._Entry(dtype, shape, 0, offset, size, 0, sliced)


def _write_index(prefix: Path, entries: dict[str, bytes], header: bytes | None = None) -> Path:
    """A bundle whose index holds exactly ``entries`` (serialized BundleEntryProtos)."""
    write_bundle(prefix, [("placeholder", np.zeros(4, np.float32))])  # a real 16-byte data file
    records = [(b"", tf_bundle._encode_header() if header is None else header)]
    records += sorted((k.encode(), v) for k, v in entries.items())
    index = Path(str(prefix) + ".index")
    index.write_bytes(tf_bundle._build_table(records))
    return index


def test_hostile_sizes_never_allocate(tmp_path: Path) -> None:
    enc = tf_bundle._encode_entry
    huge = (1 << 20, 1 << 20, 1 << 10)  # 2**50 float32 elements: 4 PiB
    _write_index(
        tmp_path / "m",
        {
            "consistent": enc(_entry(1, huge, 4 << 50)),
            "mismatch": enc(_entry(1, huge, 16)),
            "far_offset": enc(_entry(1, (4,), 16, offset=1 << 60)),
        },
    )
    data = data_filename(tmp_path / "m", 0, 1)
    tracemalloc.start()
    try:
        with BundleReader(tmp_path / "m") as reader:
            assert reader.shape("consistent") == huge
            with pytest.raises(CheckpointError) as e:
                reader.read("consistent")
            _error(e, "truncated", data, "has 16 bytes", f"needs bytes 0..{4 << 50}")
            with pytest.raises(CheckpointError) as e:
                reader.read("mismatch")
            _error(e, "corrupt", "'mismatch'", "size 16 bytes", f"needs {4 << 50}")
            with pytest.raises(CheckpointError) as e:
                reader.read("far_offset")
            _error(e, "truncated", data, f"bytes {1 << 60}..")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_malformed_entries_are_corrupt(tmp_path: Path) -> None:
    index = tmp_path / "m.index"
    negative_size = tf_bundle._tag(1, 0) + b"\x01" + tf_bundle._tag(5, 0) + b"\xff" * 9 + b"\x01"
    _write_index(tmp_path / "m", {"neg": negative_size})
    with pytest.raises(CheckpointError) as e:
        BundleReader(tmp_path / "m")
    _error(e, "corrupt", index, "negative")
    _write_index(tmp_path / "m", {"deep": tf_bundle._encode_entry(_entry(1, (1,) * 300, 4))})
    with pytest.raises(CheckpointError) as e:
        BundleReader(tmp_path / "m")
    _error(e, "corrupt", index, "dimensions")
    _write_index(tmp_path / "m", {"cut": tf_bundle._encode_entry(_entry(1, (4,), 16))[:-1]})
    with pytest.raises(CheckpointError) as e:
        BundleReader(tmp_path / "m")
    _error(e, "corrupt", index, "truncated")


def test_unsupported_entries(tmp_path: Path) -> None:
    enc = tf_bundle._encode_entry
    _write_index(
        tmp_path / "m",
        {
            "string": enc(_entry(7, (2,), 10)),
            "partitioned": enc(_entry(1, (4,), 0, sliced=True)),
            "resource": enc(_entry(20, (), 0)),
            "ok": enc(_entry(1, (4,), 16)),
        },
    )
    with BundleReader(tmp_path / "m") as reader:
        for name, what in [
            ("string", "dtype string"),
            ("partitioned", "partitioned"),
            ("resource", "dtype resource"),
        ]:
            with pytest.raises(CheckpointError) as e:
                reader.read(name)
            _error(e, "unsupported", f"{name!r}", what, tmp_path / "m.index")
        with pytest.raises(CheckpointError) as e:
            reader.read("nope")
        _error(e, "missing", "'nope'")
        assert reader.read("ok", verify=False).shape == (4,)  # crc 0 was written: unchecked


def test_partitioned_entries_sliced_field(tmp_path: Path) -> None:
    # a real "slices" field (7), as TF writes for partitioned variables
    raw = tf_bundle._encode_entry(_entry(1, (4,), 0)) + tf_bundle._tag(7, 2) + b"\x00"
    _write_index(tmp_path / "m", {"p": raw})
    with BundleReader(tmp_path / "m") as reader, pytest.raises(CheckpointError) as e:
        reader.read("p")
    _error(e, "unsupported", "partitioned")


def test_big_endian_and_newer_bundles(tmp_path: Path) -> None:
    index = tmp_path / "m.index"
    big = tf_bundle._encode_header() + tf_bundle._tag(2, 0) + b"\x01"
    _write_index(tmp_path / "m", {}, header=big)
    with pytest.raises(CheckpointError) as e:
        BundleReader(tmp_path / "m")
    _error(e, "unsupported", index, "big-endian")
    version = tf_bundle._tag(1, 0) + b"\x05" + tf_bundle._tag(2, 0) + b"\x05"  # min_consumer 5
    newer = tf_bundle._tag(1, 0) + b"\x01" + tf_bundle._tag(3, 2) + bytes([len(version)]) + version
    _write_index(tmp_path / "m", {}, header=newer)
    with pytest.raises(CheckpointError) as e:
        BundleReader(tmp_path / "m")
    _error(e, "unsupported", index, "version")


def test_snappy_block_is_unsupported(tmp_path: Path) -> None:
    index = _write_index(tmp_path / "m", {})
    blob = bytearray(index.read_bytes())
    # the first block's trailer: flip its type byte to 1 (Snappy) and re-seal its CRC
    size = tf_bundle._varint(blob[-48:], 0, 40)[0]  # metaindex offset == end of the data block
    block_len = size - 5
    blob[block_len] = 1
    crc = tf_bundle.mask(tf_bundle.crc32c(bytes(blob[: block_len + 1])))
    blob[block_len + 1 : block_len + 5] = crc.to_bytes(4, "little")
    index.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError) as e:
        BundleReader(tmp_path / "m")
    _error(e, "unsupported", index, "Snappy")
