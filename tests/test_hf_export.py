"""Export to Hugging Face / PyTorch and import back (convert/hf.py), checked with transformers."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from contextlib import contextmanager

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import FIXTURES, TINY, TOKENIZER_DIR, hf_model, random_params
from gpt2jax.cli.main import main as cli_main
from gpt2jax.config import GPT2Config
from gpt2jax.convert import hf, mapping
from gpt2jax.convert.hf_tokenizer import HF_NAMES, OPENAI_NAMES
from gpt2jax.dtypes import DTYPES
from gpt2jax.errors import CheckpointError, ConfigError, Gpt2JaxError
from gpt2jax.formats.safetensors_io import SafetensorsFile, load_file, save_file
from gpt2jax.model import GPT2
from gpt2jax.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

#: Full vocabulary (so transformers has nothing at all to warn about), everything else tiny.
VOCAB = GPT2Config(n_vocab=50257, n_ctx=19, n_embd=12, n_head=3, n_layer=2)


def _export(tmp_path, params=None, config=TINY, name="hf", **kwargs) -> str:
    out = str(tmp_path / name)
    kwargs.setdefault("tokenizer_dir", TOKENIZER_DIR)
    hf.export_hf(random_params(config, 1) if params is None else params, config, out, **kwargs)
    return out


def _ours(params, config, ids) -> np.ndarray:
    return np.asarray(GPT2(config).apply({"params": params}, ids))


def _theirs(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids))).logits.float().numpy()


def _assert_tree_bitwise(a, b) -> None:
    fa, fb = mapping.flatten(a), mapping.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        assert np.asarray(fa[k]).tobytes() == np.asarray(fb[k]).tobytes(), k


@contextmanager
def _transformers_messages():
    """Collects everything transformers logs at WARNING or above, and Python warnings."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("transformers")
    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)


def _load(path, **kwargs):
    """``from_pretrained`` with its loading report; fails on any weight the load did not match."""
    with _transformers_messages() as messages:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, output_loading_info=True, **kwargs
        )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and not info["error_msgs"], info
    words = ("missing", "unexpected", "newly initialized", "load report", "tie", "not used")
    weight_warnings = [m for m in messages if any(w in m.lower() for w in words)]
    assert not weight_warnings, weight_warnings
    assert type(model).__name__ == "GPT2LMHeadModel"
    return model.eval(), messages


# ---- round trips -----------------------------------------------------------------------------


def test_export_then_import_is_bitwise(tmp_path):
    params = random_params(TINY, 3)
    out = _export(tmp_path, params)
    assert sorted(os.listdir(out)) == [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "tokenizer_config.json",
        "vocab.json",
    ]
    config, back = hf.read_hf_dir(out)
    assert config == TINY
    _assert_tree_bitwise(params, back)


def test_layout_matches_what_transformers_save_pretrained_writes(tmp_path):
    """Same keys, shapes and dtypes as ``GPT2LMHeadModel.save_pretrained`` (which leaves the
    tied ``lm_head.weight`` out), the same ``format`` metadata, and a config.json with the
    same values for every key we write that transformers writes too."""
    params = random_params(TINY, 4)
    ref_dir = tmp_path / "ref"
    hf_model(params, TINY).save_pretrained(ref_dir)
    ours = SafetensorsFile(os.path.join(_export(tmp_path, params), "model.safetensors"))
    ref = SafetensorsFile(ref_dir / "model.safetensors")
    assert "lm_head.weight" not in ref.names()
    assert sorted(ours.names()) == sorted(ref.names())
    for name in ref.names():
        assert (ours.shape(name), ours.dtype(name)) == (ref.shape(name), ref.dtype(name)), name
        assert ours.get(name).tobytes() == ref.get(name).tobytes(), name
    assert ours.metadata == ref.metadata == {"format": "pt"}
    ref_cfg = json.loads((ref_dir / "config.json").read_text())
    our_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    shared = set(ref_cfg) & set(our_cfg) - {"transformers_version"}
    assert {"vocab_size", "n_positions", "n_embd", "dtype", "tie_word_embeddings"} <= shared
    assert {k: our_cfg[k] for k in shared} == {k: ref_cfg[k] for k in shared}


