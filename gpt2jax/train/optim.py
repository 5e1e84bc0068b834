"""Optimizers and learning-rate schedules for fine-tuning (optax).

``adamw`` (``torch.optim.AdamW``), ``adafactor`` (``transformers``' ``Adafactor``) and ``sgd``
(``torch.optim.SGD`` with momentum), each after clipping to a global norm, with weight decay
scaled by the learning rate and applied to the blocks' matmul weights only (:func:`make_optimizer`;
the tests check all three against torch and transformers). Schedules: a linear warmup, then
constant, cosine or linear decay (:func:`learning_rate_schedule`). A run's ``--lr`` is AdamW's;
Adafactor, whose steps are its rate times each tensor's RMS, is given ``--lr`` divided by
:func:`adafactor_scale` of the starting weights, which makes its steps as large as AdamW's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt2jax.errors import ConfigError
from gpt2jax.train.memory.precision import scale_by_adam_lowp, scale_by_momentum_lowp
from gpt2jax.train.settings import OPTIMIZERS, SCHEDULES

#: the optimizers whose update of each element depends on that element alone (Adafactor's
#: factored statistics and RMS scaling are per matrix)
ELEMENTWISE = ("adamw", "sgd")
SGD_MOMENTUM = 0.9


def learning_rate_schedule(lr: float, warmup: int, total_steps: int, kind: str) -> optax.Schedule:
    """The learning rate as a function of the step (a jittable ``optax.Schedule``).

    ``schedule(step)`` is the rate of the update that makes step ``step + 1``: a linear warmup
    from ``lr / warmup`` to ``lr`` over the first ``warmup`` updates, then ``constant``,
    ``cosine`` decay to 0 at ``total_steps``, or ``linear`` decay to 0 (Hugging Face's
    ``get_cosine_schedule_with_warmup`` / ``get_linear_schedule_with_warmup`` shapes).
    """
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
    """True for the leaves weight decay applies to: the blocks' matmul weights ``.../w``.

    That is ``c_attn/w``, ``c_proj/w``, ``c_fc/w`` and ``mlp/c_proj/w``: never biases,
    LayerNorm gains/biases, or the token and position embeddings, as minGPT's
    ``configure_optimizers`` decides (``wte`` is also the LM head, and decaying it pulls rare
    tokens' embeddings towards zero).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "w", params
    )


class AdafactorState(NamedTuple):
    count: jax.Array  # () int32: updates done (Adafactor's per-parameter ``step``)
    row: Any  # per leaf (..., R) moving mean over the last axis of g^2 + eps1; () if unfactored
    col: Any  # per leaf (..., C) moving mean over the second-last axis; () if unfactored
    full: Any  # per leaf the whole second moment (shape of the leaf) if unfactored; () otherwise


#: Adafactor's floor on a tensor's RMS in its relative step (transformers' ``eps[1]``).
ADAFACTOR_EPS2 = 1e-3


def adafactor_scale(
    params: Any,
    *,
    frozen: Collection[str] = (),
    trainable_layers: Any = None,
    eps2: float = ADAFACTOR_EPS2,
) -> float:
    """The RMS, over the numbers Adafactor trains, of its relative step ``max(eps2, RMS(W))``,
    each tensor taken as Adafactor sees it: one layer's matrix of the stacked blocks ``h``
    (:class:`gpt2jax.train.layerwise.Layerwise`), any other leaf whole. Adafactor at rate ``lr / s``
    (``s`` this number) takes steps of the same total size as AdamW's at ``lr``.

    Why: with ``scale_parameter=True`` Adafactor's step on a tensor is ``lr * max(eps2,
    RMS(W))`` times an update whose RMS is at most 1, while AdamW's early steps (``m / sqrt(v)``
    of consistent gradients) are about ``lr`` per number: at AdamW's rate it moves a GPT-2 weight
    matrix (RMS 0.02-0.2) 5-50x less. :func:`make_optimizer` and :func:`scale_by_adafactor` take
    Adafactor's own rate (transformers' ``lr``) and match transformers exactly for it.

    ``params`` is the trained tree (host or device arrays: read one leaf at a time);
    ``frozen`` top-level leaves and layers where ``trainable_layers`` is False are left out."""
    squares, count = 0.0, 0
    for name, leaf in params.items():
        if name in frozen:
            continue
        stacked = name == "h"
        for x in jax.tree.leaves(leaf):
            ms = np.asarray(_mean_squares(x, stacked), np.float64).reshape(-1)  # per tensor
            scale2 = np.maximum(eps2, np.sqrt(ms)) ** 2
            if stacked and trainable_layers is not None:
                scale2 = scale2[np.asarray(trainable_layers, bool)]
            per_tensor = int(np.prod(np.shape(x))) // max(1, ms.size)
            squares += float(scale2.sum()) * per_tensor
            count += scale2.size * per_tensor
    if count == 0:
        raise ConfigError("adafactor has no parameters to train")
    return math.sqrt(squares / count)


