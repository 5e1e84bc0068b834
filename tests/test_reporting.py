"""``finetune --report-to tensorboard,wandb``: what reaches TensorBoard (read back with
TensorBoard's own event reader) and W&B (offline mode, its run file read back with W&B's own
record protos) equals ``metrics.jsonl`` and ``samples.txt``."""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct

import pytest

from conftest import FIXTURES
from gpt2jax.cli import main as cli
from gpt2jax.errors import ConfigError
from gpt2jax.train import reporting
from gpt2jax.train.metrics import read_metrics

TINY_MODEL = str(FIXTURES / "openai_tiny")
TEXT = str(FIXTURES / "english.txt")


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def _finetune(out, *flags: str) -> None:
    argv = ["finetune", TINY_MODEL, "--data", TEXT, "--out", str(out), "--steps", "4",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
            "--sample-every", "2", "--sample-length", "4", "--save-every", "2", *flags]  # fmt: skip
    assert cli.main(argv) == 0


def _tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("samples")}
    return scalars, texts, acc


def _expected(run):
    records = read_metrics(str(run / "metrics.jsonl"))
    want: dict[str, dict[int, float]] = {}
    for r in records:
        for key, tag in reporting.SCALARS.items():
            if r.get(key) is not None:
                want.setdefault(tag, {})[r["step"]] = r[key]
    samples = (run / "samples.txt").read_text().split("======== sample at step ")[1:]
    texts = {int(s.split(" ", 1)[0]): s.split("========\n", 1)[1].rstrip("\n") for s in samples}
    return want, texts


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for tag in want:
        assert got[tag].keys() == want[tag].keys(), tag
        for step in want[tag]:
            assert got[tag][step] == pytest.approx(want[tag][step], rel=1e-6), (tag, step)


@pytest.mark.slow
def test_tensorboard_events_read_back_equal_the_run_log(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    _finetune(run, "--report-to", "tensorboard")
    scalars, texts, acc = _tensorboard(run)
    want, want_texts = _expected(run)
    assert set(want) == set(reporting.SCALARS.values())  # loss, lr, grad norm, tok/s, val
    _close(scalars, want)
    assert texts == want_texts and set(texts) == {2, 4}
    assert acc.SummaryMetadata("samples").plugin_data.plugin_name == "text"


@pytest.mark.slow
def test_tensorboard_after_a_resume_has_each_step_once(tmp_path):
    """A run resumed from step 2 redoes steps 3-4: TensorBoard shows the redone values once,
    as metrics.jsonl does, not the first attempt's."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    _finetune(run, "--report-to", "tensorboard")
    shutil.rmtree(run / "checkpoints" / "4")
    assert cli.main(["finetune", "--resume", str(run), "--eval-every", "3"]) == 0
    scalars, _, acc = _tensorboard(run)
    want, _ = _expected(run)
    assert sorted(want["val/loss"]) == [2, 3, 4]  # 3: only the redo evaluated there
    _close(scalars, want)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]  # once each
    assert len(glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))) == 2


def _wandb_records(path: str):
    """Records of a W&B run file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    chunks (7-byte header: crc, length, type) hold serialized ``Record`` protos."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding to the end of the block
            pos += 32768 - pos % 32768 if pos % 32768 else 0
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


@pytest.mark.slow
def test_wandb_offline_run_holds_the_run_log(tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    _finetune(run, "--report-to", "wandb", "--lr", "0.002")
    (run_file,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    history: dict[str, dict[int, object]] = {}
    config = {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                     for i in record.history.item}  # fmt: skip
            for key, value in items.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[items["_step"]] = value
        elif kind == "run":  # the run's start: its config (every setting)
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    want, want_texts = _expected(run)
    texts = history.pop(reporting.SAMPLE_TAG)
    _close(history, want)
    assert texts == want_texts
    assert config["lr"] == 0.002 and config["steps"] == 4
    assert (run / "wandb" / "run_id").read_text().strip() in run_file


def test_a_missing_package_is_a_one_line_error_before_training(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    with pytest.raises(ConfigError, match=r'pip install "gpt2jax\[wandb\]"'):
        reporting.check_available(["wandb"])
    argv = ["finetune", TINY_MODEL, "--data", TEXT, "--out", str(tmp_path / "r"),
            "--report-to", "wandb"]  # fmt: skip
    assert cli.main(argv) == 1
    assert "needs the wandb package" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")
    assert cli.main([*argv[:-1], "mlflow"]) == 1
    assert "unknown mlflow" in capsys.readouterr().err