@pytest.mark.parametrize(
    "fmt, dtype, shard",
    [
        ("safetensors", "float32", None),
        ("safetensors", "float32", "20KB"),
        ("bin", "float32", None),
        ("bin", "float32", "30KB"),
        ("safetensors", "bfloat16", None),
        ("safetensors", "float16", "15KB"),
        ("bin", "bfloat16", None),
    ],
)
def test_transformers_loads_export_cleanly_and_logits_match(tmp_path, fmt, dtype, shard):
    params = random_params(TINY, 5)
    kwargs = {"max_shard_size": shard} if shard else {}
    out = _export(tmp_path, params, fmt=fmt, dtype=dtype, **kwargs)
    files = os.listdir(out)
    weights = [f for f in files if f.endswith((".safetensors", ".bin"))]
    if shard:
        assert len(weights) > 1 and hf.WEIGHTS[fmt] + ".index.json" in files
        index = json.loads(open(os.path.join(out, hf.WEIGHTS[fmt] + ".index.json")).read())
        assert sorted(set(index["weight_map"].values())) == sorted(weights)
        assert index["metadata"]["total_size"] == TINY.num_params() * (
            4 if dtype == "float32" else 2
        )
    else:
        assert weights == [hf.WEIGHTS[fmt]]

    # transformers keeps the stored dtype by default ...
    model, _ = _load(out)
    assert model.dtype == getattr(torch, dtype)
    # ... and upcast to float32 its logits must equal ours on the same rounded weights.
    model, _ = _load(out, dtype=torch.float32)
    rounded = jax.tree.map(lambda x: x.astype(DTYPES[dtype]).astype(np.float32), params)
    ids = np.random.default_rng(0).integers(0, TINY.n_vocab, (2, 13))
    np.testing.assert_allclose(_theirs(model, ids), _ours(rounded, TINY, ids), atol=1e-4, rtol=0)
    if dtype != "float32":
        assert not np.array_equal(rounded["wte"], params["wte"])  # the cast really happened

    config, back = hf.read_hf_dir(out)
    _assert_tree_bitwise(rounded, back)


def test_full_vocab_export_loads_with_no_warning_at_all(tmp_path):
    out = _export(tmp_path, config=VOCAB)
    _, messages = _load(out)
    assert messages == []
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 50256


def test_openai_tf_fixture_to_transformers_matches_tf_reference_logits(tmp_path):
    """OpenAI TF checkpoint -> gpt2jax convert -> gpt2jax export -> transformers: the logits
    TensorFlow computed from the original checkpoint."""
    ref = np.load(FIXTURES / "openai_tiny_reference.npz")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert cli_main(["convert", str(FIXTURES / "openai_tiny"), ckpt]) == 0
    assert cli_main(["export", ckpt, out]) == 0
    model, messages = _load(out)
    assert messages == []
    logits = _theirs(model, ref["__tokens__"].astype(np.int64))
    np.testing.assert_allclose(logits, ref["__logits__"], atol=1e-4, rtol=0)


# ---- tokenizer and config --------------------------------------------------------------------

TEXTS = [
    "Hello world",
    "  leading and   runs of   spaces\t\ttabs\n\n\nnewlines \r\n crlf   ",
    "héllo wörld — naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🤗🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "text<|endoftext|>next document<|endoftext|> <|endoftext|>",
    "I'm sure they'll've done it; we're 'quoted' don't",
    "numbers 1234567890 3.14159 0xdeadbeef",
    "\u00a0\u2003\u200b odd spaces",
    "",
    "   ",
    "<|endoftext|>",
]


