"""The training step's maths: PyTorch parity, accumulation, pmap over 8 devices, optimizers."""

from __future__ import annotations

import dataclasses
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

from conftest import ROOT, TINY, hf_model, random_params
from gpt2jax.convert import mapping
from gpt2jax.model import GPT2
from gpt2jax.train.layerwise import Layerwise
from gpt2jax.train.optim import adafactor_scale, decay_mask, learning_rate_schedule, make_optimizer
from gpt2jax.train.step import TrainState, make_train_step, token_losses

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.1
# HF names of the weights we decay: the four matmul weights of each block.
HF_DECAYED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def windows(seed: int, shape=(8, 20), config=TINY) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.n_vocab, shape).astype(np.int32)


def adamw() -> optax.GradientTransformation:
    schedule = learning_rate_schedule(LR, 0, 100, "constant")
    return make_optimizer(
        "adamw", schedule, weight_decay=WD, clip=0.0, b1=BETAS[0], b2=BETAS[1], eps=EPS
    )


@pytest.fixture(scope="module")
def step_fn():
    """One compiled AdamW step, shared by the tests (compiling is what takes time here).

    It skips non-finite updates, which changes nothing for finite ones: the tests that use it
    for other maths also check the skipping logic is a no-op then.
    """
    return jax.jit(make_train_step(GPT2(TINY), adamw(), skip_nonfinite=True))


def assert_trees_close(ours, theirs, rtol, atol_scale=1e-6, what=""):
    """Every element within ``rtol`` relative + ``atol_scale`` of the tensor's largest value."""
    for path, a in mapping.flatten(ours).items():
        b = np.asarray(mapping.flatten(theirs)[path])
        atol = atol_scale * max(np.abs(b).max(), 1e-12)
        np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=atol, err_msg=f"{what}{path}")


def assert_adam_params_close(ours, theirs, lr: float, steps: int, rel: float, what=""):
    """Parameters after ``steps`` Adam updates of rate ``lr`` that should be the same.

    Each tensor agrees within ``rel`` relative (Frobenius norm) and each element within
    ``5e-3 x lr`` per update. Elementwise *relative* agreement is ill-posed: where a gradient
    is near Adam's eps = 1e-8 (say into a GELU unit that never fires), m / (sqrt(v) + eps)
    turns tiny, summation-order-sized differences of that gradient into update differences of
    ~1e-3 x lr. The key bias, c_attn/b[:, C:2C], is the extreme case: it cannot change any
    output (softmax ignores a shift shared by all keys), so its gradient is pure float noise and
    its elements may differ by up to lr per update; it is checked only against that bound.
    """
    C = TINY.n_embd
    ours = {k: np.array(v) for k, v in mapping.flatten(ours).items()}
    theirs = {k: np.asarray(v) for k, v in mapping.flatten(theirs).items()}
    key_bias = (slice(None), slice(C, 2 * C))
    a, b = ours["h/attn/c_attn/b"], theirs["h/attn/c_attn/b"]
    assert np.abs(a[key_bias] - b[key_bias]).max() <= steps * lr, f"{what}key bias"
    a[key_bias] = b[key_bias]
    for path, a in ours.items():
        b = theirs[path]
        assert np.linalg.norm(a - b) <= rel * np.linalg.norm(b), f"{what}{path}: norm"
        assert np.abs(a - b).max() <= 5e-3 * lr * steps, f"{what}{path}: max"


def torch_grads(model) -> dict:
    """Our params tree holding the .grad of every HF parameter (wte's includes the LM head's)."""
    named = {n.removeprefix("transformer."): p.grad.numpy() for n, p in model.named_parameters()}
    return mapping.from_theirs(named.__getitem__, TINY, "hf")


# -- parity with PyTorch ----------------------------------------------------------------------


