"""The memory a user's whole ``finetune --memory`` run takes, measured on the command itself.

A subprocess runs ``gpt2jax finetune --memory ...`` (start-up, planning, steps, the end-of-run
validation, sample and checkpoint) and its peak resident memory is read by ``/usr/bin/time``;
the measured peak must be within 15% of the whole-run figure the plan printed before training.

The run is the kind ``--memory`` picks for the big models, Adafactor (the planner's
substitution) with the step the largest phase: 67M parameters (1 GB of state, gradients and
activations at 8 x 64 tokens), so that the state, not the Python runtime, decides the figure.
Where a checkpoint save is the largest phase instead (AdamW, a small batch), the figure rests
on the save's cost, which the plan counts as the state again (measured 0.9x at this size,
``scripts/bench_save.py``, BENCHMARKS.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import FIXTURES, TOKENIZER_DIR
from gpt2jax.config import GPT2Config
from gpt2jax.host_malloc import HUGE_PAGES_NOTE, host_environment, huge_pages_on
from gpt2jax.model import init_params
from gpt2jax.store.model_dir import save_model_dir

TIME = "/usr/bin/time"  # GNU time: %M is the peak resident set size in KiB
CONFIG = GPT2Config(n_vocab=50257, n_ctx=64, n_embd=768, n_head=12, n_layer=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    save_model_dir(path, CONFIG, init_params(CONFIG, 0), tokenizer_dir=TOKENIZER_DIR)
    return str(path)


def run_measured(args: list[str], tmp_path) -> tuple[int, str, int]:
    """``(exit code, output, peak RSS bytes)`` of ``gpt2jax ARGS`` in a fresh process, measured
    by ``/usr/bin/time`` (a small parent: a child forked from pytest itself would start with
    pytest's resident memory on its record)."""
    if not os.path.exists(TIME):
        pytest.skip(f"{TIME} is not installed")
    env = {  # one device, and compiling as a user's first run does (no shared compile cache)
        k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")
    }
    log, peak = tmp_path / "log.txt", tmp_path / "peak.txt"
    with open(log, "w") as f:
        cmd = [TIME, "-f", "%M", "-o", str(peak), sys.executable, "-m", "gpt2jax.cli.main", *args]
        code = subprocess.run(cmd, stdout=f, stderr=f, env=env, timeout=900).returncode
    return code, log.read_text(), int(peak.read_text().split()[-1]) * 1024


def test_whole_run_peak_is_within_15_percent_of_the_plan(tmp_path, model_dir):
    text = tmp_path / "train.txt"
    text.write_text((FIXTURES / "english.txt").read_text(encoding="utf-8") * 4, encoding="utf-8")
    args = [
        "finetune", model_dir, "--data", str(text), "--out", str(tmp_path / "run"),
        "--memory", "8GB", "--batch-size", "8", "--seq-len", "64", "--steps", "2",
        "--eval-every", "0", "--sample-every", "2", "--sample-length", "8",
        "--optimizer", "adafactor", "--remat", "none", "--loss-chunk", "0", "--grad-accum", "1",
    ]  # fmt: skip
    code, log, peak = run_measured(args, tmp_path)
    assert code == 0, log
    # The command restarted itself with transparent huge pages where this host takes them, and
    # the figure is measured with them (gpt2jax.host_malloc).
    huge = HUGE_PAGES_NOTE in log
    assert huge == (host_environment() is not None or huge_pages_on()), log
    m = re.search(r"whole run ([0-9.]+) GB", log)
    assert m, log
    planned = float(m.group(1)) * 1e9
    print(f"measured peak {peak / 1e9:.3f} GB, planned {planned / 1e9:.3f} GB")
    # Within 15% either way.
    assert abs(peak / planned - 1) <= 0.15, (peak / 1e9, planned / 1e9, log)