@functools.partial(jax.jit, static_argnums=1)
def _mean_squares(x: jax.Array, stacked: bool) -> jax.Array:
    """Mean of ``x**2`` per layer (axis 0) when ``stacked``, else over all of ``x``."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.mean(jnp.square(x), axis=tuple(range(1 if stacked else 0, x.ndim)))


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def scale_by_adafactor(
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.0,
    mask: Any = None,
    decay_rate: float = -0.8,
    clip_threshold: float = 1.0,
    eps: tuple[float, float] = (1e-30, ADAFACTOR_EPS2),
) -> optax.GradientTransformation:
    """Adafactor as ``transformers.optimization.Adafactor(lr=schedule(step),
    scale_parameter=True, relative_step=False, beta1=None, weight_decay=weight_decay)``, the
    learning rate and the decay included: the updates are the whole change of the parameters.

    ``mask`` (a callable on the parameters, or a tree of bools) picks the decayed leaves. Every
    statistic is per leaf, so a leaf is one tensor as transformers would see it: under
    :class:`gpt2jax.train.layerwise.Layerwise` one layer's matrix.
    """
    eps1, eps2 = eps

    def factored(shape: tuple[int, ...]) -> bool:
        return len(shape) >= 2

    def init(params: Any) -> AdafactorState:
        # Separate trees built by separate calls: a donated state must not alias itself.
        def zeros(shape_of) -> Any:
            return jax.tree.map(lambda p: jnp.zeros(shape_of(p.shape), jnp.float32), params)

        return AdafactorState(
            count=jnp.zeros((), jnp.int32),
            row=zeros(lambda s: s[:-1] if factored(s) else ()),
            col=zeros(lambda s: s[:-2] + s[-1:] if factored(s) else ()),
            full=zeros(lambda s: () if factored(s) else s),
        )

    def update(grads: Any, state: AdafactorState, params: Any = None) -> tuple[Any, AdafactorState]:
        if params is None:
            raise ValueError("Adafactor scales its step by the parameters: pass them to update")
        lr = jnp.asarray(schedule(state.count), jnp.float32)  # the rate of this update
        count = optax.safe_increment(state.count)
        # Second-moment decay 1 - t^-0.8: 0 on the first update (the moment is that step's g^2),
        # then a mean over ever more steps.
        beta2 = 1.0 - count.astype(jnp.float32) ** decay_rate
        decayed = mask(params) if callable(mask) else mask
        if decayed is None or weight_decay == 0:
            decayed = jax.tree.map(lambda _: False, params)

        def one(g, p, row, col, full, decay: bool):
            g = g.astype(jnp.float32)
            p = p.astype(jnp.float32)
            g2 = jnp.square(g) + eps1
            if factored(g.shape):
                row = beta2 * row + (1.0 - beta2) * jnp.mean(g2, axis=-1)  # (..., R)
                col = beta2 * col + (1.0 - beta2) * jnp.mean(g2, axis=-2)  # (..., C)
                # The rank-1 estimate of the second moment row * col / mean(row).
                r = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))  # (..., R)
                u = g * r[..., :, None] * jax.lax.rsqrt(col)[..., None, :]
            else:
                full = beta2 * full + (1.0 - beta2) * g2
                u = g * jax.lax.rsqrt(full)
            u = u / jnp.maximum(1.0, _rms(u) / clip_threshold)
            step = lr * jnp.maximum(eps2, _rms(p))  # relative to the parameter before the update
            if decay:
                u = u + weight_decay * p
            return -step * u, row, col, full

        out = jax.tree.map(one, grads, params, state.row, state.col, state.full, decayed)
        pick = lambda i: jax.tree.map(lambda _, t: t[i], grads, out)  # noqa: E731
        return pick(0), AdafactorState(count, pick(1), pick(2), pick(3))

    return optax.GradientTransformation(init, update)


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
    AdamW's moments and SGD's momentum are stored in ``state_dtype`` (Adafactor's: float32).

    * ``adamw`` (default): Adam's moments, then decoupled weight decay, then the learning rate,
      which is ``torch.optim.AdamW``; Adam from
      :func:`gpt2jax.train.memory.precision.scale_by_adam_lowp` so that ``state_dtype``
      (``--opt-state-dtype``) can keep the moments in bfloat16. Defaults are torch's: betas
      (0.9, 0.999), eps 1e-8, weight decay 0.01.
    * ``adafactor``: :func:`scale_by_adafactor`, ``transformers.optimization.Adafactor`` with an
      external learning rate (``relative_step=False``) and its other defaults: factored second
      moments of every >= 2-D parameter, update clipping 1.0, the step scaled by the parameter's
      RMS (``scale_parameter=True``), no first moment.
    * ``sgd``: heavy-ball momentum 0.9 (its trace in ``state_dtype``,
      :func:`gpt2jax.train.memory.precision.scale_by_momentum_lowp`),
      ``torch.optim.SGD(momentum=0.9, weight_decay=wd)``: weight decay is added to the gradient
      first (coupled, as torch does).

    Weight decay (on the leaves of :func:`decay_mask`) is multiplied by the learning rate in
    every optimizer, so a small ``--lr`` keeps the weights close to where they started: AdamW
    and Adafactor take ``lr * wd * p`` off beside the gradient's step (decoupled), SGD adds
    ``wd * p`` to the gradient. Adafactor's rate is ``lr`` times the parameter's RMS, for the
    step and the decay alike, as in transformers. (``optax.adafactor``'s own decay is not scaled
    by the rate: at any ``--lr`` it shrank the weights by ``wd`` every step.)

    Every optimizer is preceded by clipping the gradient to a global L2 norm (``clip``, 0 =
    off). The tests check all three, through :class:`gpt2jax.train.layerwise.Layerwise`,
    against torch and transformers over several steps."""
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
        base = scale_by_adafactor(schedule, weight_decay=weight_decay, mask=decay_mask)
    elif name == "sgd":
        base = optax.chain(
            optax.add_decayed_weights(weight_decay, decay_mask),
            scale_by_momentum_lowp(SGD_MOMENTUM, state_dtype),
            optax.scale_by_learning_rate(schedule),
        )
    else:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return optax.chain(optax.clip_by_global_norm(clip), base) if clip > 0 else base
