"""The dense layers' matmul (:func:`gpt2jax.model.dense`), the tied LM head
(:func:`gpt2jax.model.lm_head`) and their derivatives.

Their weight gradients may be formed from a transposed copy of the input (on CPUs, for speed):
gradients are checked against ``torch.autograd``, forward mode and second order against JAX's
own derivatives of ``jnp.dot``, and the compiled CPU gradient for the matmul form it promises.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax.model import _tied_head, dense, lm_head, transposed_weight_gradient

torch = pytest.importorskip("torch")

# Odd sizes, batch and time axes: (B, T, nx) @ (nx, nf).
X_SHAPE, W_SHAPE = (3, 5, 7), (7, 11)


def normal(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """Float32 standard-normal arrays of ``shapes``, drawn in order from ``seed``."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


def arrays(seed: int = 0):
    """``x``, ``w`` and the weights ``c`` of a loss on ``x @ w``."""
    return normal(seed, X_SHAPE, W_SHAPE, (*X_SHAPE[:-1], W_SHAPE[1]))


@pytest.mark.parametrize("transposed", [False, True])
def test_gradients_match_torch(transposed):
    x, w, c = arrays()
    loss = lambda x, w: jnp.sum(dense(x, w, transposed) * c)  # noqa: E731
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    tx, tw = (torch.tensor(a, requires_grad=True) for a in (x, w))
    (torch.matmul(tx, tw) * torch.from_numpy(c)).sum().backward()
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-5, atol=1e-5)
    assert dx.dtype == dw.dtype == jnp.float32


@pytest.mark.parametrize("transposed", [False, True])
def test_bfloat16_gradients_keep_dtypes_and_match_a_plain_dot(transposed):
    x, w, c = (jnp.asarray(a, jnp.bfloat16) for a in arrays(1))
    plain = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)  # noqa: E731
    ours = jax.grad(lambda x, w: jnp.sum(dense(x, w, transposed) * c), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(plain(x, w) * c), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("transposed", [False, True])
def test_forward_mode_and_second_order_match_a_plain_dot(transposed):
    x, w, c = arrays(2)
    dx, dw, _ = arrays(3)
    plain = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)  # noqa: E731
    ours = jax.jvp(lambda x, w: dense(x, w, transposed), (x, w), (dx, dw))
    ref = jax.jvp(plain, (x, w), (dx, dw))
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    # A Hessian-vector product of a loss that is not linear in the weights.
    def hvp(f):
        g = jax.grad(lambda w: jnp.sum(jnp.tanh(f(x, w)) * c))
        return jax.jvp(g, (w,), (dw,))[1]

    np.testing.assert_allclose(
        hvp(lambda x, w: dense(x, w, transposed)), hvp(plain), rtol=1e-5, atol=1e-5
    )


def _dot_count(f, *args) -> int:
    """dot_general ops JAX emits for ``f`` (before XLA optimises anything away)."""
    return jax.jit(f).lower(*args).as_text().count("stablehlo.dot_general")


@pytest.mark.parametrize("transposed", [False, True])
def test_a_frozen_weight_gets_no_gradient_matmul(transposed):
    x, w, c = arrays(4)
    loss = lambda x, w: jnp.sum(jnp.tanh(dense(x, w, transposed)) * c)  # noqa: E731
    assert _dot_count(jax.grad(loss, argnums=0), x, w) == 2  # forward, input gradient
    assert _dot_count(jax.grad(loss, argnums=(0, 1)), x, w) == 3  # and the weight gradient


def _transposed_lhs_dots(hlo: str) -> list[str]:
    """Compiled 2-D dots that contract their left operand's first axis (``x^T @ dy`` as XLA
    writes a weight gradient)."""
    dots = [line for line in hlo.splitlines() if re.search(r"\bdot\(", line)]
    return [d for d in dots if "lhs_contracting_dims={0}" in d and "lhs_batch_dims" not in d]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's matmul forms")