def test_loss_and_every_gradient_match_torch():
    torch = pytest.importorskip("torch")
    params = random_params(TINY, seed=3)
    w = windows(0)
    loss_fn = lambda p: token_losses(GPT2(TINY), p, w).mean()  # noqa: E731
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)

    model = hf_model(params, TINY)
    logits = model(torch.from_numpy(w[:, :-1]).long()).logits
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, TINY.n_vocab), torch.from_numpy(w[:, 1:]).long().reshape(-1)
    )
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-6)
    # wte is both the embedding and the tied LM head in both frameworks, so its gradient is
    # the sum of both uses on either side.
    assert_trees_close(grads, torch_grads(model), rtol=2e-4, atol_scale=2e-5)


def torch_params(model) -> dict:
    named = {
        n.removeprefix("transformer."): p.detach().numpy() for n, p in model.named_parameters()
    }
    return mapping.from_theirs(named.__getitem__, TINY, "hf")


def test_adamw_steps_match_torch(step_fn):
    """Three AdamW updates (decay on the same tensors) leave the params torch.optim.AdamW does,
    within 1e-5 relative per tensor (see :func:`assert_adam_params_close` for why per tensor).

    torch's AdamW decays decoupled (``p -= lr * wd * p`` before the Adam update), which is
    algebraically optax's ``adamw``; the bias corrections and eps placement agree too.
    """
    torch = pytest.importorskip("torch")
    params = random_params(TINY, seed=4)
    model = hf_model(params, TINY).train()
    decay = [p for n, p in model.named_parameters() if n.endswith(HF_DECAYED)]
    rest = [p for n, p in model.named_parameters() if not n.endswith(HF_DECAYED)]
    assert len(decay) == 4 * TINY.n_layer
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}],
        lr=LR, betas=BETAS, eps=EPS,
    )  # fmt: skip
    state = TrainState.create(params, adamw(), seed=0)
    for i in range(3):
        w = windows(10 + i)
        state, metrics = step_fn(state, w[None])
        opt.zero_grad()
        logits = model(torch.from_numpy(w[:, :-1]).long()).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, TINY.n_vocab), torch.from_numpy(w[:, 1:]).long().reshape(-1)
        )
        loss.backward()
        opt.step()
        np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
        # measured: <= 4e-6 relative per tensor, <= 1.8e-3 x lr per element
        assert_adam_params_close(state.params, torch_params(model), LR, i + 1, 1e-5, f"{i}: ")
    moved = np.abs(state.params["h"]["mlp"]["c_fc"]["w"] - params["h"]["mlp"]["c_fc"]["w"]).max()
    assert moved > 1e-3  # three updates of lr 1e-3 did move the weights
    assert int(state.step) == 3


# -- accumulation, dropout, non-finite --------------------------------------------------------


def test_accumulating_4_micro_batches_of_2_equals_one_batch_of_8(step_fn):
    params = random_params(TINY, seed=5)
    w = windows(1)
    one, m1 = step_fn(TrainState.create(params, adamw(), 0), w[None])  # (1, 8, T+1)
    four, m4 = step_fn(TrainState.create(params, adamw(), 0), w.reshape(4, 2, -1))
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert_adam_params_close(four.params, one.params, LR, 1, 1e-6)


def test_dropout_is_on_only_with_a_key_and_a_pure_function_of_it():
    """The model side; the step derives keys from (seed, step) and is checked end to end by
    the exact-resume test of a run with dropout (test_finetune.py)."""
    model = GPT2(dataclasses.replace(TINY, dropout=0.3))
    params = random_params(TINY, seed=6, scale=3.0)  # a confident model, so dropout shows
    losses = jax.jit(token_losses, static_argnums=0)
    w = windows(2)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    with_k1 = losses(model, params, w, k1)
    np.testing.assert_array_equal(with_k1, losses(model, params, w, k1))
    plain = losses(GPT2(TINY), params, w)
    assert np.abs(with_k1 - plain).max() > 1e-2
    assert np.abs(with_k1 - losses(model, params, w, k2)).max() > 1e-2
    np.testing.assert_allclose(losses(model, params, w), plain, rtol=1e-6)  # no key: off


