"""Next-token sampling: temperature, top-k and top-p (nucleus) filtering, greedy choice.

Small pure functions over logits ``(..., V)`` with the meaning and order of Hugging Face's logits
warpers; a filtered-out token gets ``-inf``. Ties are decided by value, never by token id, and
nothing sorts the vocabulary (on a CPU a sort costs more than a decoding step; see
:class:`Sampler`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


def apply_temperature(logits: Array, temperature: Array | float) -> Array:
    """``logits / temperature`` in float32 (``temperature > 0``; lower is more deterministic)."""
    return logits.astype(jnp.float32) / temperature


def _ordered_bits(x: Array) -> Array:
    """float32 -> uint32 with the same order (IEEE sign-magnitude flipped to two's order)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_threshold(keys: Array, weights: Array, target: Array) -> Array:
    """The largest ``t`` with ``sum(weights[keys >= t]) >= target``, per row: ``(..., 1)``.

    ``keys (..., N)`` uint32, ``weights >= 0``. The sum only shrinks as ``t`` grows, so the
    answer is built bit by bit from the most significant one; if even ``t = 0`` (everything)
    falls short, the answer is 0.
    """

    def set_bit(i: Array, t: Array) -> Array:
        candidate = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        total = jnp.sum(jnp.where(keys >= candidate, weights, 0), axis=-1, keepdims=True)
        return jnp.where(total >= target, candidate, t)

    start = jnp.zeros(keys.shape[:-1] + (1,), jnp.uint32)
    return jax.lax.fori_loop(0, 32, set_bit, start)


def top_k_filter(logits: Array, k: int) -> tuple[Array, Array | None]:
    """Keeps the ``k`` largest logits (and ties of the k-th); the rest become ``-inf``.

    ``k`` is static; ``k <= 0`` or ``k >= V`` keeps everything. Also returns the ``k`` largest
    logits ``(..., k)`` (``None`` when nothing was filtered), the only candidates
    :func:`top_p_filter` then needs to look at.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits, None
    # The barrier keeps XLA from rewriting top_k + slice into a full sort (100x slower on CPU).
    top = jax.lax.optimization_barrier(jax.lax.top_k(logits, k)[0])
    return jnp.where(logits >= top[..., -1:], logits, -jnp.inf), top


def top_p_filter(logits: Array, p: Array | float, candidates: Array | None = None) -> Array:
    """Keeps the most likely tokens until their probability reaches ``p``; the rest ``-inf``.

    A token survives when the probability of the tokens more likely than it is below ``p``:
    the most likely token always survives, and ``p >= 1`` keeps everything. Probabilities are
    ``softmax(logits)``. ``candidates (..., N)``: logits that include every finite logit
    larger than the k-th, when ``logits`` went through a top-k filter (then only they are
    searched); default all of ``logits``. ``p`` may be traced.
    """
    logits = logits.astype(jnp.float32)
    candidates = logits if candidates is None else candidates.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs = jnp.exp(candidates - log_z)
    # The smallest logit to keep: the largest t such that the tokens >= t hold mass >= p.
    threshold = _largest_threshold(_ordered_bits(candidates), probs, p)
    keep = (_ordered_bits(logits) >= threshold) | (p >= 1.0)
    return jnp.where(keep, logits, -jnp.inf)


def greedy_choice(logits: Array) -> Array:
    """``argmax`` over the last axis (the lowest id among ties), as int32.

    Written as max, then the smallest index holding it: XLA's CPU argmax (a two-operand
    reduction) is 5x slower on a batch of GPT-2 logits.
    """
    best = jnp.max(logits, axis=-1, keepdims=True)
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == best, ids, logits.shape[-1]), axis=-1)


def sample_categorical(u: Array, logits: Array, chunk: int = 256) -> Array:
    """Token ids ``(B,)`` drawn from ``softmax(logits (B, V))`` given uniforms ``u (B,)`` in [0, 1).

    Inverse-CDF sampling in two levels: the chunk of ``chunk`` tokens whose cumulative
    probability first exceeds the draw, then the token inside it. A token with probability 0
    (logit ``-inf``) is never chosen.
    """
    B, V = logits.shape
    n = -(-V // chunk)
    logits = jnp.pad(
        logits.astype(jnp.float32), ((0, 0), (0, n * chunk - V)), constant_values=-jnp.inf
    )
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)).reshape(B, n, chunk)
    mass = probs.sum(-1)  # (B, n)
    cdf = jnp.cumsum(mass, axis=-1)
    r = (1.0 - u) * cdf[:, -1]  # (B,) in (0, total]
    j = jnp.minimum(jnp.sum(cdf < r[:, None], axis=-1), n - 1)  # chunk: cdf[j-1] < r <= cdf[j]
    before = jnp.where(j > 0, jnp.take_along_axis(cdf, jnp.maximum(j - 1, 0)[:, None], 1)[:, 0], 0)
    inside = jnp.cumsum(jnp.take_along_axis(probs, j[:, None, None], 1)[:, 0], axis=-1)  # (B, c)
    r = jnp.minimum(r - before, inside[:, -1])  # > 0; clipped against rounding
    return (j * chunk + jnp.sum(inside < r[:, None], axis=-1)).astype(jnp.int32)


class Sampler(flax.struct.PyTreeNode):
    """How to choose each next token; a pytree, so it can be passed to ``jax.jit``.

    ``temperature`` and ``top_p`` are traced values: changing them does not recompile.
    ``top_k`` (0 = off), ``greedy`` and ``nucleus`` (whether top-p runs at all) shape the
    compiled program and are static. Build one with :meth:`make`.

    The filters run in the order Hugging Face's ``generate`` applies its logits warpers
    (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``) and mean the
    same: top-k keeps the ``k`` largest logits, top-p (Holtzman et al. 2019, "The Curious Case
    of Neural Text Degeneration") the smallest set of most likely tokens whose probability
    reaches ``p``. Ties are decided by value, never by token id, so the result does not depend
    on how a sort orders equal logits: every token tied with the k-th largest logit survives
    top-k, and top-p keeps every token tied with the last one it needs.

    Nothing here sorts the vocabulary: on a CPU ``jnp.sort`` over GPT-2's 50257 logits takes
    longer than a whole decoding step of the 124M model (BENCHMARKS.md, Generation). Top-k uses
    ``lax.top_k``, top-p finds its threshold by bisection over the bits of a float32 logit (32
    passes of compare-and-sum, :func:`top_p_filter`), and the token is drawn by inverting the
    cumulative distribution in two levels from one uniform number per row
    (:func:`sample_categorical`), where ``jax.random.categorical`` draws a Gumbel number for
    every vocabulary entry.
    """

    temperature: Array | float = 1.0
    top_p: Array | float = 1.0
    top_k: int = flax.struct.field(pytree_node=False, default=0)
    greedy: bool = flax.struct.field(pytree_node=False, default=False)
    nucleus: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def make(
        cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False
    ) -> Sampler:
        """Validated settings; ``temperature == 0`` means greedy, as in most samplers."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        greedy = greedy or temperature == 0
        return cls(
            temperature=1.0 if greedy else float(temperature),
            top_p=float(top_p),
            top_k=0 if greedy else int(top_k),
            greedy=greedy,
            nucleus=not greedy and top_p < 1.0,
        )

    def filter(self, logits: Array) -> Array:
        """The logits ``(..., V)`` the next token is drawn from: tempered, top-k, top-p."""
        logits = apply_temperature(logits, self.temperature)
        logits, top = top_k_filter(logits, self.top_k)
        if self.nucleus:
            logits = top_p_filter(logits, self.top_p, top)
        return logits

    def __call__(self, keys: Array, logits: Array) -> Array:
        """Next tokens ``(B,)`` int32 from logits ``(B, V)`` and one PRNG key per row ``(B, 2)``."""
        if self.greedy:
            return greedy_choice(logits)
        u = jax.vmap(jax.random.uniform)(keys)  # (B,)
        return sample_categorical(u, self.filter(logits))