def test_autotokenizer_encodes_like_ours(tmp_path):
    out = _export(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_dir(TOKENIZER_DIR)
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids, text
        assert theirs.decode(ids) == text, text


def test_tokenizer_files_are_openais_byte_for_byte(tmp_path):
    out = _export(tmp_path)
    for theirs, ours in zip(HF_NAMES, OPENAI_NAMES, strict=True):
        assert open(os.path.join(out, theirs), "rb").read() == (TOKENIZER_DIR / ours).read_bytes()


def test_tokenizer_files_rebuilt_from_tiktoken_when_the_model_has_none(tmp_path):
    out = _export(tmp_path, tokenizer_dir=tmp_path)  # a directory with no tokenizer files
    for theirs, ours in zip(HF_NAMES, OPENAI_NAMES, strict=True):
        assert open(os.path.join(out, theirs), "rb").read() == (TOKENIZER_DIR / ours).read_bytes()


def test_config_round_trips_through_transformers(tmp_path):
    config = GPT2Config(
        n_vocab=101, n_ctx=17, n_embd=24, n_head=4, n_layer=3, layer_norm_epsilon=3e-6
    )
    out = _export(tmp_path, config=config)
    theirs = transformers.GPT2Config.from_pretrained(out)
    assert (theirs.vocab_size, theirs.n_positions, theirs.n_embd) == (101, 17, 24)
    assert (theirs.n_head, theirs.n_layer, theirs.layer_norm_epsilon) == (4, 3, 3e-6)
    assert theirs.activation_function == "gelu_new" and theirs.tie_word_embeddings
    assert theirs.model_type == "gpt2" and theirs.architectures == ["GPT2LMHeadModel"]
    assert theirs.bos_token_id == theirs.eos_token_id == 50256
    theirs.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert GPT2Config.from_hf_config(resaved) == config
    assert GPT2Config.from_hf_config(theirs.to_dict()) == config


# ---- import ----------------------------------------------------------------------------------


def test_import_what_transformers_saves_including_tokenizer_json(tmp_path):
    """A directory from ``save_pretrained`` (model and tokenizer: transformers 5 writes only
    tokenizer.json) -> gpt2jax convert -> load: the same logits, OpenAI's tokenizer files."""
    params = random_params(VOCAB, 6)
    src = tmp_path / "saved"
    hf_model(params, VOCAB).save_pretrained(src)
    tokenizer = transformers.AutoTokenizer.from_pretrained(_export(tmp_path, config=VOCAB))
    tokenizer.save_pretrained(src)
    dst = str(tmp_path / "ckpt")
    assert cli_main(["convert", str(src), dst]) == 0
    for name in ("encoder.json", "vocab.bpe"):
        assert open(os.path.join(dst, name), "rb").read() == (TOKENIZER_DIR / name).read_bytes()
    from gpt2jax import loader as pretrained

    model = pretrained.load(dst)
    _assert_tree_bitwise(model.params, params)
    direct = pretrained.load(src)  # and straight from the HF directory
    text = "<|endoftext|> naïve 🤗"
    assert direct.kind == "hf"
    assert direct.encode(text).tolist() == Tokenizer.from_dir(TOKENIZER_DIR).encode(text)
    ids = direct.encode("The quick brown fox")
    np.testing.assert_array_equal(direct.logits(ids), model.logits(ids))


def test_old_layout_without_prefix_with_mask_buffers_and_lm_head(tmp_path):
    """The original hub upload: GPT2Model keys (no "transformer."), attn.bias/masked_bias
    buffers, and lm_head.weight equal to wte."""
    params = random_params(TINY, 7)
    src = _export(tmp_path, params)
    tensors = {k[len(hf.PREFIX) :]: v for k, v in load_file(f"{src}/model.safetensors").items()}
    for i in range(TINY.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, TINY.n_ctx, TINY.n_ctx), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"]
    os.remove(f"{src}/model.safetensors")
    save_file(tensors, f"{src}/model.safetensors", {"format": "pt"})
    _, back = hf.read_hf_dir(src)
    _assert_tree_bitwise(params, back)

    # the same as a legacy (pre-zip) pytorch_model.bin
    os.remove(f"{src}/model.safetensors")
    state = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    torch.save(state, f"{src}/pytorch_model.bin", _use_new_zipfile_serialization=False)
    _, back = hf.read_hf_dir(src)
    _assert_tree_bitwise(params, back)


# ---- bad input -------------------------------------------------------------------------------


def _edit_weights(path: str, edit) -> None:
    tensors = {k: np.array(v) for k, v in load_file(f"{path}/model.safetensors").items()}
    edit(tensors)
    save_file(tensors, f"{path}/model.safetensors", {"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), "missing 1 tensors.*h.1.mlp.c_fc.bias"),
        (lambda t: t.update({"score.weight": np.zeros((2, 30), np.float32)}), "unexpected.*score"),
        (
            lambda t: t.update({"transformer.h.3.ln_1.weight": np.ones(30, np.float32)}),
            "unexpected",
        ),
        (lambda t: t.update({"transformer.h.0.attn.bias.x": np.ones(1, np.float32)}), "unexpected"),
        (
            lambda t: t.update({"transformer.wpe.weight": np.zeros((24, 30), np.float32)}),
            r"wpe.weight has shape \(24, 30\).*config.json",
        ),
        (
            lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1}),
            "untied LM heads are not supported",
        ),
        (lambda t: t.update({"wte.weight": t["transformer.wte.weight"]}), "both with and without"),
    ],
)
def test_bad_weights_are_refused_naming_the_file(tmp_path, edit, message):
    out = _export(tmp_path)
    _edit_weights(out, edit)
    with pytest.raises(CheckpointError, match=message) as err:
        hf.read_hf_dir(out)
    assert "model.safetensors" in str(err.value) or "config.json" in str(err.value)