def test_bfloat16_compute_keeps_the_loss_in_float32():
    params = random_params(TINY, seed=11)
    w = windows(4)
    fn = jax.jit(lambda p, m: token_losses(m, p, w), static_argnums=1)
    loss32 = fn(params, GPT2(TINY)).mean()
    loss16 = fn(params, GPT2(TINY, dtype=jnp.bfloat16)).mean()
    assert loss16.dtype == jnp.float32 and loss16 != loss32  # computed in bfloat16...
    np.testing.assert_allclose(loss16, loss32, rtol=1e-2)  # ...to bfloat16's precision


def test_nonfinite_update_is_skipped(step_fn):
    tx = adamw()
    params = random_params(TINY, seed=7)
    params["ln_f"]["g"][0] = np.nan
    state = TrainState.create(params, tx, seed=0)
    skipped, m = step_fn(state, windows(3)[None])
    assert not bool(m["finite"]) and np.isnan(float(m["loss"]))
    assert int(skipped.step) == 1  # the step still counts (the data moves on)
    for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(skipped.opt_state[0].count) == 0  # Adam's moments untouched too


@pytest.mark.slow
def test_logged_lr_is_the_one_applied_when_updates_are_skipped():
    """Update 2 of 4 has a NaN loss and is skipped: it applies no lr (logged 0), and the
    optimizer's schedule, which counts applied updates, goes on from where it stopped."""
    from gpt2jax.train.layerwise import Layerwise
    from gpt2jax.train.loss import make_token_losses

    schedule = learning_rate_schedule(1e-3, 0, 10, "linear")  # a different lr every update
    tx = Layerwise(make_optimizer("adamw", schedule, clip=0.0))
    plain = make_token_losses(GPT2(TINY))
    poison = 0  # windows starting with this token have a NaN loss

    def loss_fn(params, w, rng=None, frozen=None):
        return jnp.where(w[0, 0] == poison, jnp.nan, plain(params, w, rng, frozen))

    step = jax.jit(
        make_train_step(GPT2(TINY), tx, loss_fn=loss_fn, schedule=schedule, skip_nonfinite=True)
    )
    state = TrainState.create(random_params(TINY, seed=4), tx, seed=0)
    lrs, finite = [], []
    for i in range(4):
        batch = windows(10 + i) % (TINY.n_vocab - 1) + 1  # no poison...
        batch[0, 0] = poison if i == 1 else batch[0, 0]  # ...except in update 2
        state, m = step(state, batch[None])
        lrs.append(float(m["lr"]))
        finite.append(bool(m["finite"]))
    assert finite == [True, False, True, True]
    applied = [float(schedule(k)) for k in range(3)]
    assert lrs == pytest.approx([applied[0], 0.0, applied[1], applied[2]], rel=1e-6)
    assert int(state.opt_state.count) == 3 and int(state.step) == 4


# -- many devices -----------------------------------------------------------------------------

