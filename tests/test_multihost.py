"""Runs over several processes (``jax.distributed`` on 127.0.0.1, gloo, fake CPU devices).

Every multi-process run is ``gpt2jax finetune`` itself, started as a pod starts it: either by
``gpt2jax launch`` or, for the failure tests, as separate processes given JAX's coordinator
variables. Two processes x two CPU devices are compared with one process x four devices over the
same global batches. The optimizer is SGD (momentum 0.9): its update is linear in the gradient,
so parameters agree as closely as the all-reduced gradients do (summed across processes in
another order); Adam's first steps turn such rounding differences of near-zero gradients into
differences of up to the learning rate (seen: 4e-3 after 6 steps), however exact the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import gpt2jax
from conftest import FIXTURES, SHARED
from gpt2jax.cli.launch import free_port
from gpt2jax.cli.main import main
from gpt2jax.train.cluster import LOST_EXIT, StopAgreement
from gpt2jax.train.metrics import read_metrics

TINY_MODEL = str(FIXTURES / "openai_tiny")  # 2 layers of width 12: data parallel
SMALL_MODEL = str(FIXTURES / "small_pretrained")  # 4 layers of width 64: FSDP shards its MLPs
ENGLISH = (FIXTURES / "english.txt").read_text(encoding="utf-8")
SPLIT = ENGLISH.index("The Weaver and the Wool")

#: Data parallel: 8 updates of 8 windows in 2 micro-batches, dropout on, a checkpoint every 2.
DATA = [
    "--steps", "8", "--batch-size", "8", "--grad-accum", "2", "--seq-len", "24",
    "--optimizer", "sgd", "--lr", "1e-2", "--schedule", "constant", "--dropout", "0.1",
    "--seed", "3", "--eval-every", "4", "--sample-every", "4", "--sample-length", "8",
    "--save-every", "2", "--keep", "2",
]  # fmt: skip
#: FSDP: the MLP weights and wte split over the 4 devices.
FSDP = [
    "--parallel", "fsdp", "--batch-size", "8", "--grad-accum", "2", "--seq-len", "16",
    "--optimizer", "sgd", "--lr", "1e-3", "--schedule", "constant", "--eval-every", "2",
    "--sample-every", "2", "--sample-length", "4", "--save-every", "2", "--keep", "3",
]  # fmt: skip
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Texts, and caches (tokens, compiled programs) shared by every run of this module."""
    d = tmp_path_factory.mktemp("multihost")
    (d / "train.txt").write_text(ENGLISH[:SPLIT], encoding="utf-8")
    (d / "val.txt").write_text(ENGLISH[SPLIT:], encoding="utf-8")
    return d


def env(work: Path, **extra: str) -> dict[str, str]:
    e = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "GPT2JAX_CACHE": str(work / "cache"),
        "JAX_COMPILATION_CACHE_DIR": str(work / "cache" / "jax"),
        "TIKTOKEN_CACHE_DIR": str(SHARED / "tiktoken-cache"),
    }
    for name in ("GPT2JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"):
        e.pop(name, None)
    return {**e, **extra}


def data_args(work: Path) -> list[str]:
    return ["--data", str(work / "train.txt"), "--val-data", str(work / "val.txt")]


