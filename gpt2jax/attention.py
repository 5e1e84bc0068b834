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

from gpt2jax.errors import ConfigError

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
#: Queries per tile of the blockwise attention.
BLOCK_Q = 512
#: Score elements per head in one tile (BLOCK_Q x 512): decoding, with one query, takes the
#: whole cache in one tile.
TILE = 512 * 512
MASKED = -1e10  # what OpenAI's code writes into masked scores


def check_name(name: str) -> None:
    """A clear error naming ``--attention`` for an unknown implementation."""
    if name not in IMPLEMENTATIONS:
        raise ConfigError(f"--attention must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")


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
      (running maximum and sum, as in FlashAttention), in pure JAX with a custom gradient
      that recomputes each tile: no ``(T, S)`` matrix of all heads ever exists, and tiles
      above the causal diagonal are skipped.
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


def _tiles(
    T: int, sizes: tuple[int, ...], causal: bool, bq: int, bk: int
) -> list[tuple[int, int, list]]:
    """``[(q0, q1, [(segment, k0, k1), ...]), ...]``: the query blocks and, for each, the key
    chunks it needs (``k0, k1`` within the segment). With ``causal`` (one segment, the mask
    within the causal one) chunks wholly above the diagonal are left out."""
    out = []
    for q0 in range(0, T, bq):
        q1 = min(q0 + bq, T)
        chunks = []
        for i, S in enumerate(sizes):
            for k0 in range(0, S, bk):
                if causal and k0 > q1 - 1:
                    break
                chunks.append((i, k0, min(k0 + bk, S)))
        out.append((q0, q1, chunks))
    return out


def _tile_scores(q_blk, k_tile, mask, tile, causal_only):
    """Masked float32 scores ``(B, H, tq, tk)`` of one tile."""
    q0, q1, seg_offset, k0, k1 = tile
    D = q_blk.shape[-1]
    s = jnp.einsum("bhtd,bhsd->bhts", q_blk, k_tile, preferred_element_type=jnp.float32)
    s = s / D**0.5
    if causal_only:
        if k1 - 1 > q0:  # the tile crosses the diagonal
            s = jnp.where(_causal(q1 - q0, k1 - k0, q0, k0)[None, None], s, MASKED)
        return s
    m = mask[:, q0:q1, seg_offset + k0 : seg_offset + k1]
    return jnp.where(m[:, None], s, MASKED)


def blockwise(
    q: Array, keys: tuple[Array, ...], values: tuple[Array, ...], mask: Array | None
) -> Array:
    """Attention in tiles with an online softmax (see the module docstring).

    ``mask`` None means causal over one segment of ``T`` keys; a mask over a single segment
    of ``T`` keys is taken to lie within the causal one (the tiles above the diagonal are
    skipped), as every mask :class:`gpt2jax.model.GPT2` builds without a cache does.
    """
    sizes = tuple(k.shape[2] for k in keys)
    T = q.shape[2]
    causal = len(keys) == 1 and sizes[0] == T
    bq = min(T, BLOCK_Q)
    fn = _blockwise_fn(T, sizes, causal, mask is None, bq, max(TILE // bq, 1))
    return fn(q, keys, values, mask)


@functools.cache
def _blockwise_fn(
    T: int, sizes: tuple[int, ...], causal: bool, causal_only: bool, bq: int, bk: int
):
    tiles = _tiles(T, sizes, causal, bq, bk)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()

    def tile_list(q0, q1, chunks):
        return [((q0, q1, offsets[i], k0, k1), i) for i, k0, k1 in chunks]

    def forward(q, keys, values, mask):
        outs, lses = [], []
        for q0, q1, chunks in tiles:
            q_blk = q[:, :, q0:q1]
            B, H, tq, D = q_blk.shape
            m = jnp.full((B, H, tq), -jnp.inf, jnp.float32)
            l = jnp.zeros((B, H, tq), jnp.float32)
            acc = jnp.zeros((B, H, tq, values[0].shape[-1]), jnp.float32)
            for tile, i in tile_list(q0, q1, chunks):
                k0, k1 = tile[3], tile[4]
                s = _tile_scores(q_blk, keys[i][:, :, k0:k1], mask, tile, causal_only)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                corr = jnp.exp(m - m_new)
                v_tile = values[i][:, :, k0:k1]
                pv = jnp.einsum(
                    "bhts,bhsd->bhtd", p.astype(v_tile.dtype), v_tile,
                    preferred_element_type=jnp.float32,
                )  # fmt: skip
                l = l * corr + p.sum(-1)
                acc = acc * corr[..., None] + pv
                m = m_new
            outs.append((acc / l[..., None]).astype(q.dtype))
            lses.append(m + jnp.log(l))
        return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)

    @jax.custom_vjp
    def fn(q, keys, values, mask):
        return forward(q, keys, values, mask)[0]

    def fwd(q, keys, values, mask):
        out, lse = forward(q, keys, values, mask)
        return out, (q, keys, values, mask, out, lse)

    def bwd(res, d_out):
        q, keys, values, mask, out, lse = res
        f32 = jnp.float32
        delta = (d_out.astype(f32) * out.astype(f32)).sum(-1)  # (B, H, T)
        dk: dict = {}
        dv: dict = {}
        dq = []
        D = q.shape[-1]
        for q0, q1, chunks in tiles:
            q_blk, do = q[:, :, q0:q1], d_out[:, :, q0:q1]
            lse_blk, delta_blk = lse[:, :, q0:q1], delta[:, :, q0:q1]
            dq_blk = jnp.zeros(q_blk.shape, f32)
            for tile, i in tile_list(q0, q1, chunks):
                k0, k1 = tile[3], tile[4]
                k_tile, v_tile = keys[i][:, :, k0:k1], values[i][:, :, k0:k1]
                s = _tile_scores(q_blk, k_tile, mask, tile, causal_only)
                p = jnp.exp(s - lse_blk[..., None])  # the forward's probabilities
                dv_t = jnp.einsum(
                    "bhts,bhtd->bhsd", p.astype(do.dtype), do, preferred_element_type=f32
                )
                dp = jnp.einsum("bhtd,bhsd->bhts", do, v_tile.astype(do.dtype),
                                preferred_element_type=f32)  # fmt: skip
                ds = p * (dp - delta_blk[..., None])
                # masked scores are constants (where), so they pass no gradient on
                ds = jnp.where(s > MASKED / 2, ds, 0.0) / D**0.5
                ds = ds.astype(q.dtype)
                dq_blk = dq_blk + jnp.einsum(
                    "bhts,bhsd->bhtd", ds, k_tile, preferred_element_type=f32
                )
                dk_t = jnp.einsum("bhts,bhtd->bhsd", ds, q_blk, preferred_element_type=f32)
                key = (i, k0)
                dk[key] = dk_t if key not in dk else dk[key] + dk_t
                dv[key] = dv_t if key not in dv else dv[key] + dv_t
            dq.append(dq_blk)

        def gather(grads, arrays):
            result = []
            for i, a in enumerate(arrays):
                parts = [
                    grads.get((i, k0), jnp.zeros((*a.shape[:2], k1 - k0, a.shape[3]), f32))
                    for k0, k1 in _chunks(a.shape[2])
                ]
                result.append(jnp.concatenate(parts, axis=2).astype(a.dtype))
            return tuple(result)

        dq = jnp.concatenate(dq, axis=2).astype(q.dtype)
        return dq, gather(dk, keys), gather(dv, values), None  # the mask has no gradient

    def _chunks(S: int) -> list[tuple[int, int]]:
        return [(k0, min(k0 + bk, S)) for k0 in range(0, S, bk)]

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
