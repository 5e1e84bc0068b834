"""Freezing parts of the model: ``--freeze embeddings`` or ``--freeze top:N``.

What each means: :func:`parse_freeze`. :func:`make_prepare` stops the gradients of the frozen
parts inside the loss; :class:`gpt2jax.train.layerwise.Layerwise` (``frozen=``,
``trainable_layers=``) keeps frozen parameters and their optimizer state unchanged, weight decay
included.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.config import GPT2Config
from gpt2jax.errors import ConfigError

EMBEDDINGS = ("wte", "wpe")


@dataclasses.dataclass(frozen=True)
class Freeze:
    """What is frozen: top-level leaves (``leaves``) and which blocks train (``layers``, (L,))."""

    leaves: tuple[str, ...]
    layers: tuple[bool, ...] | None  # None: every block trains

    @property
    def trainable_layers(self) -> np.ndarray | None:
        return None if self.layers is None else np.asarray(self.layers, bool)


def parse_freeze(spec: str | None, config: GPT2Config) -> Freeze | None:
    """``None`` (nothing frozen), ``"embeddings"`` or ``"top:N"``, checked against ``config``.

    * ``embeddings``: ``wte`` and ``wpe`` stay as they are (``wte`` is also the tied LM head, so
      the output layer is frozen with it). They get no gradient (``stop_gradient``, so XLA never
      computes the ``(V, C)`` head gradient) and no optimizer state: with AdamW, two moments of
      ``(V + n_ctx) x C`` numbers less (2 x 82M for 1558M).
    * ``top:N``: only the top ``N`` blocks and the final LayerNorm train; the embeddings and the
      lower ``L - N`` blocks are frozen. The usual way to adapt a model while keeping most of
      what it knows (less forgetting, fewer trained numbers). The blocks are stacked in one
      array per weight, so the lower blocks' gradients are zero rather than absent, and their
      optimizer state is allocated but never changes; for memory, LoRA (:mod:`gpt2jax.lora`) is
      the tool."""
    if spec is None or spec == "":
        return None
    if spec == "embeddings":
        return Freeze(leaves=EMBEDDINGS, layers=None)
    if spec.startswith("top:"):
        n = spec[4:]
        if not n.isdigit() or not 1 <= int(n) <= config.n_layer:
            raise ConfigError(
                f"--freeze top:N needs 1 <= N <= n_layer ({config.n_layer}), got {spec!r}"
            )
        L, n = config.n_layer, int(n)
        return Freeze(leaves=EMBEDDINGS, layers=tuple(i >= L - n for i in range(L)))
    raise ConfigError(f"--freeze must be 'embeddings' or 'top:N', got {spec!r}")


def stop_frozen(params: Any, freeze: Freeze) -> dict:
    """``params`` with gradients stopped at the frozen leaves and blocks (values unchanged)."""
    out = {k: jax.lax.stop_gradient(v) if k in freeze.leaves else v for k, v in params.items()}
    if freeze.layers is not None:
        trains = jnp.asarray(freeze.layers)

        def mask(x: jax.Array) -> jax.Array:  # (L, ...)
            keep = trains.reshape((-1,) + (1,) * (x.ndim - 1))
            return jnp.where(keep, x, jax.lax.stop_gradient(x))

        out["h"] = jax.tree.map(mask, params["h"])
    return out


def make_prepare(freeze: Freeze):
    """The :func:`gpt2jax.train.loss.make_token_losses` hook for a frozen part (no ``frozen``
    tree)."""

    def prepare(params: Any, frozen: Any) -> tuple[Any, contextlib.AbstractContextManager]:
        return stop_frozen(params, freeze), contextlib.nullcontext()

    return prepare
