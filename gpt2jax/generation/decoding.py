"""Compiled KV-cache decoding: one prefill pass, then a ``lax.while_loop`` that samples a token
per iteration. Pure functions over ``(config, params, left-padded token ids)``.

Rows are left-padded so every row's newest token sits in the same cache slot, and each row
decodes exactly as it would alone (:func:`generate_tokens`). The layers run one by one on
per-layer weights and caches (:func:`layer_params`), not through the model's ``nn.scan``, whose
stacked weights XLA copies a slice of before every matmul.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from gpt2jax.config import GPT2Config
from gpt2jax.generation.sampling import Sampler
from gpt2jax.layer_views import layers
from gpt2jax.model import Block, KVCache, LayerNorm, lm_head

Array = jax.Array


def layer_params(params: dict) -> dict:
    """The parameter tree with ``h`` split into a tuple of per-layer trees, for decoding.

    The layers are :func:`gpt2jax.layers` views of the stacked arrays (numpy layers placed on
    the default device). Already split trees are returned unchanged.
    """
    if isinstance(params["h"], (tuple, list)):
        return params  # already split
    on_device = [
        jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), layer)
        for layer in layers(params)
    ]
    return {**{k: v for k, v in params.items() if k != "h"}, "h": tuple(on_device)}


def empty_cache(config: GPT2Config, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
    """Zeroed keys and values for ``length`` slots: per layer ``(B, H, S, D)`` each.

    The decoding loop updates these buffers in place. Each step feeds ``(B, 1)`` tokens and
    attends over all ``S`` slots (masked), so the cache length is a compile-time shape, which
    :mod:`gpt2jax.generation.host` rounds up to buckets.

    The model attends in the cache's dtype: :func:`gpt2jax.device.kv_cache_dtype` chooses
    float32 on a CPU (its 16-bit batched matmuls convert) and the compute dtype elsewhere.
    """
    return KVCache.zeros(config, batch, length, dtype)


def _rows(table: Array, ids: Array) -> Array:
    """``table[ids]``; a 16-bit table is gathered as raw bits, because XLA's CPU backend would
    otherwise convert the whole table to float32 to gather from it (it still copies the bits
    once per compiled call, a few ms for 124M's ``wte``)."""
    if jnp.dtype(table.dtype).itemsize != 2:
        return jnp.take(table, ids, axis=0)
    bits = jax.lax.bitcast_convert_type(table, jnp.uint16)
    return jax.lax.bitcast_convert_type(jnp.take(bits, ids, axis=0), table.dtype)


def forward_layers(
    config: GPT2Config,
    params: dict,  # from layer_params
    cache: KVCache,
    ids: Array,  # (B, T) int
    positions: Array,  # (B, T) int
    key_mask: Array,  # (B, S) bool: cache slots a row may attend to (its padding is False)
    index: Array,  # () int32: cache slot of ids[:, 0]
    dtype: Any = jnp.float32,
    attention: str = "auto",
) -> tuple[Array, KVCache]:
    """:meth:`GPT2.forward <gpt2jax.model.GPT2.forward>` with a cache, one layer at a time.

    Returns the final hidden states ``(B, T, C)`` (after ``ln_f``, before the LM head) and the
    updated cache. Queries attend to cache slots at or before their own that ``key_mask`` allows.
    """
    T, S = ids.shape[1], key_mask.shape[1]
    x = (_rows(params["wte"], ids) + _rows(params["wpe"], positions)).astype(dtype)  # (B, T, C)
    causal = jnp.arange(S)[None, :] <= (index + jnp.arange(T))[:, None]  # (T, S)
    allowed = causal[None] & key_mask[:, None, :]  # (B, T, S)
    new_cache = []
    for layer, layer_cache in zip(params["h"], cache.layers, strict=True):
        pdt = layer["ln_1"]["g"].dtype
        block = Block(config, dtype, pdt, deterministic=True, attention=attention)
        x, (layer_cache, _, _) = block.apply({"params": layer}, x, layer_cache, allowed, index)
        new_cache.append(layer_cache)
    ln_f = LayerNorm(config.layer_norm_epsilon, dtype, params["ln_f"]["g"].dtype)
    return ln_f.apply({"params": params["ln_f"]}, x), KVCache(layers=tuple(new_cache))


class DecodeState(flax.struct.PyTreeNode):
    """Everything the decoding loop carries, for a batch of ``B`` rows and ``S`` cache slots."""

    cache: KVCache
    tokens: Array  # (B, S) int32: the token of every slot (padding, prompt, generated)
    pad: Array  # (B,) int32: padding slots before each row's prompt
    last: Array  # (B,) int32: the last slot each row may fill (context end or token budget)
    keys: Array  # (B, 2) uint32: each row's PRNG key
    index: Array  # () int32: slot of the newest token, the next one fed to the model
    length: Array  # (B,) int32: tokens generated per row (a stopping token included)
    done: Array  # (B,) bool: the row has stopped (stop token, budget, or told so by the caller)


def _choose(
    state_keys: Array, length: Array, logits: Array, sampler: Sampler
) -> Array:  # (B,) int32
    keys = jax.vmap(jax.random.fold_in)(state_keys, length)
    return sampler(keys, logits)


def prefill(
    config: GPT2Config,
    params: dict,
    ids: Array,  # (B, P) int32, left-padded
    pad: Array,  # (B,) int32
    last: Array,  # (B,) int32
    keys: Array,  # (B, 2) uint32
    sampler: Sampler,
    stop_token: Array | int,  # () int32; -1 for none
    cache_len: int,
    dtype: Any = jnp.float32,
    attention: str = "auto",
    cache_dtype: Any = jnp.float32,
) -> tuple[DecodeState, Array]:
    """Runs the prompts through the model in one pass and samples each row's first new token.

    Only the last position's logits are computed (the LM head over the whole prompt would cost
    ``P`` times as much). Returns the state, whose newest token is that sample, and the
    logits ``(B, V)`` float32 it was drawn from.
    """
    B, P = ids.shape
    cache = empty_cache(config, B, cache_len, cache_dtype)
    positions = jnp.maximum(jnp.arange(P)[None, :] - pad[:, None], 0)  # (B, P); padding -> 0
    key_mask = jnp.arange(cache_len)[None, :] >= pad[:, None]  # (B, S)
    hidden, cache = forward_layers(
        config, params, cache, ids, positions, key_mask, 0, dtype, attention
    )
    logits = lm_head(params["wte"], hidden[:, -1])  # (B, V)
    length = jnp.zeros((B,), jnp.int32)
    token = _choose(keys, length, logits, sampler)
    tokens = jnp.zeros((B, cache_len), jnp.int32).at[:, :P].set(ids).at[:, P].set(token)
    state = DecodeState(
        cache=cache,
        tokens=tokens,
        pad=pad,
        last=last,
        keys=keys,
        index=jnp.int32(P),
        length=length + 1,
        done=(token == stop_token) | (P >= last),
    )
    return state, logits


def step(
    config: GPT2Config,
    params: dict,
    state: DecodeState,
    sampler: Sampler,
    stop_token: Array | int,
    dtype: Any = jnp.float32,
    attention: str = "auto",
) -> tuple[DecodeState, Array]:
    """Feeds every row's newest token and samples the next; rows already done stay done.

    Returns the new state and the logits ``(B, V)`` float32 of the fed position.
    """
    t = state.index
    ids = jax.lax.dynamic_slice_in_dim(state.tokens, t, 1, axis=1)  # (B, 1)
    # A row that is done keeps stepping (its results unused); its position is clipped in range.
    positions = jnp.minimum(t - state.pad, config.n_ctx - 1)[:, None]  # (B, 1)
    key_mask = jnp.arange(state.tokens.shape[1])[None, :] >= state.pad[:, None]
    hidden, cache = forward_layers(
        config, params, state.cache, ids, positions, key_mask, t, dtype, attention
    )
    logits = lm_head(params["wte"], hidden[:, 0])  # (B, V)
    token = _choose(state.keys, state.length, logits, sampler)
    state = state.replace(
        cache=cache,
        tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], t + 1, axis=1),
        index=t + 1,
        length=state.length + (~state.done).astype(jnp.int32),
        done=state.done | (token == stop_token) | (t + 1 >= state.last),
    )
    return state, logits


