"""Gradient accumulation into one buffer, layer by layer: no second full-size gradient.

Adding each micro-batch's ``jax.grad`` to a running sum keeps two full gradients alive;
:func:`make_accumulate` runs the backward pass by hand, block by block, adding each block's
gradient into its layer of one accumulator. Used by :func:`gpt2jax.train.step.make_train_step`
for full-model training with block remat and several micro-batches
(:mod:`gpt2jax.train.memory.build` decides).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gpt2jax.model import GPT2, Block, LayerNorm, embed, lm_head
from gpt2jax.train.loss import chunked_token_losses

#: ``accumulate(params, acc, windows (b, T + 1), weight, rng) -> (weighted loss, acc + weight *
#: d loss / d params)`` where the loss is the mean token cross-entropy of ``windows``.
Accumulate = Callable[..., tuple[jax.Array, Any]]


def make_accumulate(model: GPT2, loss_chunk: int = 0) -> Accumulate:
    """The in-place accumulation step of ``model``.

    Accumulating with ``grad_sum + jax.grad(loss)(params)`` keeps two full gradients alive (the
    sum and the micro-batch's), because the layer scan's backward pass writes every layer's
    gradient into a fresh stacked buffer before the sum can take it: one more full-size
    gradient beyond the parameters' own size. This runs the backward pass by hand instead: the
    forward pass scans the blocks keeping only each block's input (what ``remat="block"``
    keeps), the head's gradient comes from ``jax.vjp``, and a ``lax.fori_loop`` walks the blocks
    top-down, recomputing each block with ``jax.vjp`` and adding its parameter gradient into
    layer ``i`` of the accumulator (``acc.at[i].add``, in place in the loop's carry). Only one
    layer's gradient exists at a time. The maths is the plain loss's gradient (the tests compare
    it with ``jax.grad``); dropout, when on, draws its masks per layer from ``fold_in(key,
    layer)`` rather than from the layer scan's split keys (same distribution, different draws).
    """
    cfg, dtype, pdt = model.config, model.dtype, model.param_dtype
    n_layer = cfg.n_layer

    def accumulate(
        params: Any, acc: Any, windows: jax.Array, weight: jax.Array, rng: jax.Array | None
    ) -> tuple[jax.Array, Any]:
        inputs, targets = windows[:, :-1], windows[:, 1:]  # (b, T) each
        b, T = inputs.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
        block = Block(cfg, dtype, pdt, deterministic=rng is None, attention=model.attention)

        def embedding(wte: jax.Array, wpe: jax.Array) -> jax.Array:  # (b, T, C)
            x = embed(wte, wpe, inputs, positions, dtype)
            if rng is None:
                return x
            drop = nn.Dropout(cfg.dropout, deterministic=False)
            return drop.apply({}, x, rngs={"dropout": jax.random.fold_in(rng, n_layer)})

        def layer(p: Any, x: jax.Array, i: jax.Array) -> jax.Array:
            rngs = None if rng is None else {"dropout": jax.random.fold_in(rng, i)}
            y, _ = block.apply({"params": p}, x, None, None, 0, rngs=rngs)  # causal mask
            return y

        def head(x: jax.Array, ln_f: Any, wte: jax.Array) -> jax.Array:
            h = LayerNorm(cfg.layer_norm_epsilon, dtype, pdt).apply({"params": ln_f}, x)
            if loss_chunk:
                losses = chunked_token_losses(h, wte, targets, loss_chunk)
            else:
                losses = optax.softmax_cross_entropy_with_integer_labels(lm_head(wte, h), targets)
            return losses.mean() * weight

        def take(tree: Any, i: jax.Array) -> Any:
            return jax.tree.map(lambda x: x[i], tree)

        x0, embedding_vjp = jax.vjp(embedding, params["wte"], params["wpe"])

        def forward(x: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
            return layer(take(params["h"], i), x, i), x  # keep each block's input

        x_top, block_inputs = jax.lax.scan(forward, x0, jnp.arange(n_layer))  # (L, b, T, C)
        loss, head_vjp = jax.vjp(head, x_top, params["ln_f"], params["wte"])
        dx, d_ln_f, d_head = head_vjp(jnp.ones_like(loss))

        def backward(j: jax.Array, carry: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
            dx, acc_h = carry
            i = n_layer - 1 - j
            _, layer_vjp = jax.vjp(lambda p, x: layer(p, x, i), take(params["h"], i),
                                   block_inputs[i])  # fmt: skip
            dp, dx = layer_vjp(dx)
            acc_h = jax.tree.map(lambda a, g: a.at[i].add(g.astype(a.dtype)), acc_h, dp)
            return dx, acc_h

        dx, acc_h = jax.lax.fori_loop(0, n_layer, backward, (dx, acc["h"]))
        d_wte, d_wpe = embedding_vjp(dx)
        add = lambda a, *gs: sum((g.astype(a.dtype) for g in gs), a)  # noqa: E731
        return loss, {
            **acc,
            "h": acc_h,
            "wte": add(acc["wte"], d_head, d_wte),
            "wpe": add(acc["wpe"], d_wpe),
            "ln_f": jax.tree.map(add, acc["ln_f"], d_ln_f),
        }

    return accumulate
