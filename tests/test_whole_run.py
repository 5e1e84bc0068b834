"""The memory a user's whole ``finetune --memory`` run takes, measured on the command itself.

A subprocess runs ``gpt2jax finetune --memory ...`` (start-up, planning, steps, the end-of-run
validation, sample and checkpoint) and its peak resident memory is read from the kernel
(``os.wait4``); the plan printed before training must predict it within 15%. The model is big
enough (67M parameters, AdamW: 1.1 GB of state and gradients) that the state, not the Python
runtime, decides the figure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import FIXTURES, TOKENIZER_DIR
from gpt2jax.checkpoint import save_model_dir
from gpt2jax.config import GPT2Config
from gpt2jax.model import init_params

CONFIG = GPT2Config(n_vocab=50257, n_ctx=64, n_embd=768, n_head=12, n_layer=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    save_model_dir(path, CONFIG, init_params(CONFIG, 0), tokenizer_dir=TOKENIZER_DIR)
    return str(path)


def run_measured(args: list[str], tmp_path) -> tuple[int, str, int]:
    """``(exit code, output, peak RSS bytes)`` of ``gpt2jax ARGS`` in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpt2jax.cli", *args], stdout=f, stderr=f, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage, not all children's
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, log.read_text(), usage.ru_maxrss * 1024


def test_whole_run_peak_is_within_15_percent_of_the_plan(tmp_path, model_dir):
    text = tmp_path / "train.txt"
    text.write_text((FIXTURES / "english.txt").read_text(encoding="utf-8") * 4, encoding="utf-8")
    args = [
        "finetune", model_dir, "--data", str(text), "--out", str(tmp_path / "run"),
        "--memory", "8GB", "--batch-size", "2", "--seq-len", "64", "--steps", "2",
        "--eval-every", "0", "--sample-every", "2", "--sample-length", "8",
        "--optimizer", "adamw", "--remat", "none", "--loss-chunk", "0", "--grad-accum", "1",
    ]  # fmt: skip
    code, log, peak = run_measured(args, tmp_path)
    assert code == 0, log
    m = re.search(r"whole run ([0-9.]+) GB", log)
    assert m, log
    planned = float(m.group(1)) * 1e9
    assert abs(peak - planned) <= 0.15 * peak, (peak / 1e9, planned / 1e9, log)