def decode(
    config: GPT2Config,
    params: dict,
    state: DecodeState,
    until: Array | int,
    sampler: Sampler,
    stop_token: Array | int,
    dtype: Any = jnp.float32,
    attention: str = "auto",
) -> DecodeState:
    """Steps until slot ``until`` is filled or every row is done, inside one ``while_loop``.

    ``until`` is a traced value, so running a long generation in chunks (for streaming) calls
    the same compiled loop again with the returned state.
    """

    def cond(s: DecodeState) -> Array:
        return (s.index < until) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        return step(config, params, s, sampler, stop_token, dtype, attention)[0]

    return jax.lax.while_loop(cond, body, state)


#: XLA's CPU copy insertion by default copies a loop-carried buffer that is read (the cache, by
#: attention) and then updated in place; its region analysis proves the order safe instead
#: (measured: 2 copies of every layer's cache per token without it). Other backends ignore it.
_XLA_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}

#: Compiled entry points. A new compilation happens per static argument (config, sampler
#: settings, dtype, cache length) and per input shape (batch, prompt length); the state passed
#: to ``decode_jit`` is donated, so its cache is updated in place across calls.
prefill_jit = jax.jit(
    prefill,
    static_argnames=("config", "cache_len", "dtype", "attention", "cache_dtype"),
    compiler_options=_XLA_OPTIONS,
)
decode_jit = jax.jit(
    decode,
    static_argnames=("config", "dtype", "attention"),
    donate_argnames=("state",),
    compiler_options=_XLA_OPTIONS,
)


