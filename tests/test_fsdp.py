"""FSDP on 8 fake CPU devices equals one device; sharded checkpoints restore on 4 and 1 devices.

The 8-device half runs in a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=8``
must be set before JAX starts) and writes its results to a directory this process reads.
Tolerance (float32): loss within 1e-6 relative, every gradient and updated parameter within
2e-5 of the largest element of that tensor (the sharded step sums in a different order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from conftest import ROOT, TINY, random_params
from gpt2jax.convert import mapping
from gpt2jax.model import GPT2
from gpt2jax.train.layerwise import Layerwise
from gpt2jax.train.loss import make_token_losses
from gpt2jax.train.sharding import AXIS, FSDP, make_prepare, partition_spec
from gpt2jax.train.step import TrainState, make_train_step

# Big enough that the blocks' weights and wte (>= 2^14 numbers) are sharded 8 ways; wpe (n_ctx
# 23), the biases and LayerNorms are replicated.
CONFIG = TINY.__class__(n_vocab=256, n_ctx=23, n_embd=64, n_head=4, n_layer=2)
SEED, LR = 0, 1e-2


def windows() -> np.ndarray:
    return np.random.default_rng(5).integers(0, CONFIG.n_vocab, (2, 8, 17)).astype(np.int32)


def tx():
    """SGD with momentum and weight decay: its update is linear in the gradient, so parameters
    agree as closely as gradients do (Adam's first step, lr * g / (|g| + eps), turns summation-
    order differences of near-zero gradients into differences of up to lr)."""
    decay_then_sgd = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(LR, momentum=0.9))
    return Layerwise(decay_then_sgd, clip=1.0)


def model() -> GPT2:
    return GPT2(CONFIG, remat="block")


def loss_fn():
    return make_token_losses(model(), loss_chunk=5)


def fsdp_loss_fn(fsdp: FSDP):
    return make_token_losses(model(), loss_chunk=5, prepare=make_prepare(fsdp.mesh))


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np, orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec
    from test_fsdp import CONFIG, SEED, windows, tx, fsdp_loss_fn, model
    from conftest import random_params
    from gpt2jax.convert import mapping
    from gpt2jax.train.sharding import FSDP
    from gpt2jax.train.step import TrainState, make_train_step
    out = sys.argv[1]
    fsdp = FSDP()
    assert fsdp.num_devices == 8
    losses = fsdp_loss_fn(fsdp)
    params = fsdp.place(random_params(CONFIG))
    grad_fn = jax.jit(jax.value_and_grad(lambda p, w: losses(p, w).mean()),
                      out_shardings=(fsdp.replicated, fsdp.shardings(params)))
    rows = jax.device_put(windows()[0], NamedSharding(fsdp.mesh, PartitionSpec("fsdp")))
    loss, grads = grad_fn(params, rows)
    flat = mapping.flatten(grads)
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    np.savez(f"{out}/grads.npz", loss=np.asarray(loss), **arrays)
    json.dump({k: str(v.sharding.spec) for k, v in flat.items()}, open(f"{out}/specs.json", "w"))
    t = tx()
    state = fsdp.init(lambda p: TrainState.create(p, t, SEED), params)
    step = fsdp.compile_train_step(make_train_step(model(), t, loss_fn=losses), state)
    state, metrics = step(state, fsdp.shard(windows().reshape(16, 17), grad_accum=2))
    flat = mapping.flatten(state.params)
    np.savez(f"{out}/step.npz", loss=np.asarray(metrics["loss"]),
             **{k: np.asarray(v) for k, v in flat.items()})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(f"{out}/ckpt", state)
    """
)


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp8")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def close(ours, ref, tol=2e-5, what=""):
    ref = np.asarray(ref)
    np.testing.assert_allclose(
        np.asarray(ours), ref, rtol=0, atol=tol * np.abs(ref).max(), err_msg=what
    )


