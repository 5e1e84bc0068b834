"""The language-modelling loss, optionally chunked so the full logits never exist at once.

The plain loss is Hugging Face's ``GPT2LMHeadModel`` loss; :func:`chunked_token_losses`
computes the same numbers a chunk of positions at a time under ``jax.checkpoint`` ("chunked
cross-entropy"), trading one more LM-head matmul for holding one chunk's logits instead of all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gpt2jax.errors import ConfigError
from gpt2jax.model import GPT2, lm_head

#: ``token_losses(params, windows (B, T + 1), rng=None, frozen=None) -> (B, T) float32``.
LossFn = Callable[..., jax.Array]
#: ``prepare(params, frozen) -> (the model's parameter tree, a context to run the model in)``.
Prepare = Callable[[Any, Any], tuple[Any, contextlib.AbstractContextManager]]


def chunked_token_losses(
    h: jax.Array,  # (B, T, C) final hidden states (after ln_f)
    wte: jax.Array,  # (V, C) the tied LM head
    targets: jax.Array,  # (B, T) int
    chunk: int,
) -> jax.Array:  # (B, T) float32
    """Cross-entropy of every position, ``chunk`` positions of the sequence at a time.

    The plain loss computes logits ``(B, T, V)`` in float32 and their cross-entropy: for GPT-2's
    vocabulary of 50257 at ``B x T = 1024`` tokens that is 206 MB of logits, as much again for
    their gradient, and the softmax's intermediates besides (XLA keeps several such buffers
    alive in the backward pass). This computes the same numbers ``chunk`` positions at a time: a
    ``lax.map`` over chunks of the final hidden states whose body (tied LM head, float32
    log-softmax, the target's log-probability) is wrapped in ``jax.checkpoint``, so the forward
    pass keeps only the hidden states and the backward pass recomputes one chunk's logits, turns
    them into that chunk's gradient, and moves on. Peak logits memory is then ``B x chunk x V x
    4`` bytes (a few times over) instead of ``B x T x V x 4``; the cost is one more LM-head
    matmul (``2 B T C V`` FLOPs, about 2% of a 1558M step's FLOPs). This is the "chunked
    cross-entropy" of e.g. Liger-Kernel's fused linear cross-entropy, written with JAX's own
    rematerialisation. The tests check loss and every gradient (float32, relative 1e-5)
    against the plain loss (:func:`make_token_losses` with ``loss_chunk=0``), which itself is
    Hugging Face's ``GPT2LMHeadModel`` loss.

    The sequence is padded to a multiple of ``chunk`` (padding predicts token 0 and is cut off
    again, so it adds nothing to the loss or the gradient). The batch axis stays whole in every
    chunk, so a batch sharded over devices stays sharded.
    """
    if chunk <= 0:
        raise ConfigError(f"--loss-chunk must be > 0 positions, got {chunk}")
    B, T, C = h.shape
    chunk = min(chunk, T)  # a chunk longer than the sequence would only compute padding
    chunks = -(-T // chunk)
    pad = chunks * chunk - T
    hs = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, chunks, chunk, C)
    ts = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, chunks, chunk)

    # Remat: the backward pass recomputes this chunk's logits instead of storing them.
    @jax.checkpoint
    def one_chunk(xs: tuple[jax.Array, jax.Array]) -> jax.Array:
        hc, tc = xs  # (B, chunk, C), (B, chunk)
        logits = lm_head(wte, hc)  # (B, chunk, V) float32
        return optax.softmax_cross_entropy_with_integer_labels(logits, tc)

    losses = jax.lax.map(one_chunk, (hs.swapaxes(0, 1), ts.swapaxes(0, 1)))  # (chunks, B, chunk)
    return losses.swapaxes(0, 1).reshape(B, chunks * chunk)[:, :T]


def chain(*prepares: Prepare) -> Prepare:
    """Several ``prepare`` hooks one after the other (the first gets ``frozen``, the rest
    ``None``); their contexts are entered in order."""

    def prepare(params: Any, frozen: Any) -> tuple[Any, contextlib.AbstractContextManager]:
        stack = contextlib.ExitStack()
        tree = params
        for i, p in enumerate(prepares):
            tree, context = p(tree, frozen if i == 0 else None)
            stack.enter_context(context)
        return tree, stack

    return prepare


def make_token_losses(
    model: GPT2, *, loss_chunk: int = 0, prepare: Prepare | None = None
) -> LossFn:
    """The per-token loss of ``model``: ``token_losses(params, windows, rng, frozen) -> (B, T)``.

    Args:
        model: the module (its ``dtype``/``remat``/``scan_unroll`` set how it computes).
        loss_chunk: 0 for the plain loss (full logits), else sequence positions per chunk of
            :func:`chunked_token_losses`.
        prepare: turns the trained ``params`` and the ``frozen`` ones into the model's parameter
            tree and a context manager to run the model in: LoRA inserts its adapters into the
            frozen base and intercepts the projections (:func:`gpt2jax.lora.make_prepare`),
            freezing stops gradients (:func:`gpt2jax.train.memory.freeze.make_prepare`). Default:
            ``params`` is the tree.

    ``windows`` are ``(B, T + 1)`` token ids: the first ``T`` are the inputs, the last ``T`` the
    targets. ``rng`` (a key, or None) turns dropout on. Logits and the softmax are float32
    whatever the model's compute dtype.
    """
    if loss_chunk < 0:
        raise ConfigError(f"--loss-chunk must be >= 0 (0: the plain loss), got {loss_chunk}")

    def token_losses(
        params: Any, windows: jax.Array, rng: jax.Array | None = None, frozen: Any = None
    ) -> jax.Array:
        inputs, targets = windows[:, :-1], windows[:, 1:]
        rngs = None if rng is None else {"dropout": rng}
        if prepare is None:
            tree, context = params, contextlib.nullcontext()
        else:
            tree, context = prepare(params, frozen)
        with context:
            out = model.apply(
                {"params": tree}, inputs, method="forward", deterministic=rng is None,
                rngs=rngs, compute_logits=loss_chunk == 0,
            )  # fmt: skip
        if loss_chunk == 0:
            return optax.softmax_cross_entropy_with_integer_labels(out.logits, targets)
        return chunked_token_losses(out.last_hidden, tree["wte"], targets, loss_chunk)

    return token_losses