def row_keys(seed: int, ids: Any) -> Array:
    """Per-row PRNG keys ``(B, 2)``: ``fold_in(PRNGKey(seed), ids[b])`` for sample ids ``ids``.

    Row ``b``'s ``n``-th new token then uses ``fold_in(keys[b], n)``, so a sample does not
    depend on the batch it was generated in, its padding or the cache length.
    """
    ids = jnp.asarray(ids, jnp.uint32)
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed), ids)


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new_tokens", "dtype", "attention", "cache_dtype"),
    compiler_options=_XLA_OPTIONS,
)
def generate_tokens(
    config: GPT2Config,
    params: dict,
    ids: Array,
    pad: Array,
    keys: Array,
    *,
    max_new_tokens: int,
    sampler: Sampler,
    stop_token: Array | int = -1,
    dtype: Any = jnp.float32,
    attention: str = "auto",
    cache_dtype: Any = jnp.float32,
) -> tuple[Array, Array]:
    """Samples up to ``max_new_tokens`` after left-padded prompts, all in one compiled call.

    The layout is the usual left-padded batch decoding (as Hugging Face's ``generate`` does it
    with an ``attention_mask``): row ``b`` has ``pad[b]`` padding slots, then its prompt, so
    every row's newest token sits in the same cache slot and one ``dynamic_update_slice``
    writes the whole batch. Each row gets its own positions (``slot - pad[b]``) and a key mask
    that hides its padding, so a row decodes exactly as it would alone.

    Args:
        config: the model's shape.
        params: the parameter tree (stacked, or split by :func:`layer_params`: pass split
            params when calling this repeatedly, so the layers are not sliced on every call).
        ids: ``(B, P)`` int32 prompts, row ``b`` left-padded with ``pad[b]`` arbitrary tokens.
        pad: ``(B,)`` int32 padding per row (``< P``: every row needs a prompt token).
        keys: ``(B, 2)`` PRNG keys, one per row (see :func:`row_keys`).
        max_new_tokens: how many tokens to sample; a row also stops at the end of the
            context (``n_ctx`` positions) and after sampling ``stop_token``.
        sampler: a :class:`~gpt2jax.generation.sampling.Sampler`.
        stop_token: token id that ends a row (included in the output), or -1.
        dtype: compute dtype.
        attention: the attention implementation (:mod:`gpt2jax.attention`).
        cache_dtype: the KV cache's dtype (see :func:`empty_cache`).

    Returns:
        ``tokens (B, max_new_tokens)`` int32 and ``lengths (B,)``: row ``b``'s new tokens are
        ``tokens[b, :lengths[b]]``.
    """
    B, P = ids.shape
    params = layer_params(params)
    budget = jnp.minimum(max_new_tokens, config.n_ctx - (P - pad))  # new tokens each row may take
    last = P - 1 + budget  # (B,)
    state, _ = prefill(
        config, params, ids, pad, last, keys, sampler, stop_token, P + max_new_tokens, dtype,
        attention, cache_dtype,
    )  # fmt: skip
    state = decode(
        config, params, state, P + max_new_tokens - 1, sampler, stop_token, dtype, attention
    )
    return state.tokens[:, P:], state.length