def test_partition_rules():
    n = 8
    assert partition_spec("h/mlp/c_fc/w", (3, 64, 256), n) == PartitionSpec(None, None, AXIS)
    assert partition_spec("h/mlp/c_fc/w", (8, 1600, 12), n) == PartitionSpec(None, AXIS, None)
    assert partition_spec("h/mlp/c_fc/w", (3, 32, 128), n) == PartitionSpec()  # small
    assert partition_spec("wte", (50257, 1600), n) == PartitionSpec(None, AXIS)
    assert partition_spec("h/mlp/c_fc/b", (48, 6400), n) == PartitionSpec(None, AXIS)
    assert partition_spec("ln_f/g", (1600,), n) == PartitionSpec()  # small
    assert partition_spec("wpe", (23, 1000), n) == PartitionSpec(None, AXIS)
    assert partition_spec("wpe", (23, 1001), n) == PartitionSpec()  # nothing divides
    assert partition_spec("wte", (50257, 1600), 1) == PartitionSpec()


def test_fsdp_loss_and_grads_equal_one_device(eight):
    got = np.load(eight / "grads.npz")
    losses = loss_fn()
    loss, grads = jax.jit(jax.value_and_grad(lambda p, w: losses(p, w).mean()))(
        jax.tree.map(jnp.asarray, random_params(CONFIG)), windows()[0]
    )
    np.testing.assert_allclose(got["loss"], loss, rtol=1e-6)
    for path, g in mapping.flatten(grads).items():
        close(got[path], g, what=path)
    specs = json.loads((eight / "specs.json").read_text())  # really sharded:
    assert specs["h/mlp/c_fc/w"] == str(PartitionSpec(None, None, AXIS))
    assert specs["wte"] == str(PartitionSpec(AXIS, None))


@pytest.fixture(scope="module")
def single_device_step():
    """``(state, metrics)`` after one step on this process's one device."""
    t = tx()
    state = TrainState.create(random_params(CONFIG), t, SEED)
    step = jax.jit(make_train_step(model(), t, loss_fn=loss_fn()))
    return step(state, jnp.asarray(windows()))


def test_fsdp_train_step_equals_one_device(eight, single_device_step):
    got = np.load(eight / "step.npz")
    state, metrics = single_device_step
    np.testing.assert_allclose(got["loss"], metrics["loss"], rtol=1e-6)
    for path, p in mapping.flatten(state.params).items():
        close(got[path], p, what=path)


@pytest.mark.parametrize("n_devices", [1, 4])
def test_sharded_checkpoint_restores_on_another_device_count(eight, single_device_step, n_devices):
    """Saved from 8 devices, restored here onto a mesh of 1 (this process has one CPU device)
    or, in a 4-device process, 4."""
    if n_devices > len(jax.devices()):
        script = _RESTORE.format(ckpt=eight / "ckpt", n=n_devices)
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
        proc = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().endswith("restored on 4 devices")
        return
    state = restore(eight / "ckpt", FSDP())
    expected = single_device_step[0]
    for path, p in mapping.flatten(state.params).items():
        close(p, mapping.flatten(expected.params)[path], what=path)
    assert int(state.step) == 1


def restore(path, fsdp: FSDP) -> TrainState:
    import orbax.checkpoint as ocp

    t = tx()
    shapes = jax.eval_shape(
        lambda: TrainState.create(jax.tree.map(jnp.asarray, random_params(CONFIG)), t, SEED)
    )
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.fspath(path), fsdp.abstract(shapes))


_RESTORE = """
import sys
sys.path.insert(0, "tests")
import jax, numpy as np
from test_fsdp import restore
from gpt2jax.train.sharding import FSDP
state = restore("{ckpt}", FSDP())
w = state.params["h"]["mlp"]["c_fc"]["w"]
assert len(w.sharding.device_set) == {n}
assert w.addressable_shards[0].data.shape[2] == w.shape[2] // {n}
print("restored on {n} devices")
"""
