"""GPT-2 in Flax, exactly as OpenAI released it.

Follows OpenAI's ``src/model.py`` (openai/gpt-2) with OpenAI's parameter names: learned token
and position embeddings, pre-LN transformer blocks (LayerNorm with biased variance and epsilon
1e-5, causal multi-head attention, tanh-approximate GELU MLP), a final LayerNorm, and the LM head
tied to ``wte``. Hugging Face's ``GPT2LMHeadModel`` computes the same function; the tests check
ours against it. The parameter tree and the design choices (scanned layers, remat, KV cache,
mixed precision) are described on :class:`GPT2`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from gpt2jax import attention
from gpt2jax.config import REMAT_POLICIES, GPT2Config

Array = jax.Array


class KVCache(flax.struct.PyTreeNode):
    """Keys and values of every layer for ``S`` cache slots, the one cache type of the library.

    ``layers[i]`` is layer ``i``'s ``(k, v)``, each ``(B, H, S, D)``: a buffer per layer, which
    the sampler (:mod:`gpt2jax.generation.decoding`) updates in place, and which
    :meth:`GPT2.forward` takes and returns too (it stacks them for its layer scan: a copy of the
    cache per call).
    """

    layers: tuple[tuple[Array, Array], ...]

    @classmethod
    def zeros(
        cls, config: GPT2Config, batch: int, length: int, dtype: Any = jnp.float32
    ) -> KVCache:
        """An empty cache of ``length`` slots: per layer, k and v each ``(B, H, length, D)``."""
        shape = (batch, config.n_head, length, config.head_dim)
        zeros = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layer)]
        return cls(layers=tuple(zeros))

    @property
    def length(self) -> int:
        """``S``, the number of slots."""
        return self.layers[0][0].shape[2]

    def stacked(self) -> tuple[Array, Array]:
        """Keys and values stacked over layers: ``k``, ``v`` each ``(L, B, H, S, D)`` (a copy)."""
        return (
            jnp.stack([k for k, _ in self.layers]),
            jnp.stack([v for _, v in self.layers]),
        )

    @classmethod
    def from_stacked(cls, k: Array, v: Array) -> KVCache:
        """The inverse of :meth:`stacked`."""
        return cls(layers=tuple((k[i], v[i]) for i in range(k.shape[0])))


class GPT2Output(flax.struct.PyTreeNode):
    """What :meth:`GPT2.forward` returns.

    ``logits``: ``(B, T, V)`` float32, or ``None`` with ``compute_logits=False``.
    ``last_hidden``: ``(B, T, C)`` after the final LayerNorm (the LM head's input).
    ``hidden_states``: with ``output_hidden_states=True``, a tuple of ``L + 1`` arrays ``(B, T, C)``
    as Hugging Face returns them: the input of every block, then ``last_hidden``.
    ``attentions``: with ``output_attentions=True``, a tuple of ``L`` arrays ``(B, H, T, S)``
    float32, every layer's attention probabilities (after dropout, as Hugging Face returns them);
    ``S`` is ``T``, or the cache's slots when a cache was passed in.
    ``cache``: the updated :class:`KVCache` when one was passed in.
    """

    logits: Array | None
    last_hidden: Array
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None
    cache: KVCache | None = None


class LayerNorm(nn.Module):
    """OpenAI's ``norm``: biased variance, epsilon inside the square root, statistics in float32."""

    epsilon: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (..., C)
        c = x.shape[-1]
        g = self.param("g", nn.initializers.ones, (c,), self.param_dtype)
        b = self.param("b", nn.initializers.zeros, (c,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * g.astype(jnp.float32) + b.astype(jnp.float32)).astype(self.dtype)


class Conv1D(nn.Module):
    """OpenAI's ``conv1d``, a dense layer: ``w`` is ``(nx, nf)`` (OpenAI stores ``(1, nx, nf)``)."""

    features: int
    dtype: Any
    param_dtype: Any
    w_std: float = 0.02

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, T, nx) -> (B, T, nf)
        nx = x.shape[-1]
        w = self.param(
            "w", nn.initializers.normal(self.w_std), (nx, self.features), self.param_dtype
        )
        b = self.param("b", nn.initializers.zeros, (self.features,), self.param_dtype)
        transposed = transposed_weight_gradient(nx, self.features)
        y = dense(x, w.astype(self.dtype), transposed)  # (B, T, nf) float32
        return (y + b.astype(jnp.float32)).astype(self.dtype)


def transposed_weight_gradient(nx: int, nf: int) -> bool:
    """Whether :func:`dense` forms the weight gradient of an ``(nx, nf)`` layer from a transposed
    copy of its input here: on a CPU, for layers whose input is no wider than their output.

    XLA's CPU backend runs ``x^T @ dy`` on Eigen's transposed-operand matmul, about 20% slower
    than its YNNPACK matmul once ``x^T`` exists; copying ``x^T`` costs one strided pass over
    ``x``. That pays for GPT-2's c_attn, attention c_proj, c_fc and the tied LM head
    (:func:`lm_head`, ``(C, V)``), and not for the MLP's c_proj, whose input is 4x wider
    (BENCHMARKS.md). GPUs and TPUs keep XLA's own form (never
    compared there).
    """
    return jax.default_backend() == "cpu" and nx <= nf


def _matmul(x: Array, w: Array) -> Array:  # (..., nx) @ (nx, nf) -> (..., nf) float32
    # float32 accumulation (a no-op in float32): in bfloat16 it is more precise, and it is the
    # bf16 x bf16 -> f32 form that XLA's CPU backend hands to its fast (YNNPACK) matmuls.
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def dense(x: Array, w: Array, transposed_weight_gradient: bool = False) -> Array:
    """``x @ w`` accumulated in float32: ``(..., nx) @ (nx, nf) -> (..., nf)``.

    With ``transposed_weight_gradient``, the reverse pass forms ``w``'s gradient as
    ``transpose(x) @ dy`` from a copy of ``x`` transposed in memory, not as XLA's ``dot`` that
    contracts both operands' leading (token) axis: the same products, summed in another order.
    XLA's CPU backend runs the latter on Eigen, the former on YNNPACK, about 20% faster
    (:func:`transposed_weight_gradient`). Forward-mode and higher derivatives work as for a
    plain ``dot``: this is a custom JVP, whose transpose JAX derives.
    """
    return _matmul(x, w)


@functools.partial(dense.defjvp, symbolic_zeros=True)
def _dense_jvp(transposed_weight_gradient, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _matmul(x, w)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(_matmul(dx, w))
    if not isinstance(dw, SymbolicZero):  # a frozen weight has no gradient to form
        terms.append(_weight_term(x, dw, transposed_weight_gradient))
    # JAX calls this rule only when some tangent is nonzero: terms is never empty.
    return y, sum(terms[1:], terms[0])


def _weight_term(x: Array, dw: Array, transposed: bool) -> Array:
    """The weight's term ``x @ dw`` of a dense layer's JVP ``(..., nx) @ (nx, nf)``; with
    ``transposed``, written so that its transpose, the weight's gradient, is ``x^T @ dy``."""
    if not transposed:
        return _matmul(x, dw)
    # x^T as its own array (the barrier keeps XLA from folding the transpose back into the dot)
    xt = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)  # (nx, N)
    dims = (((0,), (0,)), ((), ()))
    term = jax.lax.dot_general(xt, dw, dims, preferred_element_type=jnp.float32)  # (N, nf)
    return term.reshape(*x.shape[:-1], dw.shape[-1])


class Attention(nn.Module):
    """Causal multi-head self-attention (``attn/c_attn``, ``attn/c_proj``), optionally cached.

    Returns the output, the updated layer cache, and with ``output_attentions`` the attention
    probabilities ``(B, H, T, S)`` (else None). It sows them as ``intermediates/probs`` (a no-op
    unless that collection is mutable). ``attention`` names the implementation
    (:mod:`gpt2jax.attention`); returning or sowing probabilities needs them materialised, so
    those calls run ``xla``.
    """

    config: GPT2Config
    dtype: Any
    param_dtype: Any
    deterministic: bool
    output_attentions: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: Array,  # (B, T, C)
        layer_cache: tuple[Array, Array] | None,  # k, v: (B, H, S, D)
        mask: Array | None,  # (B, T, S) bool: which keys each query may attend to; None: causal
        cache_index: Array,  # () int32: cache slot of x[:, 0]
    ) -> tuple[Array, tuple[Array, Array] | None, Array | None]:
        cfg = self.config
        B, T, C = x.shape
        H, D = cfg.n_head, cfg.head_dim
        qkv = Conv1D(3 * C, self.dtype, self.param_dtype, name="c_attn")(x)  # (B, T, 3C)
        # OpenAI splits c_attn's output into q, k, v in that order, then into heads.
        q, k, v = (t.reshape(B, T, H, D).transpose(0, 2, 1, 3) for t in jnp.split(qkv, 3, -1))
        keys, values = [k], [v]  # segments of keys/values attended side by side: (B, H, *, D)
        if layer_cache is not None:
            # The queries see the cache as it was (all but the T slots being written) next to the
            # new keys, not the updated cache: XLA then updates the cache in place in a decoding
            # loop instead of copying it (measured: 2-4 copies of every layer's cache per token).
            k_cache, v_cache = layer_cache
            start = (0, 0, cache_index, 0)
            layer_cache = (
                jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start),
                jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start),
            )
            # Attention runs in the cache's dtype: a float32 cache keeps bfloat16 decoding precise,
            # and saves converting the whole cache on CPUs, whose bf16 batched matmuls convert.
            keys, values = [k_cache, k.astype(k_cache.dtype)], [v_cache, v.astype(v_cache.dtype)]
            slot = jnp.arange(k_cache.shape[2])
            written = (slot >= cache_index) & (slot < cache_index + T)
            new = jax.lax.dynamic_slice_in_dim(mask, cache_index, T, axis=2)  # (B, T, T)
            mask = jnp.concatenate([mask & ~written, new], axis=-1)  # (B, T, S + T)
        dropout = cfg.dropout > 0 and not self.deterministic
        drop = nn.Dropout(cfg.dropout, deterministic=False) if dropout else None
        weights = None
        if self.output_attentions or self.is_mutable_collection("intermediates"):
            attention.check_name(self.attention)
            probs = attention.probabilities(q, keys, mask, drop)
            weights = _slot_probs(probs, cache_index)
            self.sow("intermediates", "probs", weights)
            y = attention.mix(probs, values)
        else:
            impl = attention.choose(
                self.attention, dtype=self.dtype, queries=T, keys=sum(kb.shape[2] for kb in keys),
                causal_only=mask is None, cached=layer_cache is not None, dropout=dropout,
            )  # fmt: skip
            y = attention.attend(q, keys, values, mask, implementation=impl, dropout=drop)
        y = y.astype(self.dtype).transpose(0, 2, 1, 3).reshape(B, T, C)
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5  # GPT-2 paper: residual projections scaled
        y = Conv1D(C, self.dtype, self.param_dtype, proj_std, name="c_proj")(y)
        return y, layer_cache, weights if self.output_attentions else None


