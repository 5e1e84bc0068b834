"""Optimizers and learning-rate schedules for fine-tuning (optax).

* ``adamw`` (default): the chain ``optax.adamw`` builds (Adam's moments, then decoupled weight
  decay as in Loshchilov & Hutter and ``torch.optim.AdamW``, then the learning rate; the tests
  check one step against torch), with Adam from :func:`gpt2jax.lowp.scale_by_adam_lowp` so that
  ``state_dtype`` (``--opt-state-dtype``) can keep the moments in bfloat16. Defaults are
  torch's: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
* ``adafactor``: ``optax.adafactor`` with its defaults (factored second moments, update clipping
  1.0, updates scaled by each parameter's RMS), ``--weight-decay`` as its decay rate.
* ``sgd``: ``optax.sgd`` with momentum 0.9 (its trace in ``state_dtype``,
  :func:`gpt2jax.lowp.scale_by_momentum_lowp`), weight decay added to the gradient first.

Weight decay applies to the four matmul weights of each block only (``c_attn/w``, ``c_proj/w``,
``c_fc/w``, ``mlp/c_proj/w``): never to biases, LayerNorm gains/biases, or the token and
position embeddings, as minGPT's ``configure_optimizers`` decides (``wte`` is also the LM head,
and decaying it pulls rare tokens' embeddings towards zero).

Every optimizer is preceded by clipping the gradient to a global L2 norm (``--clip``, 0 = off).

Schedules (``schedule(step)`` is the rate of the update that makes step ``step + 1``): a linear
warmup from ``lr / warmup`` to ``lr`` over the first ``warmup`` updates, then ``constant``,
``cosine`` decay to 0 at ``total_steps``, or ``linear`` decay to 0 (Hugging Face's
``get_cosine_schedule_with_warmup`` / ``get_linear_schedule_with_warmup`` shapes).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gpt2jax.errors import ConfigError
from gpt2jax.lowp import scale_by_adam_lowp, scale_by_momentum_lowp

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
SGD_MOMENTUM = 0.9


def learning_rate_schedule(lr: float, warmup: int, total_steps: int, kind: str) -> optax.Schedule:
    """The learning rate as a function of the step (a jittable ``optax.Schedule``)."""
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if lr <= 0 or not math.isfinite(lr):
        raise ConfigError(f"--lr must be a positive number, got {lr}")
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {warmup}")
    decay_steps = max(1, total_steps - warmup)

    def schedule(step: Any) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / max(1, warmup))
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif kind == "linear":
            decay = 1.0 - progress
        else:
            decay = jnp.ones_like(progress)
        return lr * warm * decay

    return schedule


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to: the blocks' matmul weights ``.../w``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "w", params
    )


def make_optimizer(
    name: str,
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.01,
    clip: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    state_dtype: Any = jnp.float32,
) -> optax.GradientTransformation:
    """Gradient clipping then ``name`` (``adamw``, ``adafactor`` or ``sgd``), decay masked;
    AdamW's moments and SGD's momentum are stored in ``state_dtype``."""
    if weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {weight_decay}")
    if clip < 0:
        raise ConfigError(f"--clip must be >= 0 (0 turns clipping off), got {clip}")
    if name == "adamw":
        base = optax.chain(
            scale_by_adam_lowp(b1, b2, eps, state_dtype),
            optax.add_decayed_weights(weight_decay, decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    elif name == "adafactor":
        base = optax.adafactor(
            schedule, weight_decay_rate=weight_decay or None, weight_decay_mask=decay_mask
        )
    elif name == "sgd":
        base = optax.chain(
            optax.add_decayed_weights(weight_decay, decay_mask),
            scale_by_momentum_lowp(SGD_MOMENTUM, state_dtype),
            optax.scale_by_learning_rate(schedule),
        )
    else:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return optax.chain(optax.clip_by_global_norm(clip), base) if clip > 0 else base
