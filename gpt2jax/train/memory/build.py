"""One place that turns the memory settings of a run into a model, optimizer, loss and step.

``gpt2jax finetune`` and ``gpt2jax plan`` both build their training step here (:func:`build`),
so what the planner compiles and measures is exactly what the run executes. The settings are
:class:`MemorySettings` (the ``memory_settings`` section of a ``TrainConfig``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gpt2jax import device, lora
from gpt2jax.config import GPT2Config
from gpt2jax.dtypes import dtype
from gpt2jax.model import GPT2, param_shapes
from gpt2jax.train.layerwise import Layerwise
from gpt2jax.train.loss import LossFn, chain, make_token_losses
from gpt2jax.train.memory import freeze as freezing
from gpt2jax.train.memory.accumulate import Accumulate, make_accumulate
from gpt2jax.train.optim import ELEMENTWISE, make_optimizer
from gpt2jax.train.settings import MemorySettings


@dataclasses.dataclass
class Recipe:
    """Everything a run builds from its settings."""

    model: GPT2  # the module the loss runs (dropout as configured)
    tx: Layerwise
    loss_fn: LossFn
    settings: MemorySettings
    lora_scale: float | None
    #: in-place gradient accumulation (:mod:`gpt2jax.train.memory.accumulate`) for full-model
    #: training with block remat; None: micro-batch gradients are summed whole
    accumulate: Accumulate | None = None

    def split(self, params: Any, seed: int) -> tuple[Any, Any]:
        """``(trained, frozen)`` parts of the starting model's parameters, in ``param_dtype``:
        the model and None, or fresh LoRA adapters (always float32) and the base model (a
        frozen base needs no float32 master copy: bfloat16 halves it)."""
        stored = dtype(self.settings.param_dtype)
        params = jax.tree.map(lambda x: jnp.asarray(x, stored), params)
        if self.settings.lora_rank:
            return lora.init_lora(self.model.config, self.settings.lora_rank, seed), params
        return params, None

    def merged(self, params: Any, frozen: Any) -> Any:
        """The full model a state's ``(params, frozen)`` stand for (LoRA merged in)."""
        if self.settings.lora_rank:
            return lora.merge_lora(frozen, params, self.lora_scale)
        return params

    def abstract_params(self, dtype: Any = None) -> tuple[Any, Any]:
        """``(trained, frozen)`` as ``ShapeDtypeStruct``s (nothing allocated), the starting
        model stored in ``dtype`` (default float32)."""
        shapes = param_shapes(self.model.config)
        if dtype is not None:
            shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)
        return jax.eval_shape(lambda p: self.split(p, 0), shapes)


def build(
    config: GPT2Config,
    settings: MemorySettings,
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.01,
    clip: float = 1.0,
    extra_prepare: Any = None,
) -> Recipe:
    """The model, layer-by-layer optimizer and loss of ``settings``.

    The optimizer always runs per layer in place (:class:`gpt2jax.train.layerwise.Layerwise`),
    with global-norm clipping before it. What the train state then holds: ``params`` are the
    trained numbers (the whole model, or the LoRA adapters), ``frozen`` the rest of the model
    that the loss reads but never differentiates (LoRA's base model; None otherwise).

    ``extra_prepare`` is one more :func:`gpt2jax.train.loss.make_token_losses` hook run after LoRA's
    or freezing's (FSDP's, :func:`gpt2jax.train.sharding.make_prepare`).
    """
    settings.validate()
    model = GPT2(
        config,
        dtype=dtype(device.resolve_compute_dtype(settings.compute_dtype)),
        param_dtype=dtype(settings.param_dtype),
        remat=device.resolve_remat(settings.remat),
        attention=settings.attention,
    )
    base = make_optimizer(
        settings.optimizer,
        schedule,
        weight_decay=weight_decay,
        clip=0.0,  # global-norm clipping is Layerwise's, before the per-layer loop
        state_dtype=dtype(settings.opt_state_dtype),
    )
    prepares = []
    scale = None
    frozen_leaves: tuple[str, ...] = ()
    trainable_layers = None
    if settings.lora_rank:
        scale = lora.lora_scale(settings.lora_rank, settings.lora_alpha)
        prepares.append(lora.make_prepare(scale))
    freeze = freezing.parse_freeze(settings.freeze, config)
    if freeze is not None:
        prepares.append(freezing.make_prepare(freeze))
        frozen_leaves, trainable_layers = freeze.leaves, freeze.trainable_layers
    if extra_prepare is not None:
        prepares.append(extra_prepare)
    tx = Layerwise(
        base, clip=clip, frozen=frozen_leaves, trainable_layers=trainable_layers,
        elementwise=settings.optimizer in ELEMENTWISE,
    )  # fmt: skip
    loss_fn = make_token_losses(
        model, loss_chunk=settings.loss_chunk, prepare=chain(*prepares) if prepares else None
    )
    accumulate = None
    if model.remat == "block" and not prepares:  # the model's own tree, trained whole
        accumulate = make_accumulate(model, settings.loss_chunk)
    return Recipe(
        model=model, tx=tx, loss_fn=loss_fn, settings=settings, lora_scale=scale,
        accumulate=accumulate,
    )  # fmt: skip
