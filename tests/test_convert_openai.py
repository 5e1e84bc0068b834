"""OpenAI TF checkpoints (written by real TensorFlow, see scripts/make_tf_fixture.py) convert
exactly, and bad checkpoints fail with one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import gpt2jax
from conftest import FIXTURES, hf_model
from gpt2jax.cli.main import main as cli_main
from gpt2jax.convert import mapping
from gpt2jax.convert.openai_tf import read_openai_dir

SRC = FIXTURES / "openai_tiny"


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "openai_tiny_reference.npz"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert cli_main(["convert", str(SRC), str(dst)]) == 0
    return dst


def test_reader_returns_the_arrays_tensorflow_saved(reference):
    config, params = read_openai_dir(SRC)
    flat = dict(mapping.to_theirs(params, config, "openai"))
    saved = {k: v for k, v in reference.items() if not k.startswith("__")}
    assert flat.keys() == saved.keys()
    for name, value in saved.items():
        assert flat[name].dtype == value.dtype and flat[name].shape == value.shape
        np.testing.assert_array_equal(flat[name], value, err_msg=name)


def test_converted_logits_equal_tensorflow_and_transformers(converted, reference):
    torch = pytest.importorskip("torch")
    model = gpt2jax.load(converted)
    tokens = reference["__tokens__"]
    ours = np.asarray(model.logits(tokens))
    np.testing.assert_allclose(ours, reference["__logits__"], atol=1e-4, rtol=0)
    with torch.no_grad():
        theirs = hf_model(model.params, model.config)(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_model_dir_and_openai_dir_load_the_same(converted):
    a, b = gpt2jax.load(converted), gpt2jax.load(SRC)
    assert (a.kind, b.kind) == ("gpt2jax", "openai")
    assert a.config == b.config
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    ids = a.encode("Hello world")
    assert a.logits(ids).shape == (len(ids), 50257)
    assert a.decode(ids) == "Hello world"
    assert sorted(os.listdir(converted)) == ["config.json", "encoder.json", "params", "vocab.bpe"]


def test_load_in_bfloat16(converted):
    m = gpt2jax.load(converted, dtype="bfloat16")
    assert {x.dtype.name for x in jax.tree.leaves(m.params)} == {"bfloat16"}


def test_info(converted, capsys):
    assert cli_main(["info", str(converted), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "gpt2jax" and info["num_params"] == 607_224
    assert info["config"]["n_layer"] == 2 and info["dtype"] == "float32"
    assert info["source"]["format"] == "openai-tf"
    assert cli_main(["info", str(SRC)]) == 0
    assert "607,224" in capsys.readouterr().out


def _leaves(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in mapping.flatten(params).items()}


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_streamed_conversion_equals_the_in_memory_read_and_restores_with_plain_orbax(
    tmp_path, dtype
):
    """``convert`` streams the tensors into an orbax layout written directly: restored by
    orbax's own API (no gpt2jax code) and by ``gpt2jax.load``, the parameters are bitwise those
    of ``read_openai_dir`` (checked against TensorFlow above), cast as numpy casts."""
    import orbax.checkpoint as ocp

    from gpt2jax.convert.openai_tf import convert_openai_dir
    from gpt2jax.dtypes import DTYPES

    dst = tmp_path / "ckpt"
    convert_openai_dir(SRC, dst, dtype=DTYPES[dtype])
    _, params = read_openai_dir(SRC, dtype=DTYPES[dtype])
    want = _leaves(params)
    with ocp.StandardCheckpointer() as ckptr:
        _assert_bitwise(_leaves(ckptr.restore(str(dst / "params"))), want)
    _assert_bitwise(_leaves(gpt2jax.load(dst).params), want)
    meta = json.loads((dst / "config.json").read_text())
    assert meta["dtype"] == dtype and meta["num_params"] == sum(v.size for v in want.values())


def test_conversion_with_numpy_crc_threads_writes_the_same_files(tmp_path, monkeypatch):
    """The CRC32C path without google_crc32c (numpy, on threads) gives the same directory;
    and ``read_openai_dir`` reading into place equals reading each tensor and copying it."""
    from gpt2jax.convert.openai_tf import convert_openai_dir
    from gpt2jax.formats import crc32c
    from gpt2jax.formats.tf_bundle import BundleReader

    def files(root):
        return {
            p.relative_to(root): p.read_bytes()
            for p in sorted((root / "params").rglob("*"))
            if p.is_file() and not p.name.startswith("_")  # timestamps
        }

    convert_openai_dir(SRC, tmp_path / "a")
    monkeypatch.setattr(crc32c, "_google_crc32c", None)
    convert_openai_dir(SRC, tmp_path / "b")
    assert files(tmp_path / "a") == files(tmp_path / "b") and len(files(tmp_path / "a")) == 32
    config, params = read_openai_dir(SRC)
    with BundleReader(SRC / "model.ckpt") as reader:
        copied = mapping.from_theirs(reader.read, config, "openai")
    _assert_bitwise(_leaves(params), _leaves(copied))


def test_convert_imports_neither_jax_nor_orbax(tmp_path):
    """The command imports what it needs: no jax, orbax, flax or ml_dtypes for float32."""
    code = (
        "import sys\n"
        "from gpt2jax.cli.main import main\n"
        f"assert main(['convert', {str(SRC)!r}, {str(tmp_path / 'out')!r}]) == 0\n"
        "print(sorted(m for m in ('jax', 'orbax', 'flax', 'ml_dtypes', 'optax') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_refuses_to_overwrite(converted, capsys):
    assert cli_main(["convert", str(SRC), str(converted)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_every_subcommand_has_help():
    from gpt2jax.cli.main import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"convert", "info"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([name, "--help"])
        assert e.value.code == 0
    out = subprocess.run(
        [sys.executable, "-m", "gpt2jax", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "convert" in out and "info" in out


def _copy(tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(SRC, dst)
    return dst


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _disagreeing_hparams(path):
    h = json.loads((path / "hparams.json").read_text())
    h["n_embd"] = 15
    (path / "hparams.json").write_text(json.dumps(h))


BAD = {
    "missing dir": (lambda d: shutil.rmtree(d), "no such file or directory"),
    "not a checkpoint": (
        lambda d: [os.remove(d / f) for f in os.listdir(d) if f != "encoder.json"],
        "not a model directory",
    ),
    "missing data shard": (
        lambda d: os.remove(d / "model.ckpt.data-00000-of-00001"),
        "model.ckpt.data-00000-of-00001",
    ),
    "truncated data": (lambda d: _truncate(d / "model.ckpt.data-00000-of-00001"), "truncated"),
    "flipped byte": (
        lambda d: _flip_byte(d / "model.ckpt.data-00000-of-00001", 1000),
        "CRC32C",
    ),
    "hparams disagree": (_disagreeing_hparams, "hparams.json"),
    "missing hparams": (lambda d: os.remove(d / "hparams.json"), "hparams.json"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_fail_with_one_clear_line(tmp_path, case):
    break_it, expected = BAD[case]
    src = _copy(tmp_path)
    break_it(src)
    dst = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2jax", "convert", str(src), str(dst)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpt2jax convert: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
