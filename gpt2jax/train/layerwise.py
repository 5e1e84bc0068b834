"""Applying the optimizer per layer, in place: the update never exists whole.

``tx.update`` plus ``optax.apply_updates`` materialises the whole update tree; an optimizer with
per-matrix statistics (Adafactor) keeps several full-size temporaries per leaf. :class:`Layerwise`
applies ``tx`` to each layer of the stacked block parameters: all layers at once for elementwise
optimizers (which XLA fuses in place), one at a time in a ``lax.fori_loop`` otherwise. It also
keeps frozen parameters unchanged and rounds bfloat16 parameters stochastically.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt2jax.train.memory.precision import dithered_round

STACKED = "h"


class LayerwiseState(NamedTuple):
    count: jax.Array  # () int32: updates applied (salts the rounding of bfloat16 parameters)
    layers: Any  # tx's state of one layer, stacked over layers (leading axis L)
    rest: Any  # tx's state of the trained unstacked leaves


class Layerwise:
    """``tx`` applied layer by layer in place.

    ``tx.update`` followed by ``optax.apply_updates`` materialises the whole update tree, and XLA
    keeps several full-size intermediates of each leaf alive while it computes it (for Adafactor
    on the stacked ``(48, 1600, 6400)`` MLP weights of 1558M, several 2 GB buffers at once:
    BENCHMARKS.md). This runs ``tx`` inside a ``lax.fori_loop`` over the layer axis of the
    stacked block parameters ``h/...``: each iteration slices one layer's gradients, optimizer
    state and parameters, updates them and writes them back with ``dynamic_update_slice`` into
    the loop's carry, which XLA updates in place (and, with the train state donated, in the input
    buffers). The optimizer's temporaries are then one layer's worth (a 1600 x 6400 float32
    matrix, 41 MB, for 1558M). The other leaves (``wte``, ``wpe``, ``ln_f``) are updated whole.

    An ``elementwise`` optimizer (AdamW, SGD: every element's update depends on that element
    alone) has no per-matrix temporaries to bound, so its layers are updated together:
    ``jax.vmap`` over the layer axis, the same maths as the loop, which XLA fuses into one
    in-place pass per leaf. The loop would cost more there: XLA's CPU backend copies the whole
    stacked moments on every iteration when one fusion reads a slice that another writes in
    place (measured: BENCHMARKS.md, Training: 7x the time, and at 774M 5.5 GB of scratch
    where the vmapped update needs none).

    The maths is ``tx`` applied to each layer's slice: for AdamW and SGD (elementwise) exactly
    ``tx`` on the whole tree; for Adafactor its per-tensor statistics (update clipping by RMS,
    relative step size by the parameter's RMS) are per weight matrix, as in Shazeer & Stern
    (2018) and in unstacked implementations, instead of per stack of 48 matrices. Clipping to a
    global norm, which needs every gradient, happens here before the loop (``clip``; ``tx`` must
    not clip).

    Freezing (:mod:`gpt2jax.train.memory.freeze`): ``frozen`` names top-level leaves (``wte``...)
    that get no optimizer state and never change; ``trainable_layers`` ``(L,)`` bool leaves the
    other layers' parameters and state untouched (their state is still allocated: the layers
    share arrays). Parameters stored in bfloat16 are updated in float32 and stochastically
    rounded back (:func:`gpt2jax.train.memory.precision.dithered_round`), so updates smaller than
    bfloat16's resolution survive on average.

    Like an optax transformation it has ``init(params) -> state``; instead of ``update`` it has
    :meth:`apply`, which returns the new parameters themselves. :func:`apply_optimizer` calls
    either kind.
    """

    def __init__(
        self,
        tx: optax.GradientTransformation,
        *,
        clip: float = 0.0,
        frozen: Collection[str] = (),
        trainable_layers: np.ndarray | None = None,
        elementwise: bool = False,
    ) -> None:
        self.tx = tx
        self.elementwise = elementwise
        self.clip = clip
        self.frozen = frozenset(frozen)
        self.trainable_layers = (
            None if trainable_layers is None else np.asarray(trainable_layers, bool)
        )

    def _rest(self, tree: Any) -> dict:
        return {k: v for k, v in tree.items() if k != STACKED and k not in self.frozen}

    def init(self, params: Any) -> LayerwiseState:
        return LayerwiseState(
            count=jnp.zeros((), jnp.int32),
            layers=jax.vmap(self.tx.init)(params[STACKED]),
            rest=self.tx.init(self._rest(params)),
        )

    def apply(self, grads: Any, state: LayerwiseState, params: Any) -> tuple[Any, LayerwiseState]:
        """``(new params, new state)`` after one update with ``grads``."""
        count = optax.safe_increment(state.count)
        if self.clip > 0:
            norm = optax.tree.norm(grads)
            scale = jnp.where(norm < self.clip, 1.0, self.clip / norm)  # clip_by_global_norm
        else:
            scale = jnp.ones((), jnp.float32)

        def step(tx_state, g, p):  # one tree of leaves, updated whole
            g = jax.tree.map(lambda x: x * scale.astype(x.dtype), g)
            updates, tx_state = self.tx.update(g, tx_state, p)
            new = jax.tree.map(
                lambda x, u: dithered_round(x.astype(jnp.float32) + u, x.dtype, count), p, updates
            )
            return new, tx_state

        rest, rest_state = step(state.rest, self._rest(grads), self._rest(params))
        n_layer = jax.tree.leaves(params[STACKED])[0].shape[0]
        mask = None if self.trainable_layers is None else jnp.asarray(self.trainable_layers)

        def layer(layer_state, g, p, keep):  # one layer's slices
            new_p, new_s = step(layer_state, g, p)
            if keep is not None:  # a frozen layer keeps its parameters and state
                new_p = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_p, p)
                new_s = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_s, layer_state)
            return new_p, new_s

        if self.elementwise:
            h, layers = jax.vmap(layer, in_axes=(0, 0, 0, None if mask is None else 0))(
                state.layers, grads[STACKED], params[STACKED], mask
            )
        else:

            def body(i, carry):
                h, layer_state = carry
                take = lambda tree: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
                keep = None if mask is None else mask[i]
                new_p, new_s = layer(take(layer_state), take(grads[STACKED]), take(h), keep)
                put = lambda tree, new: jax.tree.map(lambda x, y: x.at[i].set(y), tree, new)  # noqa: E731
                return put(h, new_p), put(layer_state, new_s)

            carry = (params[STACKED], state.layers)
            h, layers = jax.lax.fori_loop(0, n_layer, body, carry)
        new_params = {**params, **rest, STACKED: h}
        return new_params, LayerwiseState(count=count, layers=layers, rest=rest_state)


def apply_optimizer(tx: Any, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    """``(new params, new optimizer state)``: :meth:`Layerwise.apply`, or optax's update and
    ``apply_updates`` for an ordinary ``optax.GradientTransformation``."""
    if isinstance(tx, Layerwise):
        return tx.apply(grads, opt_state, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
