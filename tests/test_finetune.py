"""Fine-tuning runs end to end: exact resume, learning, run directories, bad input, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import gpt2jax
from conftest import FIXTURES
from gpt2jax.cli import main as cli
from gpt2jax.errors import Gpt2JaxError
from gpt2jax.store.runs import read_run, restore_params
from gpt2jax.train.evaluate import evaluate
from gpt2jax.train.loop import NonFiniteLossError, finetune
from gpt2jax.train.metrics import read_metrics
from gpt2jax.train.settings import TrainConfig

TINY_MODEL = str(FIXTURES / "openai_tiny")  # n_vocab 50257, n_ctx 29, n_embd 12, 2 layers
ENGLISH = (FIXTURES / "english.txt").read_text(encoding="utf-8")
SPLIT = ENGLISH.index("The Weaver and the Wool")  # train on the first story, validate on the second


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "train.txt").write_text(ENGLISH[:SPLIT], encoding="utf-8")
    (d / "val.txt").write_text(ENGLISH[SPLIT:], encoding="utf-8")
    return d


@pytest.fixture(scope="module", autouse=True)
def _caches(tmp_path_factory):
    """Tokens and compiled programs cached in a temporary directory.

    Every run here compiles the same step; XLA's persistent cache makes that happen once, in
    this process and in the CLI subprocesses alike. A cached program is the same program, so
    results are unchanged.
    """
    root = tmp_path_factory.mktemp("gpt2jax-cache")
    old_env = os.environ.get("GPT2JAX_CACHE")
    old_dir = jax.config.jax_compilation_cache_dir
    os.environ["GPT2JAX_CACHE"] = str(root)
    jax.config.update("jax_compilation_cache_dir", str(root / "jax"))
    yield
    jax.config.update("jax_compilation_cache_dir", old_dir)
    if old_env is None:
        os.environ.pop("GPT2JAX_CACHE")
    else:
        os.environ["GPT2JAX_CACHE"] = old_env


def config(texts, **kw) -> TrainConfig:
    """A run that learns within seconds: 24 updates of 8 windows of 24 tokens."""
    base = dict(
        model=TINY_MODEL, data=[str(texts / "train.txt")], val_data=[str(texts / "val.txt")],
        steps=24, batch_size=8, grad_accum=2, seq_len=24, lr=1e-2, warmup=3,
        schedule="constant", dropout=0.05, seed=3, eval_every=12, sample_every=12,
        sample_length=8, save_every=6, keep=2,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def params_of(run_dir) -> dict:
    return jax.tree.map(np.asarray, gpt2jax.load(run_dir).params)


def assert_bitwise_equal(a, b):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def straight(texts, tmp_path_factory):
    """The reference: 24 updates in one go."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    result = finetune(out, config(texts), show_progress=False)
    return out, result


# -- exactness and learning -------------------------------------------------------------------


def test_resumed_run_is_bitwise_the_straight_run(straight, texts, tmp_path):
    """12 updates, a new process's worth of state from the checkpoint, 12 more == 24 straight
    (with dropout and gradient accumulation on, float32, CPU). The constant schedule makes
    `--steps 12` then `--resume --steps 24` the same run as `--steps 24`."""
    ref_dir, ref = straight
    out = tmp_path / "split"
    first = finetune(out, config(texts, steps=12), show_progress=False)
    assert first.step == 12
    second = finetune(out, resume=True, overrides={"steps": 24}, show_progress=False)
    assert second.step == 24 and second.loss == ref.loss
    assert_bitwise_equal(params_of(out), params_of(ref_dir))
    losses = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}
    ref_losses = {
        r["step"]: r["loss"] for r in read_metrics(ref_dir / "metrics.jsonl") if "loss" in r
    }
    assert losses == ref_losses and sorted(losses) == list(range(1, 25))
    # --keep 2: only the two newest checkpoints remain
    assert sorted(os.listdir(out / "checkpoints")) == ["18", "24"]


