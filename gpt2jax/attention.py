"""Causal self-attention, one function (:func:`attend`) over several implementations: ``xla``
(the original einsums), ``blockwise`` (tiles with an online softmax, in pure JAX), ``cudnn``
(cuDNN's fused flash attention), ``splash`` (Pallas' TPU kernel) and ``auto`` (:func:`choose`).

Every implementation computes OpenAI's attention: scores ``q.k / sqrt(D)`` in float32, masked
to -1e10, softmax in float32, probabilities cast to the values' dtype. They agree to float32
rounding (``tests/test_attention.py``) except on query rows that may attend to no key at all
(padding positions of a left-padded batch), whose output is meaningless and differs. Keys and
values come as segments (the KV cache and the new tokens) so that none needs the cache copied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.config import ATTENTION_IMPLEMENTATIONS
from gpt2jax.errors import ConfigError

Array = jax.Array

#: Queries per tile of the blockwise attention.
BLOCK_Q = 256
#: Score elements per head in one tile (BLOCK_Q x 256): decoding, with one query, takes the
#: whole cache in one tile. At 1024 tokens a tile is 1/16 of the (T, T) matrix.
TILE = 256 * 256
MASKED = -1e10  # what OpenAI's code writes into masked scores


def check_name(name: str) -> None:
    """A clear error naming ``--attention`` for an unknown implementation."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            f"--attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {name!r}"
        )


def choose(
    name: str,
    *,
    dtype: Any,
    queries: int,
    keys: int,
    causal_only: bool,
    cached: bool,
    dropout: bool,
    backend: str | None = None,
) -> str:
    """The implementation ``name`` stands for in one call (``auto`` resolved).

    ``causal_only``: the mask is plain causal (no padding), which the fused kernels take as a
    flag. ``cached``: keys include a KV cache (fused kernels are for full sequences; ``xla``
    and ``blockwise`` serve decoding). ``dropout``: attention dropout is on (only ``xla``).
    """
    check_name(name)
    backend = backend or jax.default_backend()
    if dropout:
        if name not in ("auto", "xla"):
            raise ConfigError(f"--attention {name} has no attention dropout: use --dropout 0")
        return "xla"
    fallback = "blockwise" if queries * keys > TILE else "xla"
    if name in ("cudnn", "splash") and cached:
        return fallback  # fused kernels serve the full-sequence pass; decoding uses these
    if name != "auto":
        return name
    if not cached and causal_only:
        if backend == "tpu" and queries % 128 == 0 and _has_splash():
            return "splash"
        if backend == "gpu" and cudnn_supported(dtype):
            return "cudnn"
    return fallback


