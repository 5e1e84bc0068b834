"""Dynamic loss scaling for float16 training (GPUs without bfloat16 units: T4, V100).

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero in the backward pass. The loss
is multiplied by a large ``scale`` before differentiating, so the float16 backward pass carries
``scale`` times the gradients, and the float32 parameter gradients are divided by it again. When
a gradient overflows (inf/NaN) the update is skipped and the scale halved; after
``GROWTH_INTERVAL`` finite updates in a row it is doubled. The constants are
``torch.amp.GradScaler``'s (init 2^16, factors 2 and 1/2, interval 2000).

The state is part of the train state (so it is a pure function of the run, checkpointed with
it). Parameters, optimizer state, LayerNorm statistics, softmax and loss stay float32.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

INIT_SCALE = 2.0**16
GROWTH_INTERVAL = 2000
GROWTH = 2.0
BACKOFF = 0.5


class LossScale(flax.struct.PyTreeNode):
    """``scale`` (float32) and ``good_steps`` (finite updates since the last change, int32)."""

    scale: jax.Array
    good_steps: jax.Array
    growth_interval: int = flax.struct.field(pytree_node=False, default=GROWTH_INTERVAL)

    @classmethod
    def create(
        cls, scale: float = INIT_SCALE, good_steps: int = 0, growth_interval: int = GROWTH_INTERVAL
    ) -> LossScale:
        """A scale of ``scale`` that has seen ``good_steps`` finite updates."""
        return cls(
            scale=jnp.asarray(scale, jnp.float32),
            good_steps=jnp.asarray(good_steps, jnp.int32),
            growth_interval=growth_interval,
        )

    def unscale(self, grads: Any) -> Any:
        """The true gradients (float32) of gradients of ``scale * loss``."""
        inv = 1.0 / self.scale
        return jax.tree.map(lambda g: g.astype(jnp.float32) * inv, grads)

    def adjust(self, finite: jax.Array) -> LossScale:
        """The scale for the next update, after one whose gradients were ``finite`` or not."""
        grow = finite & (self.good_steps + 1 >= self.growth_interval)
        scale = jnp.where(finite, jnp.where(grow, self.scale * GROWTH, self.scale),
                          jnp.maximum(self.scale * BACKOFF, 1.0))  # fmt: skip
        good = jnp.where(finite & ~grow, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good.astype(jnp.int32))

    def to_json(self) -> dict[str, float | int]:
        """``scale`` and ``good_steps`` for a checkpoint's metadata (``create(**it)`` back)."""
        return {"scale": float(self.scale), "good_steps": int(self.good_steps)}


def all_finite(tree: Any) -> jax.Array:
    """True when no leaf of ``tree`` holds an inf or NaN."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
