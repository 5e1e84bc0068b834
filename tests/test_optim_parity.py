"""Our optimizers against code we did not write, and what a tiny learning rate does to a model.

Parity: each optimizer exactly as ``finetune`` builds it (:func:`gpt2jax.train.memory.build.build`,
so through :class:`gpt2jax.train.layerwise.Layerwise`) runs 20 steps of fixed random gradients
under a warmup + cosine schedule beside ``torch.optim.AdamW``, ``torch.optim.SGD`` and
``transformers.optimization.Adafactor``, which see every layer's matrices as separate
parameters and decay the ``w`` leaves only. Real GPT-2 widths, so Adafactor's factored
statistics run on 768 x 2304, 768 x 768, 768 x 3072 and 3072 x 768 matrices. Ours runs in
float32, theirs in float64: the exact algorithm, since torch's float32 ``norm`` of a matrix this
size (Adafactor's RMS) is itself less accurate than the tolerance.

The CLI check is issue #11: ``--lr 1e-6`` must leave a pretrained model almost where it was,
with the default weight decay, whichever optimizer (optax's Adafactor decay shrank every block
matrix by 1% a step whatever the learning rate).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import gpt2jax
from conftest import FIXTURES, random_params
from gpt2jax.cli import main as cli
from gpt2jax.config import GPT2Config
from gpt2jax.convert import mapping
from gpt2jax.train.memory.build import build
from gpt2jax.train.optim import OPTIMIZERS, SGD_MOMENTUM, learning_rate_schedule
from gpt2jax.train.settings import MemorySettings

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WIDE = GPT2Config(n_vocab=500, n_ctx=64, n_embd=768, n_head=12, n_layer=2)
STEPS = 20
WEIGHT_DECAY = 0.1
TOLERANCE = 1e-5  # |ours - theirs| / |theirs - start| per matrix, ours in float32
# Large rates: each leaf moves far more than float32's rounding of its values (1.0 for the
# LayerNorm gains), which sets the floor of the error. Adafactor's is relative to RMS(p).
PEAK_LR = {"adamw": 3e-2, "sgd": 1e-1, "adafactor": 1e-2}


def torch_optimizer(name: str, groups: list[dict]):
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=SGD_MOMENTUM)
    return transformers.optimization.Adafactor(
        groups, lr=0.0, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
        scale_parameter=True, relative_step=False, warmup_init=False,
    )  # fmt: skip


def per_matrix(flat: dict) -> dict:
    """``name -> array`` with each stacked ``h/...`` leaf split into its layers (``h.0/...``),
    the tensors a PyTorch GPT-2 holds."""
    out = {}
    for name, x in flat.items():
        if name.startswith("h/"):
            out |= {f"h.{i}/{name[2:]}": np.asarray(x[i]) for i in range(x.shape[0])}
        else:
            out[name] = np.asarray(x)
    return out


def gradients(shapes: dict, seed: int = 7):
    """``step -> {name: gradient}``: a fixed direction plus fresh noise every step (float32).

    The fixed part makes the parameters drift, so their change over the run stands well clear of
    float32's rounding of the parameters themselves (the error's floor). The noise is a window
    into one random pool, shifted every step: cheaper than drawing millions of numbers a step.
    """
    rng = np.random.default_rng(seed)
    sizes = [int(np.prod(s)) for s in shapes.values()]
    total, shift = sum(sizes), 1009
    drift = rng.standard_normal(total, dtype=np.float32)
    pool = rng.standard_normal(total + STEPS * shift, dtype=np.float32)
    ends = np.cumsum(sizes)

    def at(step: int) -> dict:
        flat = 0.01 * (drift + pool[step * shift : step * shift + total])  # (total,)
        return {
            k: flat[end - size : end].reshape(shape)
            for (k, shape), size, end in zip(shapes.items(), sizes, ends, strict=True)
        }

    return at


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_matches_torch_through_layerwise(name):
    schedule = learning_rate_schedule(PEAK_LR[name], 5, STEPS, "cosine")
    lrs = [float(schedule(s)) for s in range(STEPS)]  # schedule(s): the rate of update s + 1
    assert len(set(lrs)) == STEPS - 1  # warmup, then cosine decay from the peak's second step

    params = jax.tree.map(jax.numpy.asarray, random_params(WIDE, seed=1))
    tx = build(WIDE, MemorySettings(optimizer=name), schedule, weight_decay=WEIGHT_DECAY,
               clip=0.0).tx  # fmt: skip
    state = tx.init(params)
    apply = jax.jit(tx.apply)

    start = per_matrix(mapping.flatten(params))
    theirs = {
        k: torch.nn.Parameter(torch.from_numpy(v.astype(np.float64))) for k, v in start.items()
    }
    decayed = [p for k, p in theirs.items() if k.endswith("/w")]
    plain = [p for k, p in theirs.items() if not k.endswith("/w")]
    assert len(decayed) == 4 * WIDE.n_layer
    opt = torch_optimizer(
        name,
        [{"params": decayed, "weight_decay": WEIGHT_DECAY}, {"params": plain, "weight_decay": 0.0}],
    )

    grads = gradients(mapping.our_shapes(WIDE))
    for step, lr in enumerate(lrs):
        flat_grads = grads(step)
        params, state = apply(mapping.unflatten(flat_grads), state, params)
        for k, g in per_matrix(flat_grads).items():
            theirs[k].grad = torch.from_numpy(g.astype(np.float64))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()

    ours = per_matrix(mapping.flatten(jax.tree.map(np.asarray, params)))
    errors = {}
    for k, p in theirs.items():
        want = p.detach().numpy()
        moved = np.linalg.norm(want - start[k])
        assert moved > 0, k
        errors[k] = np.linalg.norm(ours[k] - want) / moved
    worst = max(errors, key=errors.get)
    print(f"{name}: worst relative error {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= TOLERANCE, (worst, errors[worst])


# -- the CLI at a tiny learning rate ----------------------------------------------------------

TINY_MODEL = FIXTURES / "openai_tiny"  # n_vocab 50257, n_ctx 29, n_embd 12, 2 layers


def block_matrices(params) -> dict:
    """``h.i/.../w -> (in, out)`` matrices of every layer."""
    flat = per_matrix(mapping.flatten(jax.tree.map(np.asarray, params)))
    return {k: v for k, v in flat.items() if k.startswith("h.") and k.endswith("/w")}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tiny_learning_rate_barely_moves_the_pretrained_weights(name, tmp_path, monkeypatch):
    """``gpt2jax finetune MODEL --optimizer X --lr 1e-6 --steps 40`` with the default weight
    decay: every block matrix within 1% (relative Frobenius norm) of where it started."""
    monkeypatch.setenv("GPT2JAX_CACHE", str(tmp_path / "cache"))  # token cache: not the user's
    run = tmp_path / "run"
    args = ["finetune", str(TINY_MODEL), "--data", str(FIXTURES / "english.txt"), "--out", str(run),
            "--optimizer", name, "--lr", "1e-6", "--steps", "40", "--batch-size", "2",
            "--seq-len", "16", "--val-fraction", "0", "--eval-every", "0",
            "--sample-every", "0", "--save-every", "40"]  # fmt: skip
    assert cli.main(args) == 0
    before = block_matrices(gpt2jax.load(TINY_MODEL).params)
    after = block_matrices(gpt2jax.load(run).params)
    assert before.keys() == after.keys() and len(before) == 8
    change = {k: np.linalg.norm(after[k] - before[k]) / np.linalg.norm(before[k]) for k in before}
    worst = max(change, key=change.get)
    print(f"{name}: largest relative change {change[worst]:.2e} ({worst})")
    assert change[worst] <= 0.01, (worst, change[worst])
