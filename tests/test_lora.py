"""LoRA adapters and freezing: what is trained, and that the maths is the merged model's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, random_params
from gpt2jax import lora
from gpt2jax.errors import ConfigError
from gpt2jax.freeze import make_prepare as freeze_prepare
from gpt2jax.freeze import parse_freeze
from gpt2jax.loss import make_token_losses
from gpt2jax.model import GPT2

RANK = 3


def windows(seed: int = 0) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, TINY.n_vocab, (2, 15)), jnp.int32)


@pytest.fixture(scope="module")
def base():
    return jax.tree.map(jnp.asarray, random_params(TINY))


def random_b(adapters, seed: int = 1):
    """Adapters whose B is random too (a trained adapter)."""
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            0.1 * jax.random.normal(next(keys), x.shape) if path[-1].key == lora.B else x
        ),
        adapters,
    )


def lora_losses(scale: float, model=None):
    return jax.jit(
        make_token_losses(model or GPT2(TINY), prepare=lora.make_prepare(scale), loss_chunk=4)
    )


def test_adapter_shapes_and_init():
    adapters = lora.init_lora(TINY, RANK, seed=0)
    C, L = TINY.n_embd, TINY.n_layer
    fc = adapters["h"]["mlp"]["c_fc"]
    assert fc[lora.A].shape == (L, C, RANK) and fc[lora.B].shape == (L, RANK, 4 * C)
    assert adapters["h"]["mlp"]["c_proj"][lora.A].shape == (L, 4 * C, RANK)
    assert all(not np.any(a[lora.B]) for blk in adapters["h"].values() for a in blk.values())
    assert np.all(np.abs(fc[lora.A]) <= 1 / np.sqrt(C)) and np.std(fc[lora.A]) > 0
    n = sum(x.size for x in jax.tree.leaves(adapters))
    assert n == lora.num_lora_params(TINY, RANK)


def test_zero_b_equals_the_base_model(base):
    w = windows()
    adapters = lora.init_lora(TINY, RANK, seed=0)
    got = lora_losses(2.0)(adapters, w, None, base)
    want = jax.jit(make_token_losses(GPT2(TINY)))(base, w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("remat", ["none", "block"])
def test_adapters_compute_the_merged_weights(base, remat):
    """``W x + s (x A) B`` inside the layer scan == the model with ``W + s A B`` merged in
    (float32, relative 1e-5: the two sum in different orders)."""
    w, scale = windows(1), 0.75
    adapters = random_b(lora.init_lora(TINY, RANK, seed=2))
    model = GPT2(TINY, remat=remat)
    got = lora_losses(scale, model)(adapters, w, None, base)
    merged = lora.merge_lora(base, adapters, scale)
    want = jax.jit(make_token_losses(model))(merged, w)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert not np.allclose(want, jax.jit(make_token_losses(model))(base, w))


def test_only_adapters_get_gradients(base):
    w = windows(2)
    adapters = lora.init_lora(TINY, RANK, seed=0)
    losses = make_token_losses(GPT2(TINY), prepare=lora.make_prepare(1.0))
    grads = jax.jit(jax.grad(lambda a: losses(a, w, None, base).mean()))(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    fc = grads["h"]["mlp"]["c_fc"]
    # B = 0: dL/dA = 0 exactly, dL/dB is not (the usual start of LoRA training).
    assert not np.any(fc[lora.A]) and np.any(fc[lora.B])


def test_merge_keeps_dtype_and_other_leaves(base):
    adapters = random_b(lora.init_lora(TINY, RANK))
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    merged = lora.merge_lora(half, adapters, 1.0)
    assert merged["h"]["attn"]["c_attn"]["w"].dtype == jnp.bfloat16
    assert merged["wte"] is half["wte"]
    assert merged["h"]["attn"]["c_attn"]["b"] is half["h"]["attn"]["c_attn"]["b"]


def test_bad_rank_and_alpha():
    with pytest.raises(ConfigError, match="lora-rank"):
        lora.init_lora(TINY, 0)
    with pytest.raises(ConfigError, match="lora-alpha"):
        lora.lora_scale(4, -1.0)
    assert lora.lora_scale(4, 16.0) == 4.0 and lora.lora_scale(8, None) == 1.0


def test_freeze_stops_gradients_where_asked(base):
    w = windows(3)
    freeze = parse_freeze("top:1", TINY)
    losses = make_token_losses(GPT2(TINY), prepare=freeze_prepare(freeze))
    plain = make_token_losses(GPT2(TINY))
    grads = jax.jit(jax.grad(lambda p: losses(p, w).mean()))(base)
    ref = jax.jit(jax.grad(lambda p: plain(p, w).mean()))(base)
    assert not np.any(grads["wte"]) and not np.any(grads["wpe"])
    fc, fc_ref = grads["h"]["mlp"]["c_fc"]["w"], ref["h"]["mlp"]["c_fc"]["w"]
    assert not np.any(fc[:-1])
    np.testing.assert_allclose(fc[-1], fc_ref[-1], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(grads["ln_f"]["g"], ref["ln_f"]["g"], rtol=1e-6, atol=1e-9)


def test_freeze_specs():
    assert parse_freeze(None, TINY) is None
    assert parse_freeze("embeddings", TINY).layers is None
    assert parse_freeze("top:2", TINY).layers == (False, True, True)
    for bad in ("top:0", "top:4", "top:x", "bottom"):
        with pytest.raises(ConfigError, match="--freeze"):
            parse_freeze(bad, TINY)
