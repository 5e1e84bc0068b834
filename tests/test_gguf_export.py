"""``gpt2jax export --format gguf``: every metadata key and tensor read back with ggml's own
``gguf`` reader (names and shapes from ``gguf``'s table for the gpt2 architecture, values,
types), a forward pass in ggml's conventions over the file's tensors against our model, and,
where llama.cpp's Python binding is installed, llama.cpp's own logits and greedy tokens."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import gpt2jax
from conftest import FIXTURES, TOKENIZER_DIR, random_params
from gpt2jax.cli import main as cli

gguf = pytest.importorskip("gguf")

TINY = FIXTURES / "openai_tiny"  # n_vocab 50257, n_ctx 29, n_embd 12, 3 heads, 2 layers


@pytest.fixture(scope="module")
def model():
    return gpt2jax.load(TINY)


def _export(tmp_path, dtype: str) -> str:
    out = tmp_path / f"tiny-{dtype}.gguf"
    assert cli.main(["export", str(TINY), str(out), "--format", "gguf", "--dtype", dtype]) == 0
    return str(out)


def _fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = field.contents()
    return out


def _tensors(reader) -> dict:
    """name -> (GGML type, numpy shape, float32 values)."""
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml ne order -> numpy order
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        out[t.name] = (t.tensor_type, shape, values.astype(np.float32))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16", "q8_0"])
def test_every_key_and_tensor_reads_back(tmp_path, model, dtype):
    reader = gguf.GGUFReader(_export(tmp_path, dtype))
    cfg = model.config
    fields = _fields(reader)
    encoder = json.loads((TINY / "encoder.json").read_text())
    merges = [m for m in (TINY / "vocab.bpe").read_text().splitlines()[1:] if m]
    file_type = {"float32": 0, "float16": 1, "q8_0": 7}[dtype]
    expected = {
        "general.architecture": "gpt2",
        "general.name": "openai_tiny",
        "gpt2.block_count": cfg.n_layer,
        "gpt2.context_length": cfg.n_ctx,
        "gpt2.embedding_length": cfg.n_embd,
        "gpt2.feed_forward_length": 4 * cfg.n_embd,
        "gpt2.attention.head_count": cfg.n_head,
        "gpt2.attention.layer_norm_epsilon": pytest.approx(cfg.layer_norm_epsilon),
        "general.file_type": file_type,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 50256,
        "tokenizer.ggml.eos_token_id": 50256,
        "tokenizer.ggml.add_bos_token": False,
    }
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    assert set(fields) == set(expected) | set(big)  # no key unchecked, none missing
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields["tokenizer.ggml.tokens"] == sorted(encoder, key=encoder.get)
    types = fields["tokenizer.ggml.token_type"]
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {gguf.TokenType.NORMAL}
    assert fields["tokenizer.ggml.merges"] == merges

    tensors = _tensors(reader)
    table = [gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2]]
    names = {n.format(bid=i) for n in table for i in range(cfg.n_layer) if "{bid}" in n}
    names |= {n for n in table if "{bid}" not in n} - {"output"}  # the head is tied
    assert {n.rsplit(".", 1)[0] for n in tensors} == names
    p = jax.tree.map(np.asarray, model.params)
    ours = {
        "token_embd.weight": p["wte"], "position_embd.weight": p["wpe"],
        "output_norm.weight": p["ln_f"]["g"], "output_norm.bias": p["ln_f"]["b"],
    }  # fmt: skip
    for i in range(cfg.n_layer):
        h = jax.tree.map(lambda x, i=i: x[i], p["h"])
        for new, (w, b) in {
            "attn_norm": (h["ln_1"]["g"], h["ln_1"]["b"]),
            "attn_qkv": (h["attn"]["c_attn"]["w"].T, h["attn"]["c_attn"]["b"]),
            "attn_output": (h["attn"]["c_proj"]["w"].T, h["attn"]["c_proj"]["b"]),
            "ffn_norm": (h["ln_2"]["g"], h["ln_2"]["b"]),
            "ffn_up": (h["mlp"]["c_fc"]["w"].T, h["mlp"]["c_fc"]["b"]),
            "ffn_down": (h["mlp"]["c_proj"]["w"].T, h["mlp"]["c_proj"]["b"]),
        }.items():
            ours[f"blk.{i}.{new}.weight"], ours[f"blk.{i}.{new}.bias"] = w, b
    assert set(ours) == set(tensors)
    T = gguf.GGMLQuantizationType
    for name, want in ours.items():
        qtype, shape, got = tensors[name]
        assert shape == want.shape, name
        if want.ndim == 1 or name.startswith("position_embd") or dtype == "float32":
            assert qtype == T.F32, name
            np.testing.assert_array_equal(got, want, err_msg=name)
        elif dtype == "float16" or want.shape[-1] % 32:
            assert qtype == T.F16, name
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
        else:
            assert qtype == T.Q8_0, name
            ref = gguf.quants.dequantize(gguf.quants.quantize(want, T.Q8_0), T.Q8_0)
            np.testing.assert_array_equal(got, ref.reshape(want.shape))
            blocks = np.abs(want).reshape(-1, 32).max(-1, keepdims=True)  # per-block scale
            assert np.all(np.abs(got - want).reshape(-1, 32) <= blocks / 127 * 0.51 + 1e-7)
    if dtype == "q8_0":  # rows of 12 or 48 here split into no blocks of 32: float16
        assert {q for q, s, _ in tensors.values() if len(s) == 2} <= {T.F16, T.F32}


def _ggml_forward(tensors: dict, cfg, ids: np.ndarray) -> np.ndarray:
    """GPT-2 over the file's tensors in ggml's conventions (``mul_mat(W, x)`` is ``x @ W.T``
    for a ``W`` of numpy shape ``(out, in)``; the head tied to ``token_embd``), in float64."""
    t = {k: v[2].astype(np.float64) for k, v in tensors.items()}

    def norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_epsilon) * t[f"{name}.weight"] + t[
            f"{name}.bias"
        ]

    def linear(x, name):
        return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    T, H, D = len(ids), cfg.n_head, cfg.head_dim
    x = t["token_embd.weight"][ids] + t["position_embd.weight"][:T]
    for i in range(cfg.n_layer):
        qkv = linear(norm(x, f"blk.{i}.attn_norm"), f"blk.{i}.attn_qkv")
        q, k, v = (a.reshape(T, H, D).transpose(1, 0, 2) for a in np.split(qkv, 3, -1))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(D) + np.triu(np.full((T, T), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + linear((a @ v).transpose(1, 0, 2).reshape(T, -1), f"blk.{i}.attn_output")
        h = linear(norm(x, f"blk.{i}.ffn_norm"), f"blk.{i}.ffn_up")
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        x = x + linear(h, f"blk.{i}.ffn_down")
    return norm(x, "output_norm") @ t["token_embd.weight"].T


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("float16", 2e-2)])
def test_the_file_computes_our_model_in_ggml_conventions(tmp_path, model, dtype, atol):
    tensors = _tensors(gguf.GGUFReader(_export(tmp_path, dtype)))
    ids = model.encode("The meaning of life is that the sea")
    got = _ggml_forward(tensors, model.config, ids)
    np.testing.assert_allclose(got, np.asarray(model.logits(ids)), atol=atol, rtol=0)


def test_q8_0_quantizes_every_matrix_whose_rows_split_into_blocks(tmp_path):
    """A model 32 wide: every matrix but position_embd is stored in q8_0 blocks, each block
    as gguf's reference quantizer makes it, and the file still computes the model closely."""
    config = gpt2jax.GPT2Config(n_vocab=50257, n_ctx=16, n_embd=32, n_head=2, n_layer=1)
    gpt2jax.save_model_dir(
        tmp_path / "wide", config, random_params(config, seed=3), tokenizer_dir=TOKENIZER_DIR
    )
    wide = gpt2jax.load(tmp_path / "wide")
    out = tmp_path / "wide.gguf"
    assert cli.main(["export", str(tmp_path / "wide"), str(out), "--format", "gguf",
                     "--dtype", "q8_0"]) == 0  # fmt: skip
    tensors = _tensors(gguf.GGUFReader(str(out)))
    T = gguf.GGMLQuantizationType
    for name, (qtype, shape, _) in tensors.items():
        if len(shape) == 1 or name.startswith("position_embd"):
            assert qtype == T.F32, name
        else:
            assert qtype == T.Q8_0, name
    w = np.asarray(wide.params["h"]["mlp"]["c_fc"]["w"][0]).T  # (out, in) as stored
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, T.Q8_0), T.Q8_0).reshape(w.shape)
    np.testing.assert_array_equal(tensors["blk.0.ffn_up.weight"][2], ref)
    ids = wide.encode("The meaning of life is")
    got = _ggml_forward(tensors, config, ids)
    want = np.asarray(wide.logits(ids))
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_refuses_to_overwrite_and_bad_types(tmp_path, capsys):
    out = _export(tmp_path, "float32")
    assert cli.main(["export", str(TINY), out, "--format", "gguf"]) == 1
    assert "already exists (use --force" in capsys.readouterr().err
    assert cli.main(["export", str(TINY), out, "--format", "gguf", "--force"]) == 0
    assert cli.main(["export", str(TINY), str(tmp_path / "x"), "--dtype", "q8_0"]) == 1
    assert "--dtype q8_0 is for --format gguf" in capsys.readouterr().err
    assert cli.main(["export", str(TINY), str(tmp_path / "y.gguf"), "--format", "gguf",
                     "--dtype", "bfloat16"]) == 1  # fmt: skip
    assert "not bfloat16" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-float32.gguf"]  # no leftovers


@pytest.mark.slow
def test_llama_cpp_runs_the_file_like_our_model(tmp_path, model):
    """llama.cpp's own GPT-2 (through llama-cpp-python, when installed) on our float32 file:
    logits within 1e-3 of ours and the same greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(
        _export(tmp_path, "float32"), n_ctx=model.config.n_ctx, logits_all=True, verbose=False
    )
    ids = model.encode("The meaning of life is").tolist()
    assert llm.tokenize(b"The meaning of life is", add_bos=False) == ids
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    np.testing.assert_allclose(theirs, np.asarray(model.logits(np.asarray(ids))), atol=1e-3)
    out = gpt2jax.generate(model, "The meaning of life is", max_new_tokens=8, greedy=True)[0]
    llm.reset()
    stream = llm.generate(ids, temp=0.0, top_k=1, reset=True)
    greedy = [next(stream) for _ in range(8)]
    assert greedy[: len(out.tokens)] == out.tokens
