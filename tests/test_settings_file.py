"""``gpt2jax finetune --config FILE``: TOML, JSON and YAML settings files, every flag a key,
flags on the command line winning, and a run's ``run.json`` as a settings file."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import gpt2jax
from conftest import FIXTURES
from gpt2jax.cli import main as cli
from gpt2jax.cli.train import apply_settings
from gpt2jax.config_file import read_settings
from gpt2jax.errors import ConfigError
from gpt2jax.store.runs import read_run
from gpt2jax.train.settings import TrainConfig

TINY_MODEL = str(FIXTURES / "openai_tiny")
TEXT = str(FIXTURES / "english.txt")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2JAX_CACHE", str(tmp_path / "cache"))


def _parse(argv: list[str]):
    return cli.build_parser().parse_args(argv)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


#: A value for every finetune flag (by destination), each different from its default.
EVERY_FLAG = {
    "model": "some/model", "data": ["a.txt", "b.txt"], "out": "runs/x", "resume": "runs/y",
    "init": "124M", "val_data": ["v.txt"], "steps": 7, "schedule_steps": 9, "batch_size": 4,
    "grad_accum": 2, "seq_len": 16, "lr": 0.003, "adafactor_lr": 0.02, "warmup": 2,
    "weight_decay": 0.1, "clip": 0.5, "dropout": 0.1, "seed": 5, "eval_every": 3,
    "eval_batches": 2, "sample_every": 4,
    "sample_length": 5, "sample_prompt": "Hi", "save_every": 6, "keep": 1,
    "val_fraction": 0.1, "column": "body", "field": "content", "schedule": "linear",
    "optimizer": "sgd", "compute_dtype": "bfloat16", "remat": "block",
    "opt_state_dtype": "bfloat16", "param_dtype": "bfloat16", "loss_chunk": 8,
    "parallel": "fsdp", "lora_rank": 4, "lora_alpha": 8.0, "freeze": "embeddings",
    "memory": "8GB", "skip_nonfinite": True, "report_to": ["tensorboard"], "attention": "blockwise",
}  # fmt: skip


def test_every_finetune_flag_is_a_key(tmp_path):
    """A TOML file with every flag (dashes or underscores) sets each of them as the flag would."""
    args = _parse(["finetune", "--config", "x.toml"])
    assert set(args.settings_flags) == set(EVERY_FLAG)  # no flag left out of this test
    lines = [f"{k.replace('_', '-') if i % 2 else k} = {_toml_value(v)}"
             for i, (k, v) in enumerate(EVERY_FLAG.items())]  # fmt: skip
    (tmp_path / "run.toml").write_text("\n".join(lines) + "\n")
    apply_settings(args, read_settings(tmp_path / "run.toml"), "run.toml")
    for name, value in EVERY_FLAG.items():
        assert getattr(args, name) == value, name
    # the same values given as flags parse to the same Namespace entries
    flags = ["finetune", "some/model", "--data", "a.txt", "b.txt", "--report-to", "tensorboard",
             "--remat", "full", "--skip-nonfinite"]  # fmt: skip
    direct = _parse(flags)
    for name in ("model", "data", "report_to", "remat", "skip_nonfinite"):
        assert getattr(direct, name) == EVERY_FLAG[name], name


@pytest.mark.parametrize("ext", ["toml", "json", "yaml"])
def test_formats_and_command_line_wins(tmp_path, ext):
    settings = {"model": "m", "data": "corpus.txt", "steps": 10, "lr": 1, "report-to": "wandb"}
    text = {
        "toml": "\n".join(f"{k} = {_toml_value(v)}" for k, v in settings.items()),
        "json": json.dumps(settings),
        "yaml": "\n".join(f"{k}: {json.dumps(v)}" for k, v in settings.items()),
    }[ext]
    if ext == "yaml":
        pytest.importorskip("yaml")
    path = tmp_path / f"run.{ext}"
    path.write_text(text)
    args = _parse(["finetune", "--config", str(path), "--steps", "3", "--data", "x.txt"])
    apply_settings(args, read_settings(path), str(path))
    assert args.steps == 3 and args.data == ["x.txt"]  # given on the command line
    assert args.model == "m" and args.lr == 1.0 and isinstance(args.lr, float)
    assert args.report_to == ["wandb"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("stepz = 3", "unknown setting 'stepz'"),
        ("steps = 2.5", r"steps \(--steps\) must be an integer, got 2.5"),
        ("steps = true", "must be an integer"),
        ('optimizer = "lion"', "optimizer must be one of adamw, adafactor, sgd"),
        ("data = [1, 2]", "must be a string or a list of strings"),
        ("lr = ", "not valid TOML"),
        ("steps = 3\nsteps = 4", "not valid TOML"),
        ("steps = 3\nsteps_ = 4\n", "unknown setting"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    args = _parse(["finetune", "--config", str(path)])
    with pytest.raises(ConfigError, match=message):
        apply_settings(args, read_settings(path), str(path))


def test_unreadable_or_unknown_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        read_settings(tmp_path / "missing.toml")
    (tmp_path / "x.ini").write_text("[a]\n")
    with pytest.raises(ConfigError, match="must end in .toml, .json, .yaml or .yml"):
        read_settings(tmp_path / "x.ini")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a table"):
        read_settings(tmp_path / "list.json")
    (tmp_path / "twice.json").write_text('{"batch_size": 1, "batch-size": 2}')
    with pytest.raises(ConfigError, match="given twice"):
        read_settings(tmp_path / "twice.json")


@pytest.mark.slow
def test_the_command_runs_from_a_config_and_run_json_repeats_the_run(tmp_path, capsys):
    """``finetune --config run.toml`` trains with the file's settings (a flag overriding one);
    ``--config RUN/run.json --out other`` then repeats that run: the same settings and,
    training being deterministic, bitwise the same weights."""
    (tmp_path / "run.toml").write_text(
        f'model = "{TINY_MODEL}"\ndata = ["{TEXT}"]\nsteps = 50\nbatch-size = 4\n'
        "seq_len = 16\nlr = 0.01\nsample_every = 0\neval_every = 0\nsave_every = 0\n"
        'schedule = "linear"\n'
    )
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main(["finetune", "--config", str(tmp_path / "run.toml"), "--out", str(first),
                     "--steps", "3"]) == 0  # fmt: skip
    _, train = read_run(str(first))
    assert (
        train.schedule.steps,
        train.dataset.batch_size,
        train.dataset.seq_len,
        train.update.lr,
    ) == (3, 4, 16, 0.01)
    assert train.schedule.schedule == "linear" and train.source.model == TINY_MODEL

    assert cli.main(["finetune", "--config", str(first / "run.json"), "--out", str(second)]) == 0
    _, again = read_run(str(second))
    assert again.to_dict() == train.to_dict()
    a, b = gpt2jax.load(first).params, gpt2jax.load(second).params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # a new --steps with a run.json moves the schedule's horizon with it
    args = _parse(["finetune", "--config", str(first / "run.json"), "--steps", "8"])
    extra = apply_settings(args, read_settings(first / "run.json"), "run.json")
    assert args.schedule_steps is None and args.steps == 8
    assert set(extra) == {"approximate"}  # the one setting without a flag
    assert TrainConfig.from_dict({**train.to_dict(), **extra}).plan.approximate == ()
    capsys.readouterr()


def test_config_errors_are_one_line_on_the_command_line(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("batch_size = 'eight'\n")
    code = cli.main(["finetune", "--config", str(tmp_path / "bad.toml"), "--out", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    assert "batch_size (--batch-size) must be an integer" in err[0]
    assert not os.path.exists("x")