def test_other_architecture_is_refused_naming_model_type(tmp_path, capsys):
    out = _export(tmp_path)
    cfg = json.loads(open(f"{out}/config.json").read())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    open(f"{out}/config.json", "w").write(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        hf.read_hf_dir(out)
    assert cli_main(["convert", out, str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err
    assert "model_type is 'llama'" in err and "Traceback" not in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "dst")


def test_untied_config_without_lm_head_is_refused(tmp_path):
    out = _export(tmp_path)
    cfg = json.loads(open(f"{out}/config.json").read())
    open(f"{out}/config.json", "w").write(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match="tie_word_embeddings is false"):
        hf.read_hf_dir(out)


def test_missing_weights_and_bad_index(tmp_path):
    out = _export(tmp_path, max_shard_size="20KB")
    index_path = f"{out}/model.safetensors.index.json"
    index = json.loads(open(index_path).read())
    shard = sorted(set(index["weight_map"].values()))[1]

    os.rename(f"{out}/{shard}", f"{out}/moved")
    with pytest.raises(CheckpointError, match=f"shard {shard} is missing"):
        hf.read_hf_dir(out)
    os.rename(f"{out}/moved", f"{out}/{shard}")

    name = next(n for n, f in index["weight_map"].items() if f == shard)
    for bad, message in [("../escape.safetensors", "not a file name"), (shard, "says|no shard")]:
        wrong = sorted(set(index["weight_map"].values()) - {shard})[0] if bad == shard else bad
        edited = {**index, "weight_map": {**index["weight_map"], name: wrong}}
        open(index_path, "w").write(json.dumps(edited))
        with pytest.raises(CheckpointError, match=message):
            hf.read_hf_dir(out)

    shutil.rmtree(out)
    os.makedirs(out)
    open(f"{out}/config.json", "w").write(json.dumps(TINY.to_hf_config()))
    with pytest.raises(CheckpointError, match="no weights"):
        hf.read_hf_dir(out)


class _Payload:
    """Unpickling this runs ``open(path, "w")``: a file appears if the pickle is executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_bin_is_refused_and_never_executed(tmp_path, zip_format):
    out = _export(tmp_path)
    os.remove(f"{out}/model.safetensors")
    bin_path = f"{out}/pytorch_model.bin"

    # The payload really works: plain unpickling creates the file.
    probe = tmp_path / "probe-created"
    torch.save({"x": _Payload(str(probe))}, bin_path, _use_new_zipfile_serialization=zip_format)
    torch.load(bin_path, weights_only=False)
    assert probe.exists()

    target = tmp_path / "pwned"
    state = {"transformer.wte.weight": _Payload(str(target))}
    torch.save(state, bin_path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused"):
        hf.read_hf_dir(out)
    assert not target.exists()
    assert cli_main(["convert", out, str(tmp_path / "dst")]) == 1
    assert not target.exists()


def test_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    out = _export(tmp_path, fmt="bin")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now fails
    with pytest.raises(Gpt2JaxError, match="needs PyTorch.*pip install"):
        hf.read_hf_dir(out)
    with pytest.raises(Gpt2JaxError, match="needs PyTorch"):
        _export(tmp_path, fmt="bin", name="again")
    assert not os.path.exists(tmp_path / "again")


# ---- export options and the CLI --------------------------------------------------------------


def test_export_refuses_a_non_empty_directory_and_is_atomic(tmp_path):
    out = _export(tmp_path)
    with pytest.raises(Gpt2JaxError, match="already exists"):
        _export(tmp_path)
    before = open(f"{out}/model.safetensors", "rb").read()

    bad = random_params(TINY, 2)
    bad["wpe"] = bad["wpe"][:5]  # fails inside the export, once the temporary dir exists
    with pytest.raises(CheckpointError, match="wpe"):
        _export(tmp_path, bad, overwrite=True)
    assert open(f"{out}/model.safetensors", "rb").read() == before  # old export untouched
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary directory left behind

    params = random_params(TINY, 9)
    _export(tmp_path, params, overwrite=True)
    _assert_tree_bitwise(hf.read_hf_dir(out)[1], params)
    os.makedirs(tmp_path / "empty")
    _export(tmp_path, name="empty")  # an existing empty directory is fine


def test_cli_export_info_and_load(tmp_path, capsys):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert cli_main(["convert", str(FIXTURES / "openai_tiny"), ckpt]) == 0
    assert cli_main(["export", ckpt, out, "--dtype", "bfloat16", "--max-shard-size", "300KB"]) == 0
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    assert cli_main(["export", ckpt, out]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["export", ckpt, out, "--force"]) == 0
    capsys.readouterr()
    assert cli_main(["info", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "hf" and info["dtype"] == "float32"
    assert info["config"]["n_embd"] == 12 and info["tokenizer"] == "vocab.json + merges.txt"
    assert cli_main(["export", ckpt, out, "--max-shard-size", "5 parsecs", "--force"]) == 1
    assert "not a size" in capsys.readouterr().err

    from gpt2jax import loader as pretrained

    a, b = pretrained.load(ckpt), pretrained.load(out)
    _assert_tree_bitwise(a.params, b.params)
    assert b.tokenizer.encode("naïve 🤗") == a.tokenizer.encode("naïve 🤗")


def test_hf_script_delegates_to_the_cli(tmp_path, capsys):
    from gpt2jax.cli.main import script_main

    # GPT-2's vocabulary, as the tokenizer files written beside it: TINY's 97 tokens would not
    # match them, which importing refuses
    mismatched = _export(tmp_path, name="tiny-vocab")
    assert script_main("hf", ["import", mismatched, str(tmp_path / "no")]) == 1
    assert "vocab_size 97 does not match the tokenizer's 50257" in capsys.readouterr().err
    out = _export(tmp_path, config=GPT2Config(n_vocab=50257, n_ctx=16, n_embd=8, n_head=2,
                                              n_layer=1))  # fmt: skip
    dst = str(tmp_path / "ckpt")
    assert script_main("hf", ["import", out, dst]) == 0
    assert script_main("hf", ["export", dst, str(tmp_path / "again"), "--format", "bin"]) == 0
    assert os.path.exists(tmp_path / "again" / "pytorch_model.bin")
    assert script_main("hf", ["sideways"]) == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, expected",
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("7kib", 7 * 2**10),
     ("123", 123), (4096, 4096)],
)  # fmt: skip
def test_parse_size(text, expected):
    assert hf.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "1.5GB", "-3MB", "0", "5 GB extra", True])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ConfigError):
        hf.parse_size(text)


def test_plan_shards_keeps_order_and_limit():
    specs = [(f"t{i}", np.float32, (n,)) for i, n in enumerate([3, 5, 1, 9, 2, 2, 20, 1])]
    shards = hf.plan_shards(specs, limit=40)  # bytes: 12 20 4 36 8 8 80 4
    assert [s for shard in shards for s in shard] == specs
    assert [[s[0] for s in shard] for shard in shards] == [
        ["t0", "t1", "t2"], ["t3"], ["t4", "t5"], ["t6"], ["t7"]
    ]  # fmt: skip
    assert hf.shard_names("model.safetensors", 1) == ["model.safetensors"]
    assert hf.shard_names("pytorch_model.bin", 2) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]


def test_bfloat16_params_export_without_a_float32_detour(tmp_path):
    params = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), random_params(TINY, 8))
    out = _export(tmp_path, params, dtype="bfloat16")
    stored = load_file(f"{out}/model.safetensors")["transformer.h.2.mlp.c_proj.weight"]
    assert stored.tobytes() == params["h"]["mlp"]["c_proj"]["w"][2].tobytes()


def test_jax_array_params_export_bitwise(tmp_path):
    params = random_params(TINY, 10)
    out = _export(tmp_path, jax.tree.map(jax.numpy.asarray, params))
    _assert_tree_bitwise(hf.read_hf_dir(out)[1], params)


def test_import_refuses_a_tokenizer_that_is_not_gpt2s(tmp_path):
    out = _export(tmp_path)
    merges = open(f"{out}/merges.txt", encoding="utf-8").read().split("\n")
    del merges[500]  # one merge gone: every later rank shifts
    open(f"{out}/merges.txt", "w", encoding="utf-8").write("\n".join(merges))
    with pytest.raises(
        CheckpointError, match=f"{out}: vocab.json \\+ merges.txt do not hold GPT-2's BPE"
    ):
        hf.convert_hf_dir(out, tmp_path / "dst")
    assert not os.path.exists(tmp_path / "dst")
