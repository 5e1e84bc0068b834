"""In-place gradient accumulation (:mod:`gpt2jax.train.memory.accumulate`): the same gradient as
``jax.grad``, the same update as one big batch, and no second full gradient buffer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TINY, random_params
from gpt2jax.config import GPT2Config
from gpt2jax.model import GPT2
from gpt2jax.train.loss import make_token_losses
from gpt2jax.train.memory.accumulate import make_accumulate
from gpt2jax.train.memory.build import build
from gpt2jax.train.memory.planner import peak_bytes
from gpt2jax.train.settings import MemorySettings
from gpt2jax.train.step import TrainState, make_train_step


def rel_err(a, b) -> float:
    errs = jax.tree.map(
        lambda x, y: float(jnp.linalg.norm(x - y) / (jnp.linalg.norm(y) + 1e-30)), a, b
    )
    return max(jax.tree.leaves(errs))


@pytest.mark.parametrize(
    "compute_dtype, loss_chunk",
    [(jnp.float32, 5), (jnp.bfloat16, 0),  # each dtype and each loss path once
     pytest.param(jnp.float32, 0, marks=pytest.mark.slow),
     pytest.param(jnp.bfloat16, 5, marks=pytest.mark.slow)],
)  # fmt: skip
def test_accumulated_gradient_equals_jax_grad(compute_dtype, loss_chunk):
    params = random_params(TINY, seed=1)
    model = GPT2(TINY, dtype=compute_dtype, remat="block")
    windows = jnp.asarray(np.random.default_rng(0).integers(0, TINY.n_vocab, (3, 2, 12)))
    losses = make_token_losses(model, loss_chunk=loss_chunk)

    def mean_loss(p):
        return jnp.mean(jnp.stack([losses(p, w).mean() for w in windows]))

    want_loss, want = jax.jit(jax.value_and_grad(mean_loss))(params)  # jitted: eager is slow
    accumulate = jax.jit(make_accumulate(model, loss_chunk))
    acc, total = jax.tree.map(jnp.zeros_like, params), 0.0
    for w in windows:
        loss, acc = accumulate(params, acc, w, 1.0 / len(windows), None)
        total += loss
    tol = 1e-5 if compute_dtype == jnp.float32 else 2e-2
    assert abs(float(total) - float(want_loss)) <= tol * abs(float(want_loss))
    assert rel_err(acc, want) <= tol


def test_accumulated_update_equals_one_batch_update():
    """8 windows as 1 x 8 and as 4 micro-batches of 2 give the same AdamW update (float32)."""
    settings = MemorySettings(remat="block")
    recipe = build(TINY, settings, optax.constant_schedule(1e-3), weight_decay=0.1)
    assert recipe.accumulate is not None
    step = jax.jit(
        make_train_step(
            recipe.model, recipe.tx, loss_fn=recipe.loss_fn, accumulate=recipe.accumulate
        )
    )
    batch = np.random.default_rng(3).integers(0, TINY.n_vocab, (8, 13)).astype(np.int32)

    def run(accum):
        state = TrainState.create(random_params(TINY, seed=2), recipe.tx, 0)
        return step(state, jnp.asarray(batch.reshape(accum, 8 // accum, 13)))

    one, m1 = run(1)
    four, m4 = run(4)
    assert abs(float(m1["loss"]) - float(m4["loss"])) <= 1e-5 * float(m1["loss"])
    assert abs(float(m1["grad_norm"]) - float(m4["grad_norm"])) <= 1e-5 * float(m1["grad_norm"])
    assert rel_err(four.params, one.params) <= 1e-6


@pytest.mark.slow
def test_no_second_gradient_buffer():
    """8 micro-batches in place need no more than one batch does (one gradient buffer), and
    less than summing each micro-batch's whole gradient (compiled peaks, same settings)."""
    config = GPT2Config(n_vocab=4099, n_ctx=64, n_embd=256, n_head=4, n_layer=6)
    grads = config.num_params() * 4

    def peak(remat, accum, in_place):
        recipe = build(config, MemorySettings(remat=remat, optimizer="adafactor"), lambda s: 1e-3)
        trained, _ = recipe.abstract_params()
        state = jax.eval_shape(lambda p: TrainState.create(p, recipe.tx, 0), trained)
        batch = jax.ShapeDtypeStruct((accum, 8 // accum, 65), jnp.int32)
        accumulate = make_accumulate(recipe.model) if in_place else None
        step = make_train_step(
            recipe.model, recipe.tx, loss_fn=recipe.loss_fn, accumulate=accumulate
        )
        return peak_bytes(jax.jit(step, donate_argnums=(0,)).lower(state, batch).compile())

    in_place = peak("block", 8, True)
    assert in_place <= peak("block", 1, False)
    assert peak("block", 8, False) - in_place > 0.3 * grads
    assert peak("none", 8, False) - in_place > 0.9 * grads