_PMAP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from conftest import TINY, random_params
    from gpt2jax.model import GPT2
    from gpt2jax.train.optim import learning_rate_schedule, make_optimizer
    from gpt2jax.train.step import AXIS, DataParallel, TrainState, make_eval_step, make_train_step
    from gpt2jax.train.batches import eval_windows
    from gpt2jax.convert import mapping

    assert jax.local_device_count() == 8
    tx = make_optimizer("adamw", learning_rate_schedule(1e-3, 1, 10, "cosine"), clip=0.5)
    model = GPT2(TINY)
    params = random_params(TINY, seed=8)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 97, (8, 17)).astype(np.int32) for _ in range(3)]
    out = {{}}
    for name, devices in (("one", 1), ("eight", 8)):
        dp = DataParallel(jax.local_devices()[:devices])
        step = dp.compile_train_step(make_train_step(model, tx, axis_name=AXIS))
        state = dp.replicate(TrainState.create(params, tx, 0))
        losses = []
        for b in batches:
            state, m = step(state, dp.shard(b))
            losses.append(float(m["loss"]))
        flat = mapping.flatten(state.params)
        for x in flat.values():  # every device holds the same state
            shards = [np.asarray(s.data) for s in x.addressable_shards]
            assert len(shards) == devices and all(np.array_equal(s, shards[0]) for s in shards)
        out[name + "_loss"] = np.array(losses)
        out.update({{f"{{name}}_{{k}}": np.asarray(x) for k, x in flat.items()}})
        ev = dp.compile_eval_step(make_eval_step(model, AXIS))
        w, m = eval_windows(np.arange(50) % 97, 7)
        out[name + "_eval"] = np.array(dp.evaluate(ev, state.params, w, m, per_device=1))
    np.savez({path!r}, **out)
    """
)


def test_pmap_on_8_devices_equals_one_device(tmp_path):
    """The same global batch on 8 fake CPU devices gives the losses and parameters of 1 device
    after 3 AdamW updates, to float32 summation order: losses (and a pmapped evaluation) within
    1e-6 relative, each parameter tensor within 1e-6 relative (see assert_adam_params_close).

    XLA reads the device count when JAX starts, so this runs in a fresh interpreter.
    """
    path = tmp_path / "out.npz"
    script = _PMAP_SCRIPT.format(tests=str(ROOT / "tests"), path=str(path))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = np.load(path)
    np.testing.assert_allclose(r["eight_loss"], r["one_loss"], rtol=1e-6)
    np.testing.assert_allclose(r["eight_eval"], r["one_eval"], rtol=1e-6)
    params, ref = (
        {k: r[f"{run}_{k}"] for k in mapping.our_shapes(TINY)} for run in ("eight", "one")
    )
    assert_adam_params_close(mapping.unflatten(params), mapping.unflatten(ref), 1e-3, 3, 1e-6)


# -- optimizers and schedules -----------------------------------------------------------------


def test_weight_decay_applies_to_the_matmul_weights_only():
    mask = mapping.flatten(decay_mask(random_params(TINY)))
    assert sorted(k for k, v in mask.items() if v) == [
        "h/attn/c_attn/w", "h/attn/c_proj/w", "h/mlp/c_fc/w", "h/mlp/c_proj/w",
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_every_optimizer_decays_only_masked_leaves(name):
    rng = np.random.default_rng(9)
    shapes = {"wte": (5, 3), "wpe": (4, 3), "ln_f/g": (3,), "h/ln_1/b": (2, 3)}
    shapes |= {"h/attn/c_attn/w": (2, 3, 9), "h/attn/c_attn/b": (2, 9), "h/mlp/c_fc/w": (2, 3, 4)}
    params = mapping.unflatten({k: jnp.asarray(rng.standard_normal(v)) for k, v in shapes.items()})
    tx = make_optimizer(name, learning_rate_schedule(0.1, 0, 10, "constant"), weight_decay=0.5)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    moved = {k: bool(jnp.any(v != 0)) for k, v in mapping.flatten(updates).items()}
    decayed = mapping.flatten(decay_mask(params))
    assert moved == decayed, name
    assert all(jnp.isfinite(u).all() for u in jax.tree.leaves(updates))


def test_adafactor_scale_is_the_rms_of_its_relative_steps():
    """Per tensor as Adafactor sees it (each layer of ``h``), floored at 1e-3, size-weighted;
    frozen leaves and layers left out."""
    params = {
        "wte": np.full((5, 4), 2.0, np.float32),  # 20 numbers at RMS 2
        "h": {"w": np.stack([np.full((3, 2), 0.5), np.zeros((3, 2))]).astype(np.float32)},
    }  # layer 0: 6 numbers at RMS 0.5; layer 1: 6 at 0, floored to 1e-3
    expected = np.sqrt((20 * 4.0 + 6 * 0.25 + 6 * 1e-6) / 32)
    assert adafactor_scale(params) == pytest.approx(expected, rel=1e-6)
    assert adafactor_scale(params, frozen=("wte",)) == pytest.approx(
        np.sqrt((0.25 + 1e-6) / 2), rel=1e-6
    )
    only_0 = adafactor_scale(params, frozen=("wte",), trainable_layers=[True, False])
    assert only_0 == pytest.approx(0.5, rel=1e-6)


def test_adafactor_at_lr_over_its_scale_steps_as_far_as_adamw():
    """The rule behind ``--lr`` for Adafactor: its first update at ``lr / adafactor_scale``
    is as large in total (L2 norm) as AdamW's at ``lr``, on tensors of very different RMS."""
    rng = np.random.default_rng(3)
    shapes = {"wte": ((50, 16), 0.1), "wpe": ((8, 16), 0.02), "ln_f": {"g": ((16,), 1.0)}}
    shapes["h"] = {"w": ((2, 16, 48), 0.05), "b": ((2, 48), 0.02)}
    params = jax.tree.map(
        lambda t: jnp.asarray(t[1] * rng.standard_normal(t[0]), jnp.float32),
        shapes, is_leaf=lambda t: isinstance(t, tuple),
    )  # fmt: skip
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    lr = 1e-3

    def first_update(name: str, rate: float) -> float:
        tx = Layerwise(make_optimizer(name, lambda _: rate, weight_decay=0.0, clip=0.0))
        new, _ = tx.apply(grads, tx.init(params), params)
        return float(optax.tree.norm(jax.tree.map(jnp.subtract, new, params)))

    adamw = first_update("adamw", lr)
    numbers = sum(p.size for p in jax.tree.leaves(params))
    assert adamw == pytest.approx(lr * np.sqrt(numbers), rel=1e-4)  # lr * sign(g) everywhere
    scaled = first_update("adafactor", lr / adafactor_scale(params))
    assert 0.95 * adamw <= scaled <= 1.001 * adamw, (scaled, adamw)  # measured: 1.000005
    assert first_update("adafactor", lr) < 0.2 * adamw  # unscaled: 0.11 of AdamW's


