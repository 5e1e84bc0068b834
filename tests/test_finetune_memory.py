"""Fine-tuning runs with the memory options: LoRA, freezing, remat/Adafactor/chunked loss and
``--memory`` planning, end to end on the tiny test checkpoint."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import gpt2jax
from conftest import FIXTURES
from gpt2jax.cli import main as cli
from gpt2jax.convert import mapping
from gpt2jax.lora import TARGETS
from gpt2jax.train.loop import finetune
from gpt2jax.train.optim import adafactor_scale
from gpt2jax.train.settings import TrainConfig

TINY_MODEL = str(FIXTURES / "openai_tiny")  # n_vocab 50257, n_ctx 29, n_embd 12, 2 layers
ENGLISH = (FIXTURES / "english.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(ENGLISH, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """XLA's persistent cache, so that runs of the same settings compile once (as in
    test_finetune.py; a cached program is the same program)."""
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-cache")))
    yield
    jax.config.update("jax_compilation_cache_dir", old)


@pytest.fixture(scope="module")
def base():
    return mapping.flatten(jax.tree.map(np.asarray, gpt2jax.load(TINY_MODEL).params))


def config(text, **kw) -> TrainConfig:
    settings = dict(
        model=TINY_MODEL, data=[text], steps=6, batch_size=4, seq_len=16, lr=3e-2,
        schedule="constant", eval_every=0, sample_every=0, save_every=3, keep=3,
    )  # fmt: skip
    return TrainConfig(**{**settings, **kw})


def changed(run_dir, base) -> set[str]:
    params = mapping.flatten(jax.tree.map(np.asarray, gpt2jax.load(run_dir).params))
    assert params.keys() == base.keys()
    return {k for k in params if not np.array_equal(params[k], base[k])}


@pytest.mark.slow
def test_lora_run_trains_only_the_adapted_weights_and_resumes_exactly(tmp_path, text, base):
    """A LoRA run loads (and exports) as its merged model: exactly the adapted projection
    weights differ from the base. 3 + resume + 3 steps == 6 steps, bitwise."""
    straight = finetune(tmp_path / "a", config(text, lora_rank=2, lora_alpha=4.0))
    assert np.isfinite(straight.loss)
    adapted = {f"h/{block}/{proj}/w" for block, proj in TARGETS}
    assert changed(tmp_path / "a", base) == adapted
    finetune(tmp_path / "b", config(text, lora_rank=2, lora_alpha=4.0, steps=3))
    finetune(tmp_path / "b", resume=True, overrides={"steps": 6})
    a = mapping.flatten(jax.tree.map(np.asarray, gpt2jax.load(tmp_path / "a").params))
    b = mapping.flatten(jax.tree.map(np.asarray, gpt2jax.load(tmp_path / "b").params))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_freezing_embeddings_keeps_them(tmp_path, text, base):
    finetune(tmp_path / "run", config(text, freeze="embeddings", steps=2, save_every=2))
    moved = changed(tmp_path / "run", base)
    assert "wte" not in moved and "wpe" not in moved
    assert "h/mlp/c_fc/w" in moved and "ln_f/g" in moved


@pytest.mark.slow
def test_lean_settings_learn(tmp_path, text):
    """Remat, Adafactor, bfloat16 compute, chunked loss and accumulation together."""
    train = config(
        text, steps=8, remat="block", optimizer="adafactor", compute_dtype="bfloat16",
        loss_chunk=5, grad_accum=2, save_every=8,
    )  # fmt: skip
    finetune(tmp_path / "run", train)
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, records) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]


@pytest.mark.slow  # three short runs: ~70 s on 2 shared cores
def test_adafactor_runs_at_lr_over_the_weights_rms_recorded_for_resume(tmp_path, text):
    """``--lr`` is AdamW's: Adafactor's own peak rate is ``--lr / adafactor_scale`` of the
    starting weights, applied (the logged lr), recorded in run.json and kept by a resume;
    ``--adafactor-lr`` sets it directly."""
    lr = 3e-2
    finetune(tmp_path / "a", config(text, optimizer="adafactor", steps=2, save_every=2))
    expected = lr / adafactor_scale(gpt2jax.load(TINY_MODEL).params)
    assert expected > 2 * lr  # the tiny model's weights: RMS 0.3

    def recorded(run) -> tuple[float, list[float]]:
        train = json.loads((run / "run.json").read_text())["train"]
        assert train["lr"] == lr
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return train["adafactor_lr"], [r["lr"] for r in map(json.loads, lines) if "loss" in r]

    own, logged = recorded(tmp_path / "a")
    assert own == pytest.approx(expected, rel=1e-6)
    assert logged == pytest.approx([expected] * 2, rel=1e-6)  # constant schedule
    finetune(tmp_path / "a", resume=True, overrides={"steps": 3})
    assert recorded(tmp_path / "a")[1] == pytest.approx([expected] * 3, rel=1e-6)
    train = config(text, optimizer="adafactor", adafactor_lr=1e-3, steps=1, save_every=1)
    finetune(tmp_path / "b", train)
    assert recorded(tmp_path / "b") == (1e-3, [pytest.approx(1e-3)])


@pytest.mark.slow
def test_memory_flag_plans_and_records_the_settings(tmp_path, text, capsys):
    # On the CPU the budget covers the whole (pytest) process: a generous one.
    args = [
        "finetune", TINY_MODEL, "--data", text, "--out", str(tmp_path / "run"), "--steps", "1",
        "--seq-len", "16", "--batch-size", "2", "--memory", "64GB", "--eval-every", "0",
        "--sample-every", "0", "--optimizer", "sgd", "--remat", "none", "--grad-accum", "1",
    ]  # fmt: skip
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "chosen: --remat none --optimizer sgd" in err
    train = json.loads((tmp_path / "run" / "run.json").read_text())["train"]
    assert train["memory"] == "64GB" and train["optimizer"] == "sgd"
    assert train["remat"] == "none" and train["opt_state_dtype"] == "float32"


def test_bad_memory_settings_are_one_line_errors(tmp_path, text, capsys):
    base = ["finetune", TINY_MODEL, "--data", text, "--out", str(tmp_path / "run")]
    for flags, message in [
        (["--freeze", "top:9"], "--freeze top:N"),
        (["--lora-rank", "2", "--freeze", "embeddings"], "exclude each other"),
        (["--optimizer", "adafactor", "--opt-state-dtype", "bfloat16"], "adafactor"),
        (["--adafactor-lr", "1e-3"], "--adafactor-lr applies to --optimizer adafactor"),
        (["--memory", "10MB"], "no configuration fits"),
    ]:
        assert cli.main(base + flags) == 1
        assert message in capsys.readouterr().err
