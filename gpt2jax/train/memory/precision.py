"""Optimizer state (and parameters) kept in bfloat16 without losing small updates.

Round-to-nearest in bfloat16 silently drops updates smaller than its 8 significant bits;
:func:`dithered_round` rounds stochastically instead, from a hash rather than an RNG key.
:func:`scale_by_adam_lowp` and :func:`scale_by_momentum_lowp` are optax's Adam and momentum with
their state stored that way.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

_GOLDEN = np.uint32(0x9E3779B9)  # decorrelates neighbouring positions
_STEP = np.uint32(0x85EBCA6B)


def _hash32(x: jax.Array) -> jax.Array:
    """Chris Wellons' ``lowbias32`` integer hash (uint32 -> uint32, well mixed)."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _position(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index, uint32 (built from iotas so XLA fuses it)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    return index


def dithered_round(x: jax.Array, dtype: Any, step: jax.Array | int) -> jax.Array:
    """``x`` (float32) in ``dtype``: stochastically rounded when ``dtype`` is bfloat16.

    Why: storing Adam's second moment in bfloat16 with round-to-nearest fails quietly. bfloat16
    keeps 8 significant bits, so ``nu <- 0.999 nu + 0.001 g^2`` rounds back to ``nu`` unless it
    changes by more than 0.2%: ``nu`` can then only grow, never decay, and the step size drifts.
    The same holds for bfloat16 parameters under small learning rates. Stochastic rounding
    (Gupta et al., "Deep Learning with Limited Numerical Precision", 2015) rounds up with
    probability equal to the fraction cut off, which is unbiased, so small updates survive on
    average. The rounding noise here is a counter-based hash of each element's position, the
    step and the value's kept bits, not a random key: it needs no RNG state, fuses into the
    surrounding elementwise update, and keeps the optimizer a pure function of its inputs
    (exact resume stays exact).

    bfloat16 is the top 16 bits of a float32; adding a uniform 16-bit number to the float32's
    bits before truncating rounds the magnitude up with probability (bits cut off) / 2^16.
    """
    dtype = jnp.dtype(dtype)
    if dtype != jnp.bfloat16:
        return x.astype(dtype)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    kept = bits & np.uint32(0xFFFF0000)
    salt = jnp.asarray(step).astype(jnp.uint32) * _STEP
    noise = _hash32(kept ^ (_position(x.shape) * _GOLDEN) ^ salt) >> 16  # uniform in [0, 2^16)
    rounded = (bits + noise) & np.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)  # exact


class AdamLowpState(NamedTuple):
    count: jax.Array  # () int32
    mu: Any
    nu: Any


def scale_by_adam_lowp(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, dtype: Any = jnp.float32
) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` with both moments stored in ``dtype`` (dithered rounding).

    Arithmetic in float32, the stored moments rounded with :func:`dithered_round`; in float32 it
    is optax's up to float32 rounding (tested), as is :func:`scale_by_momentum_lowp`."""

    def init(params: Any) -> AdamLowpState:
        def zeros() -> Any:  # two separate trees: a donated state must not alias itself
            return jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)

        return AdamLowpState(jnp.zeros((), jnp.int32), zeros(), zeros())

    def update(grads: Any, state: AdamLowpState, params: Any = None) -> tuple[Any, AdamLowpState]:
        count = optax.safe_increment(state.count)
        c1 = 1 - jnp.asarray(b1, jnp.float32) ** count
        c2 = 1 - jnp.asarray(b2, jnp.float32) ** count

        def one(g, mu, nu):
            g = g.astype(jnp.float32)
            mu = b1 * mu.astype(jnp.float32) + (1 - b1) * g
            nu = b2 * nu.astype(jnp.float32) + (1 - b2) * jnp.square(g)
            u = (mu / c1) / (jnp.sqrt(nu / c2) + eps)
            return u, dithered_round(mu, dtype, count), dithered_round(nu, dtype, ~count)

        out = jax.tree.map(one, grads, state.mu, state.nu)
        pick = lambda i: jax.tree.map(lambda _, t: t[i], grads, out)  # noqa: E731
        return pick(0), AdamLowpState(count, pick(1), pick(2))

    return optax.GradientTransformation(init, update)


class MomentumLowpState(NamedTuple):
    count: jax.Array  # () int32
    trace: Any


def scale_by_momentum_lowp(decay: float, dtype: Any = jnp.float32) -> optax.GradientTransformation:
    """``optax.trace(decay)`` (heavy-ball momentum: ``t <- g + decay t``), ``t`` in ``dtype``."""

    def init(params: Any) -> MomentumLowpState:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)
        return MomentumLowpState(jnp.zeros((), jnp.int32), zeros)

    def update(grads, state: MomentumLowpState, params=None):
        count = optax.safe_increment(state.count)
        trace = jax.tree.map(
            lambda g, t: g.astype(jnp.float32) + decay * t.astype(jnp.float32), grads, state.trace
        )
        stored = jax.tree.map(lambda t: dithered_round(t, dtype, count), trace)
        return trace, MomentumLowpState(count, stored)

    return optax.GradientTransformation(init, update)
