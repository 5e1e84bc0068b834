"""gpt2jax/formats/safetensors_io.py against the reference ``safetensors`` package, and on bad
files."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from gpt2jax.errors import CheckpointError
from gpt2jax.formats import safetensors_io as st

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """One tensor of every dtype both implementations handle in numpy, odd shapes included."""
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "f64": rng.standard_normal((2, 1, 3)),
        "i64": rng.integers(-(2**62), 2**62, (4,), dtype=np.int64),
        "i32": rng.integers(-1000, 1000, (2, 2), dtype=np.int32),
        "u8": rng.integers(0, 255, (9,), dtype=np.uint8),
        "bool": rng.random((5,)) > 0.5,
        "scalar": np.array(3.25, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "a.dotted/name": rng.standard_normal((1,)).astype(np.float32),
    }


def _assert_bitwise(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def test_ours_reads_what_safetensors_writes(tmp_path):
    tensors = _tensors()
    safetensors_numpy.save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "np"})
    f = st.SafetensorsFile(tmp_path / "ref.safetensors")
    assert f.metadata == {"format": "np"}
    _assert_bitwise(dict(f.items()), tensors)


def test_safetensors_reads_what_ours_writes(tmp_path):
    tensors = _tensors(1)
    st.save_file(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt", "k": "v"})
    _assert_bitwise(safetensors_numpy.load_file(tmp_path / "ours.safetensors"), tensors)
    from safetensors import safe_open

    with safe_open(tmp_path / "ours.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


def test_bfloat16_and_float16_match_safetensors_torch_bitwise(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load
    from safetensors.torch import save_file as torch_save

    rng = np.random.default_rng(2)
    f32 = rng.standard_normal((6, 11)).astype(np.float32) * 100
    ours = {"bf16": f32.astype(ml_dtypes.bfloat16), "f16": f32.astype(np.float16)}
    st.save_file(ours, tmp_path / "ours.safetensors")
    loaded = torch_load(tmp_path / "ours.safetensors")
    assert loaded["bf16"].dtype == torch.bfloat16 and loaded["f16"].dtype == torch.float16
    for k in ours:
        raw = loaded[k].view(torch.int16).numpy()
        assert raw.tobytes() == ours[k].tobytes(), k

    ref = {
        "bf16": torch.from_numpy(f32).to(torch.bfloat16),
        "f16": torch.from_numpy(f32).to(torch.float16),
    }
    torch_save(ref, tmp_path / "ref.safetensors")
    back = st.load_file(tmp_path / "ref.safetensors")
    assert back["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert back["f16"].dtype == np.float16
    for k in ref:
        assert back[k].tobytes() == ref[k].view(torch.int16).numpy().tobytes(), k


def test_streaming_write_from_a_generator(tmp_path):
    tensors = _tensors(3)
    specs = [(k, v.dtype, v.shape) for k, v in tensors.items()]
    produced = []

    def stream():
        for k, v in tensors.items():
            produced.append(k)
            yield k, v

    size = st.write_file(tmp_path / "s.safetensors", specs, stream())
    assert size == os.path.getsize(tmp_path / "s.safetensors")
    assert produced == list(tensors)
    _assert_bitwise(st.load_file(tmp_path / "s.safetensors"), tensors)
    (n,) = struct.unpack("<Q", (tmp_path / "s.safetensors").read_bytes()[:8])
    assert n % 8 == 0  # data section 8-byte aligned, like the reference writer


def test_big_endian_input_is_stored_little_endian(tmp_path):
    x = np.arange(6, dtype=">f4").reshape(2, 3)
    st.save_file({"x": x}, tmp_path / "be.safetensors")
    got = safetensors_numpy.load_file(tmp_path / "be.safetensors")["x"]
    np.testing.assert_array_equal(got, x)


def test_reads_are_memory_mapped_read_only_views(tmp_path):
    st.save_file({"x": np.ones((4, 4), np.float32)}, tmp_path / "m.safetensors")
    x = st.SafetensorsFile(tmp_path / "m.safetensors").get("x")
    assert not x.flags.writeable
    assert not x.flags.owndata


@pytest.mark.parametrize(
    "bad",
    [
        lambda specs: [("b", *specs[0][1:])] + specs[1:],  # wrong name
        lambda specs: [(specs[0][0], np.float64, specs[0][2])] + specs[1:],  # wrong dtype
        lambda specs: [(specs[0][0], specs[0][1], (99,))] + specs[1:],  # wrong shape
        lambda specs: specs + [("extra", np.float32, (1,))],  # never written
        lambda specs: specs[:1],  # one too many yielded
    ],
)
def test_streaming_write_refuses_a_stream_that_disagrees_with_the_header(tmp_path, bad):
    tensors = {"a": np.ones((2,), np.float32), "c": np.zeros((3,), np.float32)}
    specs = bad([(k, v.dtype, v.shape) for k, v in tensors.items()])
    with pytest.raises(CheckpointError, match="x.safetensors"):
        st.write_file(tmp_path / "x.safetensors", specs, tensors.items())
    assert os.listdir(tmp_path) == []  # no partial file and no temporary left behind


def _file(tmp_path, header: dict | bytes, data: bytes, length: int | None = None) -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        (b"", b"", 1 << 40, "header length"),
        ({"a": _entry()}, bytes(8), 10_000, "header length"),
        (b"{not json", b"", None, "not valid UTF-8 JSON"),
        (b"\xff\xfe{}", b"", None, "not valid UTF-8 JSON"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', bytes(8),
         None, "twice"),
        ({"a": _entry(dtype="F128")}, bytes(8), None, "unknown dtype"),
        ({"a": _entry(shape=(3,))}, bytes(8), None, "needs 12 bytes"),
        ({"a": _entry(shape=(-2,))}, bytes(8), None, "not a list of sizes"),
        ({"a": _entry(shape=(True, 2))}, bytes(8), None, "not a list of sizes"),
        ({"a": _entry(offsets=(0,))}, bytes(8), None, "not \\[begin, end\\]"),
        ({"a": _entry(offsets=(8, 0))}, bytes(8), None, "span -8"),
        ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), None, "exactly dtype"),
        ({"a": _entry(), "b": _entry(offsets=(4, 12))}, bytes(12), None, "contiguous"),
        ({"a": _entry(), "b": _entry(offsets=(12, 20))}, bytes(20), None, "contiguous"),
        ({"a": _entry(offsets=(4, 12))}, bytes(12), None, "contiguous"),
        ({"a": _entry()}, bytes(4), None, "truncated file"),
        ({"a": _entry()}, bytes(9), None, "trailing bytes"),
        ({"__metadata__": {"k": 1}, "a": _entry()}, bytes(8), None, "__metadata__"),
    ],
)  # fmt: skip
def test_corrupt_files_are_refused_naming_the_file(tmp_path, header, data, length, message):
    path = _file(tmp_path, header, data, length)
    with pytest.raises(CheckpointError, match=message) as err:
        st.SafetensorsFile(path)
    assert path in str(err.value) and "\n" not in str(err.value)


def test_truncated_and_missing_files(tmp_path):
    st.save_file({"x": np.ones((16,), np.float32)}, tmp_path / "ok.safetensors")
    raw = (tmp_path / "ok.safetensors").read_bytes()
    for cut in (0, 5, 8, 20, len(raw) - 1):
        (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="cut.safetensors"):
            st.SafetensorsFile(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="file not found"):
        st.SafetensorsFile(tmp_path / "nope.safetensors")


def test_unknown_tensor_and_unstorable_dtype(tmp_path):
    st.save_file({"x": np.ones((1,), np.float32)}, tmp_path / "ok.safetensors")
    with pytest.raises(CheckpointError, match="no tensor named 'y'"):
        st.SafetensorsFile(tmp_path / "ok.safetensors").get("y")
    with pytest.raises(CheckpointError, match="cannot be stored"):
        st.save_file({"s": np.array(["a"])}, tmp_path / "s.safetensors")