def test_cpu_weight_gradient_is_an_untransposed_matmul():
    # GPT-2's layers at 124M: c_attn, attention c_proj and c_fc; not the MLP's c_proj.
    chosen = [
        transposed_weight_gradient(nx, nf)
        for nx, nf in [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    ]
    assert chosen == [True, True, True, False]
    x, w, _ = (jnp.asarray(a) for a in arrays(5))
    x, w = jnp.tile(x, (2, 8, 13)), jnp.tile(w, (13, 3))  # (6, 40, 91) @ (91, 33)

    def compiled(transposed: bool) -> str:
        loss = lambda x, w: jnp.sum(jnp.tanh(dense(x, w, transposed)))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=1)).lower(x, w).compile().as_text()

    # XLA's own form contracts the token axis of both operands (Eigen's slower matmul here)...
    assert _transposed_lhs_dots(compiled(False))
    # ...the transposed copy leaves a plain (M, K) @ (K, N) matmul.
    assert not _transposed_lhs_dots(compiled(True))


# The tied head: (B, T, C) x (V, C) -> (B, T, V), V > C as in GPT-2.
H_SHAPE, WTE_SHAPE = (3, 5, 7), (13, 7)


def head_arrays(seed: int = 0):
    """``h``, ``wte`` and the weights ``c`` of a loss on the logits."""
    return normal(seed, H_SHAPE, WTE_SHAPE, (*H_SHAPE[:-1], WTE_SHAPE[0]))


def plain_head(h, wte):
    return jnp.einsum("btc,vc->btv", h, wte, preferred_element_type=jnp.float32)


@pytest.mark.parametrize("transposed", [False, True])
def test_lm_head_gradients_match_torch(transposed):
    h, wte, c = head_arrays()
    loss = lambda h, wte: jnp.sum(_tied_head(h, wte, transposed) * c)  # noqa: E731
    dh, dwte = jax.jit(jax.grad(loss, argnums=(0, 1)))(h, wte)

    th, tw = (torch.tensor(a, requires_grad=True) for a in (h, wte))
    (torch.nn.functional.linear(th, tw) * torch.from_numpy(c)).sum().backward()
    np.testing.assert_allclose(dh, th.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dwte, tw.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_lm_head_forward_mode_and_second_order_match_a_plain_einsum(transposed):
    h, wte, c = head_arrays(1)
    dh, dwte, _ = head_arrays(2)
    ours = jax.jvp(lambda h, w: _tied_head(h, w, transposed), (h, wte), (dh, dwte))
    for a, b in zip(ours, jax.jvp(plain_head, (h, wte), (dh, dwte)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    def hvp(f):
        g = jax.grad(lambda w: jnp.sum(jax.nn.log_softmax(f(h, w)) * c))
        return jax.jvp(g, (wte,), (dwte,))[1]

    np.testing.assert_allclose(
        hvp(lambda h, w: _tied_head(h, w, transposed)), hvp(plain_head), rtol=1e-5, atol=1e-5
    )


def test_lm_head_in_bfloat16_keeps_dtypes_and_a_frozen_table_gets_no_gradient_matmul():
    h, wte, c = (jnp.asarray(a, jnp.bfloat16) for a in head_arrays(3))
    logits = lm_head(wte, h)
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, plain_head(h, wte))  # the same forward product
    loss = lambda h, w: jnp.sum(jnp.tanh(lm_head(w, h)) * c)  # noqa: E731
    grads = jax.grad(loss, argnums=(0, 1))(h, wte)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
    assert _dot_count(jax.grad(loss, argnums=0), h, wte) == 2
    assert _dot_count(jax.grad(loss, argnums=(0, 1)), h, wte) == 3


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's matmul forms")
def test_cpu_lm_head_gradient_reads_a_transposed_copy_of_the_hidden_states():
    assert transposed_weight_gradient(768, 50257)  # GPT-2's head, (C, V)
    h, wte, _ = (jnp.asarray(a) for a in head_arrays(4))
    h, wte = jnp.tile(h, (2, 8, 13)), jnp.tile(wte, (23, 13))  # (6, 40, 91) x (299, 91)

    def weight_dot(transposed: bool) -> str:
        loss = lambda h, w: jnp.sum(jnp.tanh(_tied_head(h, w, transposed)))  # noqa: E731
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, wte).compile().as_text()
        (dot,) = [d for d in hlo.splitlines() if re.search(r"f32\[299,91\]\S* dot\(", d)]
        return dot

    # XLA's own form contracts the token axis of the hidden states as they are (after copying
    # the logits' gradient transposed); ours reads h^T, (C, N), contracting its second axis.
    assert "rhs_contracting_dims={0}" in weight_dot(False)
    assert "rhs_contracting_dims={1}" in weight_dot(True)