def test_clipping_scales_the_gradient_to_the_global_norm():
    params = {"a": jnp.ones(3), "b": {"w": jnp.ones((2, 2))}}
    grads = {"a": jnp.full(3, 3.0), "b": {"w": jnp.full((2, 2), 4.0)}}  # norm sqrt(27 + 64)
    tx = make_optimizer("sgd", learning_rate_schedule(1.0, 0, 10, "constant"), weight_decay=0,
                        clip=1.0)  # fmt: skip
    updates, _ = tx.update(grads, tx.init(params), params)
    scale = 1.0 / np.sqrt(91.0)
    np.testing.assert_allclose(updates["a"], -3.0 * scale * np.ones(3), rtol=1e-6)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-6)


def test_schedules():
    lrs = lambda kind, steps: [float(learning_rate_schedule(1.0, 4, 14, kind)(s)) for s in steps]  # noqa: E731
    # Linear warmup reaches the peak on the warmup's last update.
    assert lrs("constant", [0, 1, 3, 4, 13]) == pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0])
    assert lrs("cosine", [3, 4, 9, 14]) == pytest.approx([1.0, 1.0, 0.5, 0.0], abs=1e-6)
    assert lrs("linear", [4, 9, 11, 14]) == pytest.approx([1.0, 0.5, 0.3, 0.0], abs=1e-6)
    with pytest.raises(Exception, match="unknown schedule"):
        learning_rate_schedule(1.0, 0, 10, "exp")


def test_train_state_round_trips_through_json_meta():
    state = TrainState.create(random_params(TINY), adamw(), seed=5)
    rng = json.loads(json.dumps(np.asarray(state.rng).tolist()))
    np.testing.assert_array_equal(jnp.asarray(rng, jnp.uint32), state.rng)
