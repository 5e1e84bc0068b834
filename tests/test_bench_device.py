"""``scripts/bench_device.py``: its smoke mode runs end to end on the CPU, and the device table
reads the published peaks right."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "bench_device.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_device", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_peaks_and_flops() -> None:
    bench = _module()
    assert bench.peak_of("NVIDIA H200")[0] == 989.0
    assert bench.peak_of("NVIDIA H100 PCIe")[0] == 756.0
    assert bench.peak_of("NVIDIA H100 80GB HBM3")[2] == 3.35
    assert bench.peak_of("Tesla T4")[:2] == (65.0, 8.1)
    assert bench.peak_of("TPU v5 lite")[0] == 197.0
    assert bench.peak_of("cpu") is None
    config = bench.config_of("124M")
    # nanoGPT's estimate for GPT-2 124M at 1024 tokens: 6 N + 12 L T C with N = 123.65M
    assert abs(bench.flops_per_token(config, 1024) - (6 * 123_653_376 + 12 * 12 * 1024 * 768)) < 1


def test_smoke_mode_prints_the_table(tmp_path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "GPT2JAX_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in table[1:]] == [
        "train tiny 2x32", "generate tiny batch 1", "generate tiny batch 8",
        "tiny --memory 2GB (CLI)",
    ]  # fmt: skip
    results = json.loads(out.read_text())
    assert results["train"]["tiny"]["tokens_per_s"] > 0
    assert results["train"]["tiny"]["mfu"] is None  # no published peak for a CPU
    assert results["generate"]["tiny/8"]["tokens_per_s"] > 0
    assert results["cli"]["rc"] == 0 and results["cli"]["rss"] > 0
    assert results["device"]["compute_dtype"] == "float32"