def gpt2jax_cli(work: Path, args: list[str], devices: int = 4, timeout: int = 1200) -> str:
    """``gpt2jax ARGS`` in one process with ``devices`` CPU devices; its stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2jax", *args], env=env(work, JAX_NUM_CPU_DEVICES=str(devices)),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, readable(proc.stderr)
    return proc.stderr + proc.stdout


def readable(log: str) -> str:
    """The end of a log without JAX's native stack frames and gloo's connection lines."""
    lines = [x for x in log.splitlines() if not x.startswith(("    @", "[Gloo]"))]
    return "\n".join(lines)[-6000:]


def launch(work: Path, args: list[str], timeout: int = 1200) -> str:
    """``gpt2jax launch --processes 2 --cpu-devices 2 -- ARGS``; its output."""
    launch_args = ["launch", "--processes", "2", "--cpu-devices", "2", "--", *args]
    return gpt2jax_cli(work, launch_args, timeout=timeout)


def start_pod(work: Path, args: list[str], logs: Path) -> list[subprocess.Popen]:
    """Two processes started the way a pod starts them: the same command, JAX's variables."""
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(2):
        e = env(
            work, GPT2JAX_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=address,
            JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), JAX_NUM_CPU_DEVICES="2",
        )  # fmt: skip
        log = open(logs / f"p{i}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, "-m", "gpt2jax", *args], env=e, stderr=log))
    return procs


def params_of(run: Path) -> dict:
    """The run's newest parameters, restored in this single process (one CPU device)."""
    return jax.tree.map(np.asarray, gpt2jax.load(str(run)).params)


def max_difference(a: dict, b: dict) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


def assert_close_losses(a: Path, b: Path) -> None:
    for key in ("loss", "val_loss"):
        la, lb = losses(a, key), losses(b, key)
        assert la.keys() == lb.keys() and la
        for step in la:
            assert abs(la[step] - lb[step]) <= TOLERANCE * abs(lb[step]), (key, step)


def assert_only_process_0_wrote(run: Path, reference: Path) -> None:
    """The same files as a one-process run, and every metric line once."""
    assert sorted(os.listdir(run)) == sorted(os.listdir(reference))
    assert sorted(os.listdir(run / "checkpoints")) == sorted(os.listdir(reference / "checkpoints"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((reference / "metrics.jsonl").read_text().splitlines())
    assert len(set(lines)) == len(lines)
    banners = (run / "samples.txt").read_text().count("======== sample at step")
    assert banners == (reference / "samples.txt").read_text().count("======== sample at step")


# -- fast: the launcher's input, the stop agreement on one process ----------------------------


def test_launch_rejects_bad_input(capsys):
    assert main(["launch", "--processes", "0", "--", "finetune"]) == 1
    assert main(["launch", "--processes", "2"]) == 1
    assert main(["launch", "--processes", "2", "--cpu-devices", "0", "finetune"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("gpt2jax launch: error: ") for line in err)
    assert "--processes must be >= 1" in err[0] and "give a gpt2jax command" in err[1]


def test_launch_forwards_signals_and_returns_the_first_failure(tmp_path):
    """SIGTERM to the launcher reaches every process once; its status is theirs."""
    import threading

    from gpt2jax.cli.launch import _wait

    child = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(10 + int(sys.argv[1])))\n"
        "open(sys.argv[2], 'w').close()\n"
        "time.sleep(60)\n"
    )
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-c", child, str(i), str(ready[i])]) for i in range(2)
    ]

    def terminate_when_ready():
        while not all(r.exists() for r in ready):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_ready, daemon=True).start()
    assert _wait(procs) in (10, 11)
    assert sorted(p.returncode for p in procs) == [10, 11]


def test_one_process_stops_where_its_signal_arrived():
    agreement = StopAgreement(steps=10)
    assert agreement.after(3, None) is None
    assert agreement.after(4, signal.SIGTERM) == signal.SIGTERM


# -- slow: two processes against one ----------------------------------------------------------


@pytest.fixture(scope="module")
def data_runs(work):
    """The data-parallel run on 1 process x 4 devices and on 2 processes x 2 devices (planned
    with --memory there, which process 0 does for both)."""
    one, two = work / "data-1x4", work / "data-2x2"
    gpt2jax_cli(work, ["finetune", TINY_MODEL, "--out", str(one), *data_args(work), *DATA])
    out = launch(
        work,
        ["finetune", TINY_MODEL, "--out", str(two), *data_args(work), *DATA, "--memory", "64GiB"],
    )
    return one, two, out


@pytest.mark.slow
def test_data_parallel_two_processes_equal_one(data_runs, work, tmp_path):
    one, two, out = data_runs
    assert max_difference(params_of(two), params_of(one)) <= TOLERANCE
    assert_close_losses(two, one)
    assert_only_process_0_wrote(two, one)
    assert out.count("finished ") == 1 and out.count("chosen: ") == 1  # process 0 speaks
    # export reads the checkpoint two processes wrote
    gpt2jax_cli(work, ["export", str(two), str(tmp_path / "hf")], devices=1)
    exported = jax.tree.map(np.asarray, gpt2jax.load(str(tmp_path / "hf")).params)
    assert max_difference(exported, params_of(two)) == 0


@pytest.fixture(scope="module")
def fsdp_runs(work):
    one, two = work / "fsdp-1x4", work / "fsdp-2x2"
    args = [*data_args(work), *FSDP, "--steps", "4"]
    gpt2jax_cli(work, ["finetune", SMALL_MODEL, "--out", str(one), *args])
    launch(work, ["finetune", SMALL_MODEL, "--out", str(two), *args])
    return one, two


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(fsdp_runs):
    one, two = fsdp_runs
    assert max_difference(params_of(two), params_of(one)) <= TOLERANCE
    assert_close_losses(two, one)
    assert_only_process_0_wrote(two, one)