def test_fine_tuning_lowers_held_out_loss(straight, texts):
    run_dir, result = straight
    before = evaluate(TINY_MODEL, [str(texts / "val.txt")], seq_len=24, show_progress=False)
    after = evaluate(run_dir, [str(texts / "val.txt")], seq_len=24, show_progress=False)
    assert after["tokens"] == before["tokens"] > 300
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert after["perplexity"] == pytest.approx(np.exp(after["loss"]))
    # the run's own validation (every 12 updates and at the end) went down too
    vals = [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < before["loss"] - 1.0
    assert result.val_loss == pytest.approx(vals[-1])


def test_run_directory_is_a_model(straight, capsys):
    run_dir, _ = straight
    model = gpt2jax.load(run_dir)
    assert model.kind == "run" and model.source["step"] == 24
    assert model.config.n_embd == 12
    ids = model.encode("The miller")
    assert model.logits(ids).shape == (len(ids), 50257)
    for name in ("run.json", "metrics.jsonl", "samples.txt", "encoder.json", "vocab.bpe"):
        assert (run_dir / name).exists(), name
    run = json.loads((run_dir / "run.json").read_text())
    assert run["train"]["seq_len"] == 24 and run["train"]["model"] == TINY_MODEL
    assert (run_dir / "samples.txt").read_text().count("======== sample at step") == 2
    if pytest.importorskip("matplotlib"):
        assert (run_dir / "loss.png").stat().st_size > 1000


def test_eval_command(straight, texts, capsys):
    run_dir, _ = straight
    assert cli.main(["eval", str(run_dir), "--data", str(texts / "val.txt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] > 300 and out["perplexity"] == pytest.approx(np.exp(out["loss"]))


# -- the lr schedule on resume ----------------------------------------------------------------


@pytest.mark.slow
def test_resume_with_more_steps_keeps_the_schedule_horizon(texts, tmp_path, capsys):
    """6 cosine updates, then `--resume --steps 10`: the lr stays at the schedule's end (0)
    instead of climbing back up a cosine re-stretched over 10; `--schedule-steps 10` stretches
    it on purpose; a run.json from before schedule_steps keeps its recorded horizon too."""
    import shutil

    from gpt2jax.train.optim import learning_rate_schedule

    lr = 1e-2
    cfg = config(texts, steps=6, schedule="cosine", warmup=0, lr=lr, batch_size=2, grad_accum=1,
                 dropout=0.0, eval_every=0, sample_every=0, save_every=6)  # fmt: skip
    first = tmp_path / "first"
    finetune(first, cfg, show_progress=False)
    assert read_run(str(first))[1].schedule.schedule_steps == 6  # a new run records its horizon
    assert read_run(str(first))[1].memory_settings.remat == "dots"  # what "auto" became here
    stretched, old = tmp_path / "stretched", tmp_path / "old"
    shutil.copytree(first, stretched)
    shutil.copytree(first, old)
    run_json = old / "run.json"
    meta = json.loads(run_json.read_text())
    del meta["train"]["schedule_steps"]
    run_json.write_text(json.dumps(meta))

    def lrs(run_dir) -> dict[int, float]:
        return {r["step"]: r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}

    def schedule(horizon: int) -> dict[int, float]:
        s = learning_rate_schedule(lr, 0, horizon, "cosine")
        return {step: float(s(step - 1)) for step in range(1, 11)}  # step k applies s(k - 1)

    for run_dir in (first, old):
        assert cli.main(["finetune", "--resume", str(run_dir), "--steps", "10"]) == 0
        assert "the lr is 0 after step 6" in capsys.readouterr().err
        got = lrs(run_dir)
        assert sorted(got) == list(range(1, 11))
        want = [schedule(6)[k] for k in range(1, 7)]
        assert [got[k] for k in range(1, 7)] == pytest.approx(want, rel=1e-5)
        assert [got[k] for k in range(7, 11)] == pytest.approx([0.0] * 4, abs=1e-12)
    assert read_run(str(old))[1].schedule.schedule_steps == 6

    args = ["finetune", "--resume", str(stretched), "--steps", "10", "--schedule-steps", "10"]
    assert cli.main(args) == 0
    assert "the lr is 0" not in capsys.readouterr().err
    got = lrs(stretched)
    # float32 cosines, compiled and not, near the end of the decay: a few ulps apart
    want = [schedule(10)[k] for k in range(7, 11)]
    assert [got[k] for k in range(7, 11)] == pytest.approx(want, rel=1e-5)
    assert min(got[k] for k in range(7, 11)) > 0
    assert read_run(str(stretched))[1].schedule.schedule_steps == 10


# -- non-finite loss --------------------------------------------------------------------------


@pytest.mark.slow
def test_nonfinite_loss_stops_keeps_the_last_good_checkpoint_and_can_skip(texts, tmp_path):
    """SGD at lr 1e30 leaves finite but huge weights after update 1; update 2's loss is NaN."""
    out = tmp_path / "nan"
    cfg = config(texts, optimizer="sgd", lr=1e30, clip=0.0, warmup=0, steps=5, save_every=1,
                 eval_every=0, sample_every=0, dropout=0.0)  # fmt: skip
    with pytest.raises(
        NonFiniteLossError, match=r"step 2: the loss is nan .* last good checkpoint is step 1"
    ):
        finetune(out, cfg, show_progress=False)
    assert os.listdir(out / "checkpoints") == ["1"]
    good = params_of(out)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(good))
    # Resuming with --skip-nonfinite skips every bad update: the params stay those of step 1.
    result = finetune(out, resume=True, overrides={"skip_nonfinite": True}, show_progress=False)
    assert result.step == 5 and result.skipped == 4
    assert_bitwise_equal(params_of(out), good)
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[1]["loss"] is None and records[1]["skipped"]


# -- bad input through the CLI ----------------------------------------------------------------


def run_cli(args, capsys) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_input_is_one_clear_line(texts, tmp_path, capsys):
    base = ["finetune", TINY_MODEL, "--out", str(tmp_path / "r"), "--seq-len", "24"]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    (tmp_path / "no-model").mkdir()
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill a window.")
    data = ["--data", str(short)]
    out = ["--out", str(tmp_path / "r")]
    cases = {
        "no such file": (base + ["--data", str(tmp_path / "nope.txt")], "nope.txt: no such file"),
        "empty": (base + ["--data", str(empty)], "empty.txt: no text"),
        "too short": (
            base + data + ["--val-fraction", "0"],
            "short.txt: 8 training tokens are fewer than one window of seq_len + 1 = 25 tokens; "
            "use --seq-len 7 or less",
        ),
        "seq too long": (base + data + ["--seq-len", "99"], "exceeds the model's context of 29"),
        "batch split": (
            base + data + ["--batch-size", "3", "--grad-accum", "2"],
            "--batch-size 3 must be a positive multiple of",
        ),
        "schedule steps": (
            base + data + ["--schedule-steps", "0"],
            "--schedule-steps must be >= 1",
        ),
        "no model": (["finetune", *data, *out], "either a starting MODEL"),
        "bad model": (
            ["finetune", str(empty.parent / "no-model"), *data, *out],
            "not a model directory",
        ),
        "run inside the model": (["finetune", str(tmp_path), *data, *out], "is inside the input"),
        "resume non-run": (["finetune", "--resume", str(tmp_path)], "not a training run"),
        "resume with data": (["finetune", "--resume", str(tmp_path), *data], "takes its model"),
    }
    for name, (args, message) in cases.items():
        code, line = run_cli(args, capsys)
        assert code == 1, name
        assert line.startswith("gpt2jax finetune: error: ") and message in line, (name, line)
    assert not (tmp_path / "r").exists()  # nothing created by a failed start


def test_existing_run_is_not_overwritten_and_fixed_settings_cannot_change(straight, capsys):
    run_dir, _ = straight
    code, line = run_cli(["finetune", TINY_MODEL, "--data", "x", "--out", str(run_dir)], capsys)
    assert code == 1 and "already holds a run; continue it with --resume" in line
    code, line = run_cli(["finetune", "--resume", str(run_dir), "--lr", "1"], capsys)
    assert code == 1 and "--lr cannot change when resuming" in line
    with pytest.raises(Gpt2JaxError, match="--seq-len cannot change"):
        finetune(run_dir, resume=True, overrides={"seq_len": 8}, show_progress=False)


# -- signals and kills ------------------------------------------------------------------------


def start_cli(texts, out, log) -> subprocess.Popen:
    """``gpt2jax finetune`` with the straight run's settings, in a new process.

    Sampling after every update makes each update slower (without changing the parameters),
    so that a signal surely arrives mid-run; a checkpoint every 2 updates gives a kill more
    chances to land in a save.
    """
    cfg = config(texts, sample_every=1, sample_length=20, save_every=2)
    args = [sys.executable, "-m", "gpt2jax", "finetune", cfg.source.model, "--out", str(out)]
    args += ["--data", *cfg.dataset.data, "--val-data", *cfg.dataset.val_data]
    for name, value in cfg.to_dict().items():
        if name not in ("model", "data", "val_data") and value not in (None, False, "", []):
            args += [f"--{name.replace('_', '-')}", str(value)]
    cache = jax.config.jax_compilation_cache_dir  # see _caches
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def wait_until(proc, ready, log, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            pytest.fail(f"finetune exited early: {open(log).read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("finetune made no progress")


@pytest.mark.slow
def test_sigterm_saves_then_resume_finishes_the_same_run(straight, texts, tmp_path):
    out, log = tmp_path / "term", tmp_path / "term.log"
    proc = start_cli(texts, out, log)
    # Once the first update is logged, the loop (and its signal handlers) is running.
    wait_until(proc, lambda: bool(read_metrics(out / "metrics.jsonl")), log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped = max(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit())
    assert 1 <= stopped < 24
    assert f"SIGTERM at step {stopped}: checkpoint saved; continue with" in err
    assert f"gpt2jax finetune --resume {out}" in err
    result = finetune(out, resume=True, show_progress=False)
    assert result.step == 24
    assert_bitwise_equal(params_of(out), params_of(straight[0]))


@pytest.mark.slow
def test_kill_9_loses_nothing_before_the_last_checkpoint(straight, texts, tmp_path):
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = start_cli(texts, out, log)
    ckpts = out / "checkpoints"
    wait_until(proc, lambda: ckpts.exists() and any(n.isdigit() for n in os.listdir(ckpts)), log)
    time.sleep(np.random.default_rng().uniform(0, 0.5))  # anywhere, perhaps mid-save
    proc.kill()
    proc.wait()
    steps = sorted(int(n) for n in os.listdir(out / "checkpoints") if n.isdigit())
    assert steps
    config, _ = read_run(str(out))
    for step in steps:  # every complete checkpoint restores
        restore_params(str(out), config, step)
    result = finetune(out, resume=True, show_progress=False)
    assert result.step == 24
    assert_bitwise_equal(params_of(out), params_of(straight[0]))
