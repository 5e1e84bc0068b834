"""Device-native defaults, float16 training with dynamic loss scaling (forced on the CPU),
weights on the device after ``load``, and the persistent compile cache."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gpt2jax
from conftest import FIXTURES, TINY, random_params
from gpt2jax import device
from gpt2jax.cli.main import main as cli
from gpt2jax.loss_scale import LossScale
from gpt2jax.model import GPT2
from gpt2jax.store.runs import read_run
from gpt2jax.train.loop import finetune
from gpt2jax.train.metrics import read_metrics
from gpt2jax.train.settings import TrainConfig
from gpt2jax.train.step import TrainState, make_train_step

TINY_MODEL = str(FIXTURES / "openai_tiny")


# -- defaults ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "platform, capability, dtype",
    [
        ("tpu", None, "bfloat16"),
        ("gpu", 9.0, "bfloat16"),  # H100/H200
        ("gpu", 8.0, "bfloat16"),  # A100
        ("gpu", 7.5, "float16"),  # T4
        ("gpu", 7.0, "float16"),  # V100
        ("cpu", None, "float32"),
    ],
)
def test_default_compute_dtype(platform, capability, dtype) -> None:
    d = device.Device(platform, "x", 1, capability)
    assert device.default_compute_dtype(d) == dtype
    assert device.needs_loss_scaling(dtype) == (dtype == "float16")
    assert device.resolve_compute_dtype("float32", d) == "float32"  # a flag overrides


@pytest.mark.parametrize("platform, remat", [("cpu", "dots"), ("gpu", "none"), ("tpu", "none")])
def test_default_remat(platform, remat) -> None:
    d = device.Device(platform, "x", 1, None)
    assert device.default_remat(d) == remat
    assert device.resolve_remat("auto", d) == remat
    assert device.resolve_remat("block", d) == "block"  # a flag overrides


def test_remat_auto_becomes_dots_in_the_step_finetune_builds_here() -> None:
    from gpt2jax.config import GPT2Config
    from gpt2jax.train.memory.build import build
    from gpt2jax.train.settings import MemorySettings

    assert MemorySettings().remat == "auto" and TrainConfig().memory_settings.remat == "auto"
    config = GPT2Config(n_vocab=64, n_ctx=16, n_embd=8, n_head=2, n_layer=2)
    assert build(config, MemorySettings(), lambda s: 1e-3).model.remat == "dots"
    assert build(config, MemorySettings(remat="none"), lambda s: 1e-3).model.remat == "none"


def test_defaults_here_keep_float32_on_the_cpu() -> None:
    assert jax.default_backend() == "cpu"
    assert device.resolve_compute_dtype("auto") == "float32"
    assert device.kv_cache_dtype(jnp.bfloat16) == jnp.float32
    assert device.kv_cache_dtype(jnp.bfloat16, "tpu") == jnp.bfloat16
    assert TrainConfig().memory_settings.compute_dtype == "auto"


def test_info_prints_the_device_choices(capsys) -> None:
    assert cli(["info"]) == 0
    out = capsys.readouterr().out
    assert "compute dtype  float32" in out and "attention" in out and "cpu" in out


# -- loss scaling ------------------------------------------------------------------------------


def test_loss_scale_adjusts() -> None:
    s = LossScale.create(scale=8.0, growth_interval=2)
    s = s.adjust(jnp.bool_(True))
    assert (float(s.scale), int(s.good_steps)) == (8.0, 1)
    s = s.adjust(jnp.bool_(True))  # two finite updates in a row: doubled
    assert (float(s.scale), int(s.good_steps)) == (16.0, 0)
    s = s.adjust(jnp.bool_(True)).adjust(jnp.bool_(False))  # an overflow: halved, count reset
    assert (float(s.scale), int(s.good_steps)) == (8.0, 0)
    low = LossScale.create(scale=1.0).adjust(jnp.bool_(False))
    assert float(low.scale) == 1.0  # never below 1


def _state(dtype, scale, tx=None):
    params = jax.tree.map(jnp.asarray, random_params(TINY))
    model = GPT2(TINY, dtype=dtype)
    tx = optax.adamw(1e-3) if tx is None else tx
    step = jax.jit(make_train_step(model, tx))
    ls = None if scale is None else LossScale.create(scale=scale, growth_interval=2)
    return step, TrainState.create(params, tx, 0, loss_scale=ls)


def _batch():
    ids = jax.random.randint(jax.random.PRNGKey(0), (1, 4, TINY.n_ctx + 1), 0, TINY.n_vocab)
    return ids.astype(jnp.int32)


@pytest.mark.slow
def test_float16_step_with_loss_scaling_matches_float32() -> None:
    """float16 compute on the CPU: the unscaled gradients are float32's to float16 rounding.
    Plain SGD with lr 1 so that each update is minus the gradient (Adam's first update is
    ~lr * sign(g), which float16 noise flips for near-zero gradients)."""
    step32, state32 = _state(jnp.float32, None, optax.sgd(1.0))
    step16, state16 = _state(jnp.float16, 2.0**12, optax.sgd(1.0))
    new32, m32 = step32(state32, _batch())
    new16, m16 = step16(state16, _batch())
    assert not bool(m16["overflow"]) and bool(m16["finite"])
    assert float(m16["loss_scale"]) == 2.0**12
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=2e-3)
    np.testing.assert_allclose(float(m16["grad_norm"]), float(m32["grad_norm"]), rtol=2e-2)
    leaves = zip(jax.tree.leaves(new16.params), jax.tree.leaves(new32.params),
                 jax.tree.leaves(state32.params), strict=True)  # fmt: skip
    for a, b, old in leaves:
        assert a.dtype == jnp.float32  # the master weights stay float32
        g16, g32 = np.asarray(old - a), np.asarray(old - b)  # the unscaled gradients
        # float16 keeps ~3 decimal digits: each gradient to 1e-2 of the largest of its tensor
        np.testing.assert_allclose(g16, g32, rtol=0, atol=1e-2 * np.abs(g32).max())
    # finite updates count towards growth: the second doubles the scale
    newer, _ = step16(new16, _batch())
    assert float(newer.loss_scale.scale) == 2.0**13


@pytest.mark.slow
def test_overflow_skips_the_update_and_halves_the_scale() -> None:
    """A scale that overflows float16's backward pass: nothing changes but the scale, until
    it is low enough; then updates resume."""
    step, state = _state(jnp.float16, 2.0**40)
    new, m = step(state, _batch())
    assert bool(m["overflow"]) and bool(m["finite"])  # the loss itself is fine
    assert float(m["lr"]) == 0.0 if "lr" in m else True
    assert float(new.loss_scale.scale) == 2.0**39
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(state.opt_state),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    overflows = 0
    while True:
        state = new
        new, m = step(state, _batch())
        if not bool(m["overflow"]):
            break
        overflows += 1
        assert overflows < 40
    assert float(m["loss_scale"]) < 2.0**24  # float16's largest finite is 65504 = 2^16 - 32
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True)
    )


@pytest.mark.slow
def test_float16_finetune_resumes_exactly_with_its_loss_scale(tmp_path) -> None:
    """4 float16 updates straight == 3, a resume (the loss scale from the checkpoint), 1."""
    text = (FIXTURES / "english.txt").read_text(encoding="utf-8")
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")

    def train(steps):
        return TrainConfig(
            model=TINY_MODEL, data=[str(tmp_path / "train.txt")], steps=steps, batch_size=2,
            seq_len=16, lr=1e-3, compute_dtype="float16", eval_every=0, sample_every=0,
            save_every=2, val_fraction=0.0, schedule_steps=4,
        )  # fmt: skip

    kw = dict(cache_dir=tmp_path / "cache", show_progress=False)
    finetune(tmp_path / "straight", train(4), **kw)
    finetune(tmp_path / "resumed", train(3), **kw)
    assert finetune(tmp_path / "resumed", resume=True, overrides={"steps": 4}, **kw).step == 4
    _, recorded = read_run(tmp_path / "resumed")
    assert recorded.memory_settings.compute_dtype == "float16"

    def scales(run):
        return [r["loss_scale"] for r in read_metrics(tmp_path / run / "metrics.jsonl")
                if "loss" in r]  # fmt: skip

    assert len(scales("straight")) == 4 and scales("straight") == scales("resumed")
    a, b = gpt2jax.load(tmp_path / "straight").params, gpt2jax.load(tmp_path / "resumed").params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_auto_resolves_and_is_recorded(tmp_path) -> None:
    text = (FIXTURES / "english.txt").read_text(encoding="utf-8")
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    train = TrainConfig(
        model=TINY_MODEL, data=[str(tmp_path / "t.txt")], steps=1, batch_size=1, seq_len=8,
        eval_every=0, sample_every=0, val_fraction=0.0,
    )  # fmt: skip
    finetune(tmp_path / "run", train, cache_dir=tmp_path / "cache", show_progress=False)
    _, recorded = read_run(tmp_path / "run")
    settings = recorded.memory_settings
    assert settings.compute_dtype == "float32" and settings.attention == "auto"


# -- weights on the device ---------------------------------------------------------------------


def test_load_puts_the_weights_on_the_device_once() -> None:
    m = gpt2jax.load(TINY_MODEL)
    target = jax.devices()[0]
    for leaf in jax.tree.leaves(m.params):
        assert isinstance(leaf, jax.Array) and leaf.devices() == {target}
    ids = m.encode("Hello world, hello")
    grad = jax.jit(jax.grad(lambda p, x: m.module.apply({"params": p}, x).sum()))
    ids_dev = jax.device_put(ids[None])
    with jax.transfer_guard_host_to_device("disallow"):
        first = m.logits(ids)
        for _ in range(3):
            np.testing.assert_array_equal(m.logits(ids), first)
        grads = grad(m.params, ids_dev)
        grad(m.params, ids_dev)
    assert jax.tree.structure(grads) == jax.tree.structure(m.params)


def test_load_on_a_given_device_or_sharding() -> None:
    d = jax.devices()[0]
    m = gpt2jax.load(TINY_MODEL, device=d)
    assert all(x.devices() == {d} for x in jax.tree.leaves(m.params))
    s = jax.sharding.SingleDeviceSharding(d)
    m = gpt2jax.load(TINY_MODEL, sharding=s)
    assert all(x.sharding == s for x in jax.tree.leaves(m.params))
    with pytest.raises(gpt2jax.Gpt2JaxError, match="not both"):
        gpt2jax.load(TINY_MODEL, device=d, sharding=s)


# -- compile cache -----------------------------------------------------------------------------


def test_enable_compile_cache_fills_the_directory(tmp_path) -> None:
    """A fresh process: the cache must be on before the first compilation."""
    code = (
        "import jax, jax.numpy as jnp, gpt2jax\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        f"print(gpt2jax.enable_compile_cache({str(tmp_path / 'jax')!r}))\n"
        "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    # cwd: outside the checkout, so that the installed package is imported where one is tested
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=True)  # fmt: skip
    assert out.stdout.strip() == str(tmp_path / "jax")
    assert any((tmp_path / "jax").iterdir())
    assert device.enable_compile_cache() is None or os.environ.get("JAX_COMPILATION_CACHE_DIR")
