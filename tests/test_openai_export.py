"""Export back to an OpenAI-style TF checkpoint directory (convert/openai_export.py)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import FIXTURES, TINY, random_params
from gpt2jax.cli.main import main as cli_main
from gpt2jax.convert import mapping
from gpt2jax.convert.openai_export import export_openai
from gpt2jax.convert.openai_tf import checkpoint_prefix, read_openai_dir
from gpt2jax.errors import ConfigError, Gpt2JaxError
from gpt2jax.formats.tf_bundle import BundleReader

SRC = FIXTURES / "openai_tiny"
FILES = ["checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001"]
FILES += ["model.ckpt.index", "vocab.bpe"]


def _assert_tree_bitwise(a, b) -> None:
    fa, fb = mapping.flatten(a), mapping.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        assert np.asarray(fa[k]).tobytes() == np.asarray(fb[k]).tobytes(), k


def test_fixture_round_trip_reproduces_tensorflows_files_byte_for_byte(tmp_path):
    """TF checkpoint -> our params -> export: every file TensorFlow's Saver wrote (index and
    data included) comes back identical, except model.ckpt.meta, which we do not write."""
    config, params = read_openai_dir(SRC)
    out = tmp_path / "openai"
    assert export_openai(params, config, out, tokenizer_dir=SRC) == FILES
    for name in FILES:
        assert (out / name).read_bytes() == (SRC / name).read_bytes(), name
    assert not (out / "model.ckpt.meta").exists()


def test_random_params_round_trip_through_bundle_reader(tmp_path):
    params = random_params(TINY, 11)
    out = tmp_path / "openai"
    export_openai(params, TINY, out)
    assert checkpoint_prefix(str(out)) == str(out / "model.ckpt")  # via the checkpoint file
    with BundleReader(out / "model.ckpt") as reader:
        expected = mapping.their_shapes(TINY, "openai")
        assert sorted(reader.names()) == sorted(expected)
        for name, shape in expected.items():
            assert reader.shape(name) == shape and reader.dtype(name) == np.float32
        assert reader.read("model/h2/mlp/c_fc/w")[0].tobytes() == (
            params["h"]["mlp"]["c_fc"]["w"][2].tobytes()
        )
    config, back = read_openai_dir(out)
    assert config == TINY
    _assert_tree_bitwise(params, back)
    assert json.loads((out / "hparams.json").read_text()) == TINY.to_hparams()
    # no tokenizer directory given: GPT-2's files are rebuilt, identical to OpenAI's
    for name in ("encoder.json", "vocab.bpe"):
        assert (out / name).read_bytes() == (SRC / name).read_bytes()


def test_bfloat16_params_are_stored_as_float32(tmp_path):
    params = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), random_params(TINY, 12))
    export_openai(params, TINY, tmp_path / "o", tokenizer_dir=SRC)
    _, back = read_openai_dir(tmp_path / "o")
    assert back["wte"].dtype == np.float32
    _assert_tree_bitwise(jax.tree.map(lambda x: x.astype(np.float32), params), back)


def test_refuses_what_openais_code_cannot_run(tmp_path):
    config = dataclasses.replace(TINY, layer_norm_epsilon=1e-6)
    with pytest.raises(ConfigError, match="epsilon"):
        export_openai(random_params(config), config, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(Gpt2JaxError, match="already exists"):
        export_openai(random_params(TINY), TINY, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_cli_and_script(tmp_path, capsys):
    from gpt2jax.cli.main import script_main

    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "openai"
    assert cli_main(["convert", str(SRC), ckpt]) == 0
    assert cli_main(["export", ckpt, str(out), "--format", "openai", "--dtype", "bfloat16"]) == 1
    assert "float32" in capsys.readouterr().err
    assert script_main("openai_export", [ckpt, str(out)]) == 0
    assert sorted(os.listdir(out)) == FILES
    for name in FILES:
        assert (out / name).read_bytes() == (SRC / name).read_bytes(), name