@pytest.mark.slow
def test_fsdp_checkpoint_moves_between_process_counts(fsdp_runs, work):
    """2 updates on 2 processes, 2 more on 1 (and the reverse) == 4 straight on either."""
    one, two = fsdp_runs
    args = [*data_args(work), *FSDP]
    there, back = work / "fsdp-2-then-1", work / "fsdp-1-then-2"
    launch(work, ["finetune", SMALL_MODEL, "--out", str(there), *args, "--steps", "2"])
    gpt2jax_cli(work, ["finetune", "--resume", str(there), "--steps", "4"])
    gpt2jax_cli(work, ["finetune", SMALL_MODEL, "--out", str(back), *args, "--steps", "2"])
    launch(work, ["finetune", "--resume", str(back), "--steps", "4"])
    for run in (there, back):
        for reference in (one, two):
            assert max_difference(params_of(run), params_of(reference)) <= TOLERANCE
            assert_close_losses(run, reference)


# -- slow: a lost process, a signal to one process --------------------------------------------


def wait_for_checkpoint(run: Path, procs: list[subprocess.Popen], logs: Path) -> None:
    deadline = time.monotonic() + 900
    ckpts = run / "checkpoints"
    while time.monotonic() < deadline:
        if ckpts.is_dir() and any(n.isdigit() for n in os.listdir(ckpts)):
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail(readable((logs / "p0.log").read_text()))
        time.sleep(0.05)
    pytest.fail("no checkpoint within 15 minutes")


@pytest.mark.slow
def test_sigkill_of_one_process_stops_the_other_and_resume_matches(data_runs, work, tmp_path):
    """Process 1 killed after the first checkpoint: process 0 exits within 60 s naming it; all
    processes resumed reach the parameters of the uninterrupted two-process run, bitwise."""
    _, two, _ = data_runs
    run = tmp_path / "killed"
    # Sampling every update makes updates slow (it changes no parameter), so the kill lands
    # mid-run.
    args = ["finetune", TINY_MODEL, "--out", str(run), *data_args(work), *DATA]
    procs = start_pod(work, [*args, "--sample-every", "1"], tmp_path)
    wait_for_checkpoint(run, procs, tmp_path)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
        procs[0].wait(timeout=60)
    finally:
        for p in procs:
            p.kill()
    elapsed = time.monotonic() - killed
    err = (tmp_path / "p0.log").read_text()
    assert procs[0].returncode == LOST_EXIT, readable(err)
    lines = [line for line in err.splitlines() if "was lost" in line]
    assert len(lines) == 1 and "process 1 of 2 was lost" in lines[0], readable(err)
    assert elapsed < 60
    steps = [int(n) for n in os.listdir(run / "checkpoints") if n.isdigit()]
    assert steps and max(steps) < 8
    launch(work, ["finetune", "--resume", str(run)])
    assert max_difference(params_of(run), params_of(two)) == 0


@pytest.mark.slow
def test_sigkill_of_process_0_stops_the_other(work, tmp_path):
    """Process 0 holds JAX's coordination service: when it dies, JAX itself stops the others
    (its own message, about the lost leader task), within 60 s too."""
    run = tmp_path / "leader"
    args = ["finetune", TINY_MODEL, "--out", str(run), *data_args(work), *DATA]
    procs = start_pod(work, [*args, "--sample-every", "1"], tmp_path)
    wait_for_checkpoint(run, procs, tmp_path)
    procs[0].send_signal(signal.SIGKILL)
    try:
        procs[1].wait(timeout=60)
    finally:
        for p in procs:
            p.kill()
    err = (tmp_path / "p1.log").read_text()
    assert procs[1].returncode not in (None, 0), readable(err)
    assert "leader task" in err or "process 0 of 2 was lost" in err, readable(err)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_update(data_runs, work, tmp_path):
    """SIGTERM reaches process 1 only (a preempted host): both save the same checkpoint and
    exit with 128 + SIGTERM; resumed, the run ends as the uninterrupted one, bitwise."""
    _, two, _ = data_runs
    run = tmp_path / "term"
    args = ["finetune", TINY_MODEL, "--out", str(run), *data_args(work), *DATA]
    procs = start_pod(work, [*args, "--sample-every", "1"], tmp_path)
    wait_for_checkpoint(run, procs, tmp_path)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [128 + signal.SIGTERM] * 2, readable((tmp_path / "p0.log").read_text())
    stopped = max(int(n) for n in os.listdir(run / "checkpoints") if n.isdigit())
    assert 2 <= stopped < 8
    assert f"SIGTERM at step {stopped}: checkpoint saved" in (tmp_path / "p0.log").read_text()
    assert max(losses(run)) == stopped  # no process went further
    launch(work, ["finetune", "--resume", str(run)])
    assert max_difference(params_of(run), params_of(two)) == 0