def _slot_probs(probs: list[Array], cache_index: Array) -> Array:
    """Attention probabilities over the key slots ``(B, H, T, S)``, from the blocks attention
    ran over: the new keys alone (``(B, H, T, T)``), or the cache as it was (its written slots
    masked, so 0 there) and the new keys, which belong in slots ``cache_index..+T``."""
    if len(probs) == 1:
        return probs[0]
    old, new = probs
    return jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), cache_index, axis=3)


class MLP(nn.Module):
    """``mlp/c_fc`` -> tanh GELU (Hugging Face's ``gelu_new``) -> ``mlp/c_proj``."""

    config: GPT2Config
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:  # (B, T, C)
        C = x.shape[-1]
        h = Conv1D(4 * C, self.dtype, self.param_dtype, name="c_fc")(x)
        h = jax.nn.gelu(h, approximate=True)
        proj_std = 0.02 / (2 * self.config.n_layer) ** 0.5
        return Conv1D(C, self.dtype, self.param_dtype, proj_std, name="c_proj")(h)


class Block(nn.Module):
    """One pre-LN transformer block; scanned over layers by :class:`GPT2`.

    Called as ``(x, layer_cache, mask, cache_index) -> (x, (layer_cache, x_in, probs))`` so that
    ``nn.scan`` carries ``x`` and stacks the per-layer caches, block inputs and (with
    ``output_attentions``, else None) attention probabilities. It sows ``attn_out`` (the
    attention's output), ``mlp_out`` and ``out`` (the block's output) as ``intermediates``: a
    no-op unless that collection is mutable, so it costs nothing otherwise.
    """

    config: GPT2Config
    dtype: Any
    param_dtype: Any
    deterministic: bool
    output_attentions: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: Array,  # (B, T, C)
        layer_cache: tuple[Array, Array] | None,
        mask: Array | None,  # (B, T, S) bool; None: causal
        cache_index: Array,
    ) -> tuple[Array, tuple[tuple[Array, Array] | None, Array, Array | None]]:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        h = LayerNorm(cfg.layer_norm_epsilon, dt, pdt, name="ln_1")(x)
        attn = Attention(
            cfg, dt, pdt, self.deterministic, self.output_attentions, self.attention, name="attn"
        )
        y, layer_cache, probs = attn(h, layer_cache, mask, cache_index)
        self.sow("intermediates", "attn_out", y)
        x_in, x = x, x + drop(y)
        h = LayerNorm(cfg.layer_norm_epsilon, dt, pdt, name="ln_2")(x)
        y = MLP(cfg, dt, pdt, name="mlp")(h)
        self.sow("intermediates", "mlp_out", y)
        x = x + drop(y)
        self.sow("intermediates", "out", x)
        return x, (layer_cache, x_in, probs)


