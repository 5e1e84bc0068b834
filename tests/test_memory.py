"""Memory options change memory and speed, never the maths.

Remat policies, scanned vs unrolled layers, chunked vs plain loss, the layer-by-layer optimizer
and low-precision optimizer state: each is compared with the plain computation on the same
random weights and batch. Tolerance (float32): every gradient within 2e-5 of the largest
element of that gradient (different fusion and summation orders move float32 results by a few
ulps, relative 1e-6 of typical values), losses within 1e-6 relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TINY, random_params
from gpt2jax.convert import mapping
from gpt2jax.model import GPT2
from gpt2jax.train.layerwise import Layerwise, apply_optimizer
from gpt2jax.train.loss import chunked_token_losses, make_token_losses
from gpt2jax.train.memory.precision import (
    dithered_round,
    scale_by_adam_lowp,
    scale_by_momentum_lowp,
)

GRAD_TOL = 2e-5


def batch(seed: int = 0, shape=(3, 20)) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, TINY.n_vocab, shape), jnp.int32)


def params(seed: int = 0):
    return jax.tree.map(jnp.asarray, random_params(TINY, seed))


def loss_and_grads(model: GPT2, p, windows, loss_chunk: int = 0):
    losses = make_token_losses(model, loss_chunk=loss_chunk)
    return jax.jit(jax.value_and_grad(lambda p: losses(p, windows).mean()))(p)


def assert_grads_close(ours, ref, tol=GRAD_TOL):
    flat_ref = mapping.flatten(ref)
    for path, a in mapping.flatten(ours).items():
        b = np.asarray(flat_ref[path])
        np.testing.assert_allclose(
            np.asarray(a), b, rtol=0, atol=tol * np.abs(b).max(), err_msg=path
        )


@pytest.fixture(scope="module")
def reference():
    p, w = params(), batch()
    return p, w, loss_and_grads(GPT2(TINY), p, w)


@pytest.mark.parametrize("remat, unroll", [("block", 1), ("dots", 1), ("none", TINY.n_layer)])
def test_remat_and_unrolling_do_not_change_loss_or_grads(reference, remat, unroll):
    p, w, (loss, grads) = reference
    got_loss, got_grads = loss_and_grads(GPT2(TINY, remat=remat, scan_unroll=unroll), p, w)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
    assert_grads_close(got_grads, grads)


@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_loss_equals_plain_loss(reference, chunk):
    """A chunk that does not divide T = 19 (padding), and one larger than T."""
    p, w, (loss, grads) = reference
    got_loss, got_grads = loss_and_grads(GPT2(TINY), p, w, loss_chunk=chunk)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
    assert_grads_close(got_grads, grads)


def test_chunked_loss_gives_every_token_its_own_loss():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.standard_normal((2, 9, 6)), jnp.float32)
    wte = jnp.asarray(rng.standard_normal((11, 6)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 9)), jnp.int32)
    plain = optax.softmax_cross_entropy_with_integer_labels(h @ wte.T, targets)
    np.testing.assert_allclose(chunked_token_losses(h, wte, targets, 4), plain, rtol=1e-6)


def test_chunked_loss_bounds_logits_memory():
    """The compiled gradient of the chunked loss needs less scratch memory than the plain one:
    it never holds the whole (B, T, V) logits and their gradient."""
    cfg = TINY.__class__(n_vocab=4099, n_ctx=256, n_embd=32, n_head=2, n_layer=1)
    model = GPT2(cfg)
    p = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, random_params(cfg)))
    w = jax.ShapeDtypeStruct((2, 257), jnp.int32)

    def temp(chunk: int) -> int:
        losses = make_token_losses(model, loss_chunk=chunk)
        fn = jax.jit(jax.grad(lambda p, w: losses(p, w).mean()))
        return fn.lower(p, w).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 2 * 256 * 4099 * 4
    assert temp(32) < temp(0) - logits_bytes


def test_bfloat16_compute_keeps_loss_in_float32():
    p, w = params(), batch()
    losses = jax.jit(make_token_losses(GPT2(TINY, dtype=jnp.bfloat16), loss_chunk=5))(p, w)
    assert losses.dtype == jnp.float32
    ref = jax.jit(make_token_losses(GPT2(TINY)))(p, w)
    np.testing.assert_allclose(losses.mean(), ref.mean(), rtol=2e-2)


def _step(tx):
    return jax.jit(lambda p, g, s: apply_optimizer(tx, g, s, p))


@pytest.mark.parametrize("elementwise", [False, True], ids=["loop", "together"])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_layerwise_optimizer_equals_whole_tree_optax(reference, name, elementwise):
    """Elementwise optimizers give the same parameters per layer (in the loop, or all layers
    at once as finetune runs them) as on the whole tree, global-norm clipping included (the
    clip threshold is set so that it acts)."""
    p, _, (_, grads) = reference
    base = optax.adamw(1e-2, weight_decay=0.1) if name == "adamw" else optax.sgd(1e-2, 0.9)
    clip = 0.5 * float(optax.tree.norm(grads))
    whole = optax.chain(optax.clip_by_global_norm(clip), base)
    lw = Layerwise(base, clip=clip, elementwise=elementwise)
    s_whole, s_lw = whole.init(p), lw.init(p)
    p_whole, p_lw = p, p
    step_whole, step_lw = _step(whole), _step(lw)
    for i in range(3):
        g = jax.tree.map(lambda x, f=1 + i: x * f, grads)
        p_whole, s_whole = step_whole(p_whole, g, s_whole)
        p_lw, s_lw = step_lw(p_lw, g, s_lw)
    assert_grads_close(p_lw, p_whole, tol=1e-6)


@pytest.mark.parametrize("elementwise", [False, True], ids=["loop", "together"])
def test_layerwise_freezing_keeps_frozen_parts_unchanged(reference, elementwise):
    p, _, (_, grads) = reference
    trainable = np.array([False, True, False])
    lw = Layerwise(
        optax.adamw(1e-2, weight_decay=0.1), frozen=("wte",), trainable_layers=trainable,
        elementwise=elementwise,
    )  # fmt: skip
    state = lw.init(p)
    assert "wte" not in state.rest  # no optimizer state for a frozen leaf
    new, _ = _step(lw)(p, grads, state)
    np.testing.assert_array_equal(new["wte"], p["wte"])
    w_old, w_new = p["h"]["mlp"]["c_fc"]["w"], new["h"]["mlp"]["c_fc"]["w"]
    np.testing.assert_array_equal(w_new[0], w_old[0])
    np.testing.assert_array_equal(w_new[2], w_old[2])
    assert not np.allclose(w_new[1], w_old[1])
    assert not np.allclose(new["wpe"], p["wpe"])


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_layers_updated_together_equal_the_loop(reference, name, param_dtype):
    """finetune updates every layer of AdamW and SGD at once (``elementwise``: vmapped, which
    XLA fuses in place) instead of one by one in a loop: XLA rounds the two programs slightly
    differently (a last-bit difference in a step, which SGD's coupled weight decay carries into
    its momentum), so they agree to float32 rounding, frozen layers untouched in both; stored
    in bfloat16 and rounded stochastically, all but a few parameters are bitwise equal and
    those one bfloat16 step apart."""
    from gpt2jax.train.optim import make_optimizer

    p, _, (_, grads) = reference
    p = jax.tree.map(lambda x: x.astype(param_dtype), p)
    base = make_optimizer(name, lambda _: 1e-2, weight_decay=0.1, clip=0.0)  # finetune's
    runs = []
    for elementwise in (False, True):
        lw = Layerwise(
            base, clip=1.0, trainable_layers=np.array([True, False, True]),
            elementwise=elementwise,
        )  # fmt: skip
        new, state, step = p, lw.init(p), _step(lw)
        for i in range(3):
            new, state = step(new, jax.tree.map(lambda x, f=1 + i: x * f, grads), state)
        runs.append((new, state))
    (loop_p, loop_s), (together_p, together_s) = runs
    for a, b in zip(jax.tree.leaves(loop_s), jax.tree.leaves(together_s), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(together_p["h"]["ln_1"]["g"][1], p["h"]["ln_1"]["g"][1])
    for a, b in zip(jax.tree.leaves(loop_p), jax.tree.leaves(together_p), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if param_dtype == jnp.float32:
            np.testing.assert_allclose(b, a, rtol=4e-7, atol=1e-8)  # an ulp or two
        else:
            assert np.mean(a != b) < 0.01
            np.testing.assert_allclose(b, a, rtol=2**-7)


def test_low_precision_state_in_float32_is_optax(reference):
    """Equal up to float32 rounding (optax orders the bias correction differently)."""
    p, _, (_, grads) = reference
    for ours, theirs in [
        (scale_by_adam_lowp(0.9, 0.99, 1e-8), optax.scale_by_adam(0.9, 0.99, 1e-8)),
        (scale_by_momentum_lowp(0.9), optax.trace(0.9)),
    ]:
        s1, s2 = ours.init(p), theirs.init(p)
        for _ in range(3):
            u1, s1 = ours.update(grads, s1, p)
            u2, s2 = theirs.update(grads, s2, p)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)


def test_bfloat16_state_is_stored_in_bfloat16_and_tracks_float32(reference):
    p, _, (_, grads) = reference
    lowp, full = scale_by_adam_lowp(dtype=jnp.bfloat16), scale_by_adam_lowp()
    s_low, s_full = lowp.init(p), full.init(p)
    assert {x.dtype for x in jax.tree.leaves(s_low.mu)} == {jnp.dtype(jnp.bfloat16)}
    update = jax.jit(lowp.update)
    for i in range(20):
        factor = 1.0 + 0.5 * np.sin(i)
        g = jax.tree.map(lambda x, f=factor: x * f, grads)
        u_low, s_low = update(g, s_low, p)
        u_full, s_full = full.update(g, s_full, p)
    for a, b in zip(jax.tree.leaves(u_low), jax.tree.leaves(u_full), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 0.02 * np.linalg.norm(b)


def test_dithered_rounding_is_unbiased_where_round_to_nearest_is_stuck():
    """nu <- 0.999 nu + 0.001 g^2 with g^2 = nu / 2: round-to-nearest bfloat16 never moves
    (the change is below half an ulp); dithered rounding decays like float32 on average."""
    nu32 = np.ones(4096, np.float32)
    nearest = jnp.ones(4096, jnp.bfloat16)
    dithered = jnp.ones(4096, jnp.bfloat16)
    for step in range(300):
        nu32 = 0.999 * nu32 + 0.001 * 0.5
        nearest = (0.999 * nearest.astype(jnp.float32) + 0.0005).astype(jnp.bfloat16)
        dithered = dithered_round(0.999 * dithered.astype(jnp.float32) + 0.0005, "bfloat16", step)
    assert float(nearest.astype(jnp.float32).mean()) == 1.0
    np.testing.assert_allclose(float(dithered.astype(jnp.float32).mean()), nu32[0], rtol=2e-3)
