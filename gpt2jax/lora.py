"""LoRA: low-rank adapters on the attention and MLP projections, merged into the weights on export.

Hu et al., "LoRA" (2021), with the ``peft`` library's defaults: a frozen weight ``W`` gets a
trained update ``scale * A @ B`` of rank ``r`` that starts at zero (:func:`init_lora`). The base
``GPT2`` module is unchanged: an interceptor adds the adapters' output inside the layer scan
(:func:`applied`), so no merged copy of the model exists and the frozen base needs no gradient;
:func:`merge_lora` folds them into an ordinary parameter tree for export. Only the maths here:
LoRA runs on disk belong to :mod:`gpt2jax.store.runs` and :mod:`gpt2jax.loader`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2jax.config import GPT2Config
from gpt2jax.errors import ConfigError
from gpt2jax.model import Conv1D

#: The adapted projections: their path under ``h`` and (in, out) as multiples of n_embd.
TARGETS: dict[tuple[str, str], tuple[int, int]] = {
    ("attn", "c_attn"): (1, 3),
    ("attn", "c_proj"): (1, 1),
    ("mlp", "c_fc"): (1, 4),
    ("mlp", "c_proj"): (4, 1),
}
A, B = "lora_a", "lora_b"


def init_lora(config: GPT2Config, rank: int, seed: int = 0, dtype: Any = jnp.float32) -> dict:
    """Fresh adapters of ``rank``: ``A`` Kaiming-uniform, ``B`` zero (so they change nothing).

    ``scale = alpha / r`` (:func:`lora_scale`). Our ``Conv1D`` weights are ``(in, out)`` (``y = x
    @ W``), so here ``A`` is ``(in, r)``, drawn like ``peft``'s (Kaiming-uniform, bound ``1 /
    sqrt(in)``), and ``B`` is ``(r, out)``, zero: training starts exactly at the base model (the
    tests check it). The paper's ``A`` and ``B`` are these transposed. The adapter tree is
    stacked over layers like the base tree, so the layer scan slices them too::

        h/attn/c_attn/{lora_a (L, C, r), lora_b (L, r, 3C)}   h/attn/c_proj/{(L, C, r), (L, r, C)}
        h/mlp/c_fc/{(L, C, r), (L, r, 4C)}                     h/mlp/c_proj/{(L, 4C, r), (L, r, C)}
    """
    if rank <= 0:
        raise ConfigError(f"--lora-rank must be > 0, got {rank}")
    C, L = config.n_embd, config.n_layer
    keys = jax.random.split(jax.random.key(seed), len(TARGETS))
    tree: dict = {}
    for key, ((block, proj), (m_in, m_out)) in zip(keys, TARGETS.items(), strict=True):
        fan_in = m_in * C
        bound = 1.0 / fan_in**0.5  # peft: kaiming_uniform_(a=sqrt(5)) on (r, in)
        a = jax.random.uniform(key, (L, fan_in, rank), dtype, -bound, bound)
        b = jnp.zeros((L, rank, m_out * C), dtype)
        tree.setdefault(block, {})[proj] = {A: a, B: b}
    return {"h": tree}


def lora_scale(rank: int, alpha: float | None) -> float:
    """``alpha / rank``; ``alpha`` defaults to ``rank`` (scale 1)."""
    if alpha is not None and alpha <= 0:
        raise ConfigError(f"--lora-alpha must be > 0, got {alpha}")
    return (alpha if alpha is not None else rank) / rank


def insert(params: Any, lora: Any) -> dict:
    """The base tree with the adapter leaves added beside each adapted ``w``/``b`` (no copies)."""
    h = dict(params["h"])
    for block, proj in TARGETS:
        h[block] = dict(h[block])
        h[block][proj] = {**h[block][proj], **lora["h"][block][proj]}
    return {**params, "h": h}


@contextlib.contextmanager
def applied(scale: float) -> Iterator[None]:
    """Within this context, every ``Conv1D`` that finds adapters in its parameters adds
    ``scale * (x @ A) @ B`` (in the module's compute dtype) to its output.

    Why this way: the adapter leaves are inserted next to ``w``/``b`` in the parameter tree given
    to ``apply`` (:func:`insert`; Flax ignores leaves a module does not ask for, and ``nn.scan``
    slices them per layer with the rest), and a Flax method interceptor
    (``nn.intercept_methods``) adds the term above to every adapted ``Conv1D``. That is ``x @ (W
    + scale * A @ B)``, the merged weight, computed *per layer inside the layer scan*: no merged
    copy of the model ever exists, and since ``W`` is a constant of the loss, autodiff never
    forms ``dL/dW`` (an ``(in, out)`` matmul per projection; merging ``W + scale * A @ B``
    explicitly would need it, to push it on to ``A`` and ``B``). Memory for the adapters'
    gradients and optimizer state is ``O(L r (in + out))``; the frozen base needs no gradient
    and no optimizer state at all."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not (
            isinstance(module, Conv1D)
            and context.method_name == "__call__"
            and module.has_variable("params", A)
        ):
            return next_fun(*args, **kwargs)
        x = args[0]  # (B, T, in)
        a = module.get_variable("params", A).astype(module.dtype)  # (in, r)
        b = module.get_variable("params", B).astype(module.dtype)  # (r, out)
        return next_fun(*args, **kwargs) + (scale * (x @ a)) @ b

    with nn.intercept_methods(interceptor):
        yield


def make_prepare(scale: float):
    """The :func:`gpt2jax.train.loss.make_token_losses` hook: trained ``params`` are the adapters,
    ``frozen`` the base model."""

    def prepare(lora: Any, base: Any) -> tuple[Any, contextlib.AbstractContextManager]:
        return insert(base, lora), applied(scale)

    return prepare


def merge_lora(params: Any, lora: Any, scale: float) -> dict:
    """``params`` with every adapted weight replaced by ``W + scale * A @ B`` in float32: the
    fine-tuned model as an ordinary parameter tree (the other leaves are left as they are).

    The merged weights stay float32 even over a bfloat16 base: a trained delta is often smaller
    than bfloat16's resolution at ``W`` (8 significant bits), and casting back would round it
    away.
    Whoever wants fewer bits rounds later, knowingly (``export --dtype``)."""
    h = dict(params["h"])
    for block, proj in TARGETS:
        layer = lora["h"][block][proj]
        w = h[block][proj]["w"]  # (L, in, out)
        delta = jnp.einsum(
            "lir,lro->lio", jnp.asarray(layer[A], jnp.float32), jnp.asarray(layer[B], jnp.float32)
        )
        merged = jnp.asarray(w, jnp.float32) + scale * delta
        h[block] = dict(h[block])
        h[block][proj] = {**h[block][proj], "w": merged}
    return {**params, "h": h}


def num_lora_params(config: GPT2Config, rank: int) -> int:
    """How many numbers the adapters of ``rank`` hold."""
    C = config.n_embd
    return config.n_layer * rank * sum((i + o) * C for i, o in TARGETS.values())