def cudnn_supported(dtype: Any) -> bool:
    """cuDNN flash attention's requirements: a 16-bit dtype, compute capability >= 8.0."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    try:
        capability = jax.devices()[0].compute_capability
    except AttributeError:
        return False
    return float(capability) >= 8.0


@functools.cache
def _has_splash() -> bool:
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: F401
    except ImportError:
        return False
    return True


def attend(
    q: Array,  # (B, H, T, D)
    keys: Sequence[Array],  # segments (B, H, S_i, D), attended side by side
    values: Sequence[Array],
    mask: Array | None,  # (B, T, sum S_i) bool, or None: causal over one segment of T keys
    *,
    implementation: str,
    dropout: Callable[[Array], Array] | None = None,
) -> Array:
    """Attention output ``(B, H, T, D)``; ``implementation`` is one of :func:`choose`'s
    results. ``q`` is cast to the keys' dtype (a float32 KV cache keeps decoding precise);
    ``dropout`` (``xla`` only) is applied to the probabilities.

    * ``xla``: einsum, mask, float32 softmax, einsum: the original code, which XLA compiles
      on any backend. It materialises the ``(B, H, T, S)`` scores and probabilities, and is
      the only one with attention dropout.
    * ``blockwise``: the same maths in tiles of queries x keys with an online softmax
      (running maximum and sum, as in FlashAttention), in pure JAX: ``lax.fori_loop`` over
      query blocks and key chunks, with a custom gradient that recomputes each tile the same
      way. One tile's scores exist at a time, and tiles above the causal diagonal are skipped.
    * ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused
      flash attention (NVIDIA GPUs of compute capability 8.0 or newer, bfloat16/float16).
    * ``splash``: Pallas' splash attention for TPUs (causal, sequence a multiple of 128); on
      other backends it runs in Pallas' interpreter, which is only for tests.
    * ``auto``: :func:`choose`, the fused kernel where the device has one and the call allows
      it, else ``blockwise`` when the score matrix is larger than one tile, else ``xla``.
    """
    keys, values = tuple(keys), tuple(values)
    q = q.astype(keys[0].dtype)
    if implementation == "xla":
        return _xla(q, keys, values, mask, dropout)
    if implementation == "blockwise":
        return blockwise(q, keys, values, mask)
    if implementation == "cudnn":
        return _fused_dot_product(q, keys, values, mask, "cudnn")
    if implementation == "splash":
        if mask is not None or len(keys) != 1:
            raise ConfigError("splash attention takes full causal sequences (no padding mask)")
        return splash(q, keys[0], values[0], interpret=jax.default_backend() != "tpu")
    raise ConfigError(f"unknown attention implementation {implementation!r}")


def _causal(t: int, s: int, q_start: int = 0, k_start: int = 0) -> Array:
    """(t, s) bool: query ``q_start + i`` may see key ``k_start + j <= q_start + i``."""
    rows = q_start + jax.lax.broadcasted_iota(jnp.int32, (t, s), 0)
    cols = k_start + jax.lax.broadcasted_iota(jnp.int32, (t, s), 1)
    return cols <= rows


def _xla(q, keys, values, mask, dropout):
    """The original attention: every score materialised, one float32 softmax."""
    return mix(probabilities(q, keys, mask, dropout), values)


def probabilities(
    q: Array,  # (B, H, T, D)
    keys: Sequence[Array],
    mask: Array | None,
    dropout: Callable[[Array], Array] | None = None,
) -> list[Array]:
    """The ``xla`` attention's float32 probabilities, one ``(B, H, T, S_i)`` per key segment
    (for callers that return them, e.g. ``output_attentions``); :func:`mix` finishes."""
    q = q.astype(keys[0].dtype)
    D = q.shape[-1]
    if mask is None:
        mask = _causal(q.shape[2], keys[0].shape[2])[None]
    f32 = jnp.float32
    scores = [jnp.einsum("bhtd,bhsd->bhts", q, kb, preferred_element_type=f32) for kb in keys]
    scores = jnp.concatenate(scores, axis=-1) / D**0.5  # (B, H, T, keys)
    scores = jnp.where(mask[:, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1)  # (B, H, T, keys) float32
    if dropout is not None:
        probs = dropout(probs)
    return jnp.split(probs, np.cumsum([kb.shape[2] for kb in keys[:-1]]).tolist(), axis=-1)


def mix(probs: Sequence[Array], values: Sequence[Array]) -> Array:
    """The values weighted by :func:`probabilities`: ``(B, H, T, D)``."""
    return sum(
        jnp.einsum("bhts,bhsd->bhtd", p.astype(vb.dtype), vb)
        for p, vb in zip(probs, values, strict=True)
    )


def _fused_dot_product(q, keys, values, mask, implementation):
    """``jax.nn.dot_product_attention`` (layout ``(B, T, H, D)``)."""
    k = keys[0] if len(keys) == 1 else jnp.concatenate(keys, axis=2)
    v = values[0] if len(values) == 1 else jnp.concatenate(values, axis=2)
    t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    y = jax.nn.dot_product_attention(
        t(q), t(k), t(v), mask=None if mask is None else mask[:, None],
        is_causal=mask is None, implementation=implementation,
    )  # fmt: skip
    return t(y)


# -- blockwise ---------------------------------------------------------------------------------


def _pad_to(x: Array, axis: int, size: int, value: Any = 0) -> Array:
    """``x`` padded with ``value`` at the end of ``axis`` to ``size``."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def blockwise(
    q: Array, keys: tuple[Array, ...], values: tuple[Array, ...], mask: Array | None
) -> Array:
    """Attention in tiles with an online softmax (see :func:`attend`).

    ``mask`` None means causal over one segment of ``T`` keys; a mask over a single segment
    of ``T`` keys is taken to lie within the causal one (the tiles above the diagonal are
    skipped), as every mask :class:`gpt2jax.model.GPT2` builds without a cache does. Queries
    are padded to whole blocks and each key segment to whole chunks (padded keys masked out).
    """
    sizes = tuple(k.shape[2] for k in keys)
    T = q.shape[2]
    causal = len(keys) == 1 and sizes[0] == T
    bq = min(T, BLOCK_Q)
    chunks = tuple(min(S, max(TILE // bq, 1)) for S in sizes)
    fn = _blockwise_fn(causal, mask is None, bq, chunks)
    n_q = -(-T // bq)
    padded = tuple(-(-S // c) * c for S, c in zip(sizes, chunks, strict=True))
    keys = tuple(_pad_to(k, 2, P) for k, P in zip(keys, padded, strict=True))
    values = tuple(_pad_to(v, 2, P) for v, P in zip(values, padded, strict=True))
    if mask is not None:
        bounds = np.cumsum((0, *sizes)).tolist()
        parts = [mask[:, :, a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        mask = tuple(_pad_to(_pad_to(m, 2, P, False), 1, n_q * bq, False)
                     for m, P in zip(parts, padded, strict=True))  # fmt: skip
    y = fn(_pad_to(q, 2, n_q * bq), keys, values, mask)
    return y[:, :, :T]


@functools.cache
def _blockwise_fn(causal: bool, causal_only: bool, bq: int, chunks: tuple[int, ...]):
    """The blockwise attention of padded inputs (``mask``: one ``(B, Tq, S_i)`` bool per
    segment, or None), with its custom gradient. Queries go through ``lax.fori_loop`` in
    blocks of ``bq`` and, within a block, each segment's keys in chunks of ``chunks[i]``: one
    tile's scores exist at a time. With ``causal`` only the chunks a block can see are run."""
    f32 = jnp.float32
    slice_ = jax.lax.dynamic_slice_in_dim

    def n_chunks(i, q0, keys):
        """How many chunks of segment ``i`` the query block at ``q0`` attends to."""
        total = keys[i].shape[2] // chunks[i]
        if not causal:
            return total
        return jnp.minimum((q0 + bq - 1) // chunks[i] + 1, total)

    def scores(q_blk, k_tile, mask, i, q0, k0):
        """Masked float32 scores ``(B, H, bq, chunk)`` of one tile."""
        D = q_blk.shape[-1]
        s = jnp.einsum("bhtd,bhsd->bhts", q_blk, k_tile, preferred_element_type=f32) / D**0.5
        if causal_only:
            keep = _causal(bq, chunks[i], q0, k0)[None]
        else:
            keep = jax.lax.dynamic_slice(mask[i], (0, q0, k0), (mask[i].shape[0], bq, chunks[i]))
        return jnp.where(keep[:, None], s, MASKED)

    def forward(q, keys, values, mask):
        B, H, Tq, _ = q.shape
        Dv = values[0].shape[-1]

        def q_block(b, carry):
            out, lse = carry
            q0 = b * bq
            q_blk = slice_(q, q0, bq, axis=2)
            m = jnp.full((B, H, bq), -jnp.inf, f32)
            state = (m, jnp.zeros((B, H, bq), f32), jnp.zeros((B, H, bq, Dv), f32))
            for i in range(len(keys)):

                def k_chunk(c, state, i=i):
                    m, l, acc = state
                    k0 = c * chunks[i]
                    s = scores(q_blk, slice_(keys[i], k0, chunks[i], 2), mask, i, q0, k0)
                    v_tile = slice_(values[i], k0, chunks[i], 2)
                    m_new = jnp.maximum(m, s.max(-1))
                    p = jnp.exp(s - m_new[..., None])
                    corr = jnp.exp(m - m_new)
                    pv = jnp.einsum("bhts,bhsd->bhtd", p.astype(v_tile.dtype), v_tile,
                                    preferred_element_type=f32)  # fmt: skip
                    return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

                state = jax.lax.fori_loop(0, n_chunks(i, q0, keys), k_chunk, state)
            m, l, acc = state
            out = jax.lax.dynamic_update_slice_in_dim(
                out, (acc / l[..., None]).astype(q.dtype), q0, 2
            )
            return out, jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), q0, 2)

        init = (jnp.zeros((B, H, Tq, Dv), q.dtype), jnp.zeros((B, H, Tq), f32))
        return jax.lax.fori_loop(0, Tq // bq, q_block, init)

    @jax.custom_vjp
    def fn(q, keys, values, mask):
        return forward(q, keys, values, mask)[0]

    def fwd(q, keys, values, mask):
        out, lse = forward(q, keys, values, mask)
        return out, (q, keys, values, mask, out, lse)

    def bwd(res, d_out):
        q, keys, values, mask, out, lse = res
        D = q.shape[-1]
        delta = (d_out.astype(f32) * out.astype(f32)).sum(-1)  # (B, H, Tq)

        def q_block(b, carry):
            dq, dks, dvs = carry
            q0 = b * bq
            q_blk, do = slice_(q, q0, bq, 2), slice_(d_out, q0, bq, 2)
            lse_blk, delta_blk = slice_(lse, q0, bq, 2), slice_(delta, q0, bq, 2)
            dq_blk = jnp.zeros(q_blk.shape, f32)
            dks, dvs = list(dks), list(dvs)
            for i in range(len(keys)):

                def k_chunk(c, state, i=i):
                    dq_blk, dk, dv = state
                    k0 = c * chunks[i]
                    k_tile, v_tile = (
                        slice_(keys[i], k0, chunks[i], 2),
                        slice_(values[i], k0, chunks[i], 2),
                    )
                    s = scores(q_blk, k_tile, mask, i, q0, k0)
                    p = jnp.exp(s - lse_blk[..., None])  # the forward's probabilities
                    dv_t = jnp.einsum("bhts,bhtd->bhsd", p.astype(do.dtype), do,
                                      preferred_element_type=f32)  # fmt: skip
                    dp = jnp.einsum("bhtd,bhsd->bhts", do, v_tile.astype(do.dtype),
                                    preferred_element_type=f32)  # fmt: skip
                    ds = p * (dp - delta_blk[..., None])
                    # masked scores are constants (where), so they pass no gradient on
                    ds = (jnp.where(s > MASKED / 2, ds, 0.0) / D**0.5).astype(q.dtype)
                    dq_blk = dq_blk + jnp.einsum("bhts,bhsd->bhtd", ds, k_tile,
                                                 preferred_element_type=f32)  # fmt: skip
                    dk_t = jnp.einsum("bhts,bhtd->bhsd", ds, q_blk, preferred_element_type=f32)
                    dk = jax.lax.dynamic_update_slice_in_dim(
                        dk, slice_(dk, k0, chunks[i], 2) + dk_t, k0, 2
                    )
                    dv = jax.lax.dynamic_update_slice_in_dim(
                        dv, slice_(dv, k0, chunks[i], 2) + dv_t, k0, 2
                    )
                    return dq_blk, dk, dv

                dq_blk, dks[i], dvs[i] = jax.lax.fori_loop(
                    0, n_chunks(i, q0, keys), k_chunk, (dq_blk, dks[i], dvs[i])
                )
            dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_blk.astype(q.dtype), q0, 2)
            return dq, tuple(dks), tuple(dvs)

        init = (
            jnp.zeros(q.shape, q.dtype),
            tuple(jnp.zeros(k.shape, f32) for k in keys),
            tuple(jnp.zeros(v.shape, f32) for v in values),
        )
        dq, dks, dvs = jax.lax.fori_loop(0, q.shape[2] // bq, q_block, init)
        dks = tuple(g.astype(k.dtype) for g, k in zip(dks, keys, strict=True))
        dvs = tuple(g.astype(v.dtype) for g, v in zip(dvs, values, strict=True))
        return dq, dks, dvs, None  # the mask has no gradient

    fn.defvjp(fwd, bwd)
    return fn


# -- splash (TPU) ------------------------------------------------------------------------------


def splash(q: Array, k: Array, v: Array, *, interpret: bool = False) -> Array:
    """Causal attention with Pallas' splash kernel, ``(B, H, T, D)`` in and out."""
    B, H, T, D = q.shape
    kernel = _splash_kernel(H, T, interpret)
    return jax.vmap(kernel)((q * (1.0 / D**0.5)).astype(q.dtype), k, v)


@functools.cache
def _splash_kernel(heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    block = next((b for b in (512, 256, 128) if length % b == 0), None)
    if block is None:
        raise ConfigError(f"splash attention needs a length divisible by 128, got {length}")
    sizes = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
    return sk.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