class GPT2(nn.Module):
    """GPT-2 language model over OpenAI's parameter tree.

    ``GPT2(config).apply({"params": params}, ids)`` returns logits ``(B, T, V)``;
    :meth:`forward` is the general entry point (hidden states, KV cache, padding masks).

    Attributes:
        config: the model's shape.
        dtype: compute dtype (float32 or bfloat16); parameters are cast to it where used.
        param_dtype: dtype of parameters created by ``init``.
        remat: ``"none"``, ``"block"`` or ``"dots"`` (below).
        scan_unroll: how many layers each iteration of the layer scan runs (1 = fully scanned).
        attention: the attention implementation (:mod:`gpt2jax.attention`; ``"auto"``).

    Parameter tree (OpenAI's names, leaves ``g``/``b``/``w`` as in OpenAI's checkpoints)::

        wte (V, C)   wpe (n_ctx, C)   ln_f/{g, b} (C,)
        h/ln_1/{g, b}            (L, C)
        h/attn/c_attn/{w, b}     (L, C, 3C), (L, 3C)
        h/attn/c_proj/{w, b}     (L, C, C),  (L, C)
        h/ln_2/{g, b}            (L, C)
        h/mlp/c_fc/{w, b}        (L, C, 4C), (L, 4C)
        h/mlp/c_proj/{w, b}      (L, 4C, C), (L, C)

    Design choices (measurements in ``BENCHMARKS.md``):

    * **Layers are scanned** (``nn.scan``): the ``L`` blocks share one traced body, their
      parameters are stacked on a leading axis. Compiling a training step of the 48-layer 1558M
      model then takes seconds instead of growing with the depth. ``scan_unroll`` unrolls the
      loop (up to ``n_layer``, i.e. fully) where a backend runs the unrolled form faster, e.g.
      small-batch decoding; the parameter tree is the same either way.
    * **Rematerialisation** is a per-block policy (``remat``): ``"none"`` keeps activations,
      ``"block"`` keeps only each block's input and recomputes the rest in the backward pass,
      ``"dots"`` keeps the matmul outputs and recomputes the cheap elementwise work.
    * **KV cache**: a :class:`KVCache` of shape ``(L, B, H, S, D)`` is passed in and returned, so
      decoding is a pure function a ``lax.while_loop`` can carry. Keys and values for the new
      tokens are written at ``cache_index``; queries attend to cache slots at or before their
      own slot and allowed by ``mask`` (left padding of batched prompts is masked out there).
    * **Mixed precision**: parameters stay in whatever dtype they are stored in and are cast to
      the compute ``dtype`` where they are used; LayerNorm statistics, attention softmax and
      logits are computed in float32.
    """

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    scan_unroll: int = 1
    attention: str = "auto"

    def __call__(
        self,
        ids: Array,
        *,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        deterministic: bool = True,
    ) -> Array | GPT2Output:
        """Logits ``(B, T, V)`` float32 for token ids ``(B, T)``; a :class:`GPT2Output` instead
        when ``output_hidden_states`` or ``output_attentions`` asks for more.

        The keywords mean what they mean for Hugging Face's ``GPT2LMHeadModel``:
        ``attention_mask (B, T)`` (1 for tokens, 0 for padding: padding is never attended to),
        ``position_ids (B, T)`` (default ``0..T-1`` for every row, also with a mask, as in
        ``transformers``; left-padded rows usually want ``cumsum(mask) - 1``, clipped at 0).
        """
        out = self.forward(
            ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            deterministic=deterministic,
        )
        return out if output_hidden_states or output_attentions else out.logits

    @nn.compact
    def forward(
        self,
        ids: Array,  # (B, T) int
        *,
        position_ids: Array | None = None,  # (B, T) int; default: cache_index + arange(T)
        attention_mask: Array | None = None,  # (B, S): keys that may be attended (padding 0)
        cache: KVCache | None = None,
        cache_index: Array | int = 0,
        deterministic: bool = True,
        compute_logits: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> GPT2Output:
        """The full forward pass.

        Without a cache, queries attend causally to the ``T`` given tokens. With ``cache`` (of
        ``S`` slots), the new keys/values are written at slots ``cache_index..cache_index+T-1`` and
        each query attends to every slot at or before its own; ``attention_mask`` then covers all
        ``S`` slots. Dropout (``config.dropout > 0``) runs when ``deterministic=False`` and needs
        a ``"dropout"`` RNG. ``output_hidden_states`` / ``output_attentions`` fill those fields
        of the output; off, they cost nothing (the compiled program is the same).
        """
        cfg = self.config
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        B, T = ids.shape
        cache_index = jnp.asarray(cache_index, jnp.int32)
        positions = position_ids
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(T, dtype=jnp.int32), (B, T))

        wte = self.param(
            "wte", nn.initializers.normal(0.02), (cfg.n_vocab, cfg.n_embd), self.param_dtype
        )
        wpe = self.param(
            "wpe", nn.initializers.normal(0.01), (cfg.n_ctx, cfg.n_embd), self.param_dtype
        )
        x = embed(wte, wpe, ids, positions, self.dtype)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)  # (B, T, C)

        # Which keys each query may attend to: causal over slots, and the padding mask (None:
        # causal only, which fused attention kernels take as a flag).
        allowed = None
        if cache is not None or attention_mask is not None:
            S = T if cache is None else cache.length
            allowed = causal_mask(B, T, S, cache_index)
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, None, :].astype(bool)

        block = Block
        if self.remat == "block":
            block = nn.remat(Block, prevent_cse=False)
        elif self.remat == "dots":
            block = nn.remat(
                Block,
                prevent_cse=False,
                policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            )
        stack = nn.scan(
            block,
            variable_axes={"params": 0, "intermediates": 0},  # sown values: stacked per layer
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=cfg.n_layer,
            unroll=self.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        layer_caches = None if cache is None else cache.stacked()
        x, (layer_caches, block_inputs, probs) = stack(
            cfg,
            self.dtype,
            self.param_dtype,
            deterministic,
            output_attentions,
            self.attention,
            name="h",
        )(x, layer_caches, allowed, cache_index)

        h = LayerNorm(cfg.layer_norm_epsilon, self.dtype, self.param_dtype, name="ln_f")(x)
        logits = lm_head(wte, h) if compute_logits else None
        hidden_states = None
        if output_hidden_states:
            hidden_states = (*(block_inputs[i] for i in range(cfg.n_layer)), h)
        attentions = None if probs is None else tuple(probs[i] for i in range(cfg.n_layer))
        new_cache = None if cache is None else KVCache.from_stacked(*layer_caches)
        return GPT2Output(
            logits=logits,
            last_hidden=h,
            hidden_states=hidden_states,
            attentions=attentions,
            cache=new_cache,
        )


def embed(wte: Array, wpe: Array, ids: Array, positions: Array, dtype: Any) -> Array:
    """Token plus position embeddings ``(B, T, C)`` in ``dtype`` (before dropout)."""
    return (jnp.take(wte, ids, axis=0) + jnp.take(wpe, positions, axis=0)).astype(dtype)


def causal_mask(batch: int, length: int, slots: int, cache_index: Array | int = 0) -> Array:
    """``(B, T, S)`` bool: query ``t`` (in cache slot ``cache_index + t``) may attend to the
    slots at or before its own."""
    q_slot = cache_index + jnp.arange(length)
    allowed = jnp.arange(slots)[None, :] <= q_slot[:, None]  # (T, S)
    return jnp.broadcast_to(allowed, (batch, length, slots))


def lm_head(wte: Array, h: Array) -> Array:
    """Float32 logits ``(..., V)`` of hidden states ``(..., C)``; the head is tied to ``wte``."""
    n_vocab, n_embd = wte.shape
    return _tied_head(h, wte.astype(h.dtype), transposed_weight_gradient(n_embd, n_vocab))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _tied_head(h: Array, wte: Array, transposed_weight_gradient: bool) -> Array:
    """``h @ wte^T`` accumulated in float32, ``(..., C) x (V, C) -> (..., V)``: :func:`dense`
    of the weight ``wte^T`` but with ``wte`` read in place (a ``wte^T`` operand made XLA copy
    the whole table for one-row products). On a CPU its gradient is formed as
    ``(transpose(h) @ dlogits)^T``, where XLA's own form first copies the ``(N, V)`` gradient of
    the logits transposed (BENCHMARKS.md)."""
    return _head_matmul(h, wte)


def _head_matmul(h: Array, wte: Array) -> Array:  # (..., C) x (V, C) -> (..., V) float32
    return jnp.einsum("...c,vc->...v", h, wte, preferred_element_type=jnp.float32)


@functools.partial(_tied_head.defjvp, symbolic_zeros=True)
def _tied_head_jvp(transposed_weight_gradient, primals, tangents):
    h, wte = primals
    dh, dwte = tangents
    y = _head_matmul(h, wte)
    terms = []
    if not isinstance(dh, SymbolicZero):
        terms.append(_head_matmul(dh, wte))
    if not isinstance(dwte, SymbolicZero):
        terms.append(_weight_term(h, dwte.T, transposed_weight_gradient))
    return y, sum(terms[1:], terms[0])


def init_params(config: GPT2Config, seed: int = 0, param_dtype: Any = jnp.float32) -> dict:
    """Random parameters with GPT-2's initialisation (normal 0.02, residual projections scaled)."""
    model = GPT2(config, param_dtype=param_dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(model.init)(jax.random.PRNGKey(seed), ids)["params"]


def param_shapes(config: GPT2Config) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct``s, computed without allocating anything."""
    model = GPT2(config)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]
