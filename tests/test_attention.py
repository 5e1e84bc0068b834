"""Every attention implementation that runs on a CPU equals the original einsum path (``xla``):
forward and gradients, causal and left-padded, and the KV-cache decode; ``auto``'s choices;
the blockwise step's memory."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TINY as TINY3
from conftest import random_params
from gpt2jax import attention
from gpt2jax.config import GPT2Config
from gpt2jax.errors import ConfigError
from gpt2jax.generation.decoding import generate_tokens, layer_params
from gpt2jax.generation.sampling import Sampler
from gpt2jax.model import GPT2, KVCache

#: The tiny model with one layer: the model-level checks compile a third as much.
TINY = dataclasses.replace(TINY3, n_layer=1)


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 4 queries x 3 keys, so that tiny shapes cross many tile borders."""
    monkeypatch.setattr(attention, "BLOCK_Q", 4)
    monkeypatch.setattr(attention, "TILE", 12)


@pytest.fixture
def model_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 8 queries x 8 keys: the tiny model's 23 positions are 3 query blocks, the last
    one partial (fewer tiles than ``small_tiles``: each is compiled, in every layer's body)."""
    monkeypatch.setattr(attention, "BLOCK_Q", 8)
    monkeypatch.setattr(attention, "TILE", 64)


def _qkv(B=2, H=3, T=11, D=5, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v = (jax.random.normal(x, (B, H, T, D)) for x in ks[:3])
    return q, k, v, jax.random.normal(ks[3], (B, H, T, D))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _masks(B: int, T: int):
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    real = jnp.arange(T)[None, :] >= jnp.array([0, 3])[:B, None]  # row 1: 3 padding slots
    return causal, real


@pytest.mark.parametrize("case", ["causal", "causal mask", "left-padded", "two segments"])
def test_blockwise_equals_xla(small_tiles: None, case: str) -> None:
    q, k, v, w = _qkv()
    B, T = q.shape[0], q.shape[2]
    causal, real = _masks(B, T)
    mask = {"causal": None, "causal mask": causal}.get(case, causal & real[:, None, :])
    split = 7 if case == "two segments" else T
    # rows that may attend to some key (padding queries' outputs are meaningless)
    rows = real[:, None, :, None] if "seg" in case or "pad" in case else True

    def out(impl, q, k, v):
        keys = (k[:, :, :split], k[:, :, split:]) if split < T else (k,)
        values = (v[:, :, :split], v[:, :, split:]) if split < T else (v,)
        y = attention.attend(q, keys, values, mask, implementation=impl)
        return jnp.where(rows, y, 0.0)

    ref, ref_grads = _value_and_grads(out, "xla", q, k, v, w)
    got, got_grads = _value_and_grads(out, "blockwise", q, k, v, w)
    assert _rel(got, ref) <= 1e-5
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert _rel(g, r) <= 1e-5


def _value_and_grads(out, impl, q, k, v, w):
    """``out(impl, q, k, v)`` and the gradients of its sum weighted by ``w``, one compilation."""

    def f(q, k, v):
        return (out(impl, q, k, v) * w).sum(), out(impl, q, k, v)

    (_, y), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, k, v)
    return y, grads


def test_blockwise_default_tiles() -> None:
    """The real tile sizes: 600 queries are three query blocks, the last one partial."""
    q, k, v, w = _qkv(B=1, H=2, T=600, D=8)

    def out(impl, q, k, v):
        return attention.attend(q, (k,), (v,), None, implementation=impl)

    ref, ref_grads = _value_and_grads(out, "xla", q, k, v, w)
    got, got_grads = _value_and_grads(out, "blockwise", q, k, v, w)
    assert _rel(got, ref) <= 1e-5
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert _rel(g, r) <= 1e-5


def _model_losses(params, ids, weights, impl, mask=None):
    model = GPT2(TINY, attention=impl)
    logits = model.apply({"params": params}, ids, attention_mask=mask, method=GPT2.forward).logits
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    return (losses * weights).sum(), logits


@pytest.mark.parametrize("padded", [False, True])
def test_model_logits_and_gradients(model_tiles: None, padded: bool) -> None:
    params = random_params(TINY)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, TINY.n_ctx), 0, TINY.n_vocab)
    mask, weights = None, jnp.ones((2, TINY.n_ctx - 1))
    if padded:  # row 1 is left-padded by 5 slots; predictions from real positions count
        mask = jnp.arange(TINY.n_ctx)[None, :] >= jnp.array([0, 5])[:, None]
        weights = (mask[:, :-1] & mask[:, 1:]).astype(jnp.float32)
    out = {}
    for impl in ("xla", "blockwise"):

        def f(p, impl=impl):
            return _model_losses(p, ids, weights, impl, mask)

        (loss, logits), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        out[impl] = (loss, logits, grads)
    real = np.asarray(mask)[..., None] if padded else True
    ref, got = out["xla"], out["blockwise"]
    assert _rel(np.where(real, got[1], 0), np.where(real, ref[1], 0)) <= 1e-5
    assert _rel(got[0], ref[0]) <= 1e-5
    for g, r in zip(jax.tree.leaves(got[2]), jax.tree.leaves(ref[2]), strict=True):
        assert _rel(g, r) <= 1e-5


def test_cached_forward(model_tiles: None) -> None:
    """Prefill 9 tokens into a 20-slot cache, then feed 4 one at a time: every step's logits
    equal across implementations (and equal the uncached forward's)."""
    params = random_params(TINY)
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 13), 0, TINY.n_vocab)
    logits = {}
    for impl in ("xla", "blockwise"):
        model = GPT2(TINY, attention=impl)

        @jax.jit  # one compilation for the prefill, one for the 4 decoding steps
        def forward(ids, cache, index, model=model):
            out = model.apply({"params": params}, ids, cache=cache, cache_index=index,
                              method=GPT2.forward)  # fmt: skip
            return out.logits, out.cache

        out, cache = forward(ids[:, :9], KVCache.zeros(TINY, 2, 20), 0)
        steps = [out]
        for t in range(9, 13):
            out, cache = forward(ids[:, t : t + 1], cache, t)
            steps.append(out)
        logits[impl] = jnp.concatenate(steps, axis=1)
    full = GPT2(TINY, attention="xla").apply({"params": params}, ids)
    assert _rel(logits["blockwise"], logits["xla"]) <= 1e-5
    assert _rel(logits["xla"], full) <= 1e-5


def test_decoding_loop(model_tiles: None) -> None:
    """The compiled sampler (left-padded batch, greedy) gives the same tokens and lengths."""
    params = layer_params(jax.tree.map(jnp.asarray, random_params(TINY)))
    ids = jnp.array([[5, 6, 7, 8, 9, 10], [0, 0, 0, 11, 12, 13]], jnp.int32)
    pad = jnp.array([0, 3], jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    sampler = Sampler.make(1.0, 0, 1.0, True)
    out = {
        impl: generate_tokens(
            TINY, params, ids, pad, keys, max_new_tokens=12, sampler=sampler, attention=impl
        )  # fmt: skip
        for impl in ("xla", "blockwise")
    }
    np.testing.assert_array_equal(out["blockwise"][0], out["xla"][0])
    np.testing.assert_array_equal(out["blockwise"][1], out["xla"][1])


def test_auto_choices() -> None:
    def choose(name="auto", **kw):
        args = dict(dtype=jnp.float32, queries=1024, keys=1024, causal_only=True, cached=False,
                    dropout=False, backend="cpu")  # fmt: skip
        return attention.choose(name, **{**args, **kw})

    assert choose(queries=16, keys=16) == "xla"  # one tile: nothing to save
    assert choose() == "blockwise"  # no fused kernel on a CPU
    assert choose(dropout=True) == "xla"  # the only one with attention dropout
    assert choose(queries=1, keys=1025, cached=True) == "xla"  # decoding: one tile per step
    assert choose(queries=512, keys=2048, cached=True) == "blockwise"  # a long prefill
    assert choose(backend="tpu") == "splash"
    assert choose(backend="tpu", queries=1000, keys=1000) == "blockwise"  # not a multiple of 128
    assert choose(backend="tpu", causal_only=False) == "blockwise"  # a padding mask
    assert choose(backend="gpu") == "blockwise"  # float32: no cuDNN flash attention
    assert choose("cudnn", cached=True, queries=1, keys=64) == "xla"  # fused: full sequences
    assert choose("xla") == "xla"
    with pytest.raises(ConfigError, match="dropout"):
        choose("blockwise", dropout=True)
    with pytest.raises(ConfigError, match="--attention"):
        choose("flash")


def _step_temporaries(config, seq_len, impl) -> int:
    """Temporaries of a compiled training step (loss gradient) of ``config``, batch 1."""
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    model = GPT2(config, attention=impl)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]

    def loss(p, ids):
        logits = model.apply({"params": p}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()

    compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_blockwise_never_holds_the_score_matrix() -> None:
    """A narrow layer at 1024 tokens, where attention is most of the memory: the blockwise
    step's temporaries are under one float32 (H, T, T) matrix, and under 1/4 of xla's."""
    config = GPT2Config(n_vocab=64, n_ctx=1024, n_embd=64, n_head=8, n_layer=1)
    xla = _step_temporaries(config, 1024, "xla")
    blockwise = _step_temporaries(config, 1024, "blockwise")
    assert blockwise < 8 * 1024 * 1024 * 4 and blockwise * 4 <= xla, (blockwise, xla)


def test_blockwise_attention_memory_at_124m_shapes() -> None:
    """The attention's own temporaries (forward and gradient) at 124M's 12 heads of 64 and
    2048 tokens, measured by the benchmark's function: blockwise at most 1/4 of xla's (the
    whole step's table: BENCHMARKS.md)."""
    path = Path(__file__).parent.parent / "scripts" / "bench_attention_memory.py"
    spec = importlib.util.spec_from_file_location("bench_attention_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    xla = bench.attention_temporaries("xla", 2048)
    blockwise = bench.attention_temporaries("blockwise", 2048)
    assert blockwise * 4 <= xla, (blockwise, xla)
    assert xla >= 12 * 2048 * 2048 * 4  # the reference does hold a float32 (H, T, T) matrix


@pytest.mark.slow
def test_splash_interpreted() -> None:
    """Pallas' splash kernel (the TPU choice), run by Pallas' interpreter on the CPU."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    q, k, v, w = _qkv(B=1, H=2, T=256, D=64)
    ref = attention.attend(q, (k,), (v,), None, implementation="xla")
    got = attention.attend(q, (k,), (v,), None, implementation="splash")
    assert _rel(got, ref) <= 1e-5

    def loss(impl):
        return lambda q, k, v: (attention.attend(q, (k,), (v,), None, implementation=impl)
                                * w).sum()  # fmt: skip

    for g, r in zip(jax.grad(loss("splash"), (0, 1, 2))(q, k, v),
                    jax.grad(loss("xla"), (0, 1, 2))(q, k, v), strict=True):  # fmt: skip
        assert _rel(g, r) <= 1e-5
