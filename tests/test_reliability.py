"""Fault injection on ``gpt2jax finetune``: kills, signals, unwritable and full disks.

The kill test itself is ``scripts/kill_test.py`` (imported here): a tiny run from
``tests/fixtures/openai_tiny`` trained without interruption, then again with SIGKILLs, SIGINT and
SIGTERM, resumed each time, checked after every stop (every checkpoint present restores) and at
the end (bitwise the uninterrupted run's parameters and losses). The default suite runs it with
one SIGKILL in the middle of a checkpoint save and one SIGINT; ``-m slow`` runs the full 20
random kills plus SIGINT and SIGTERM. A full disk is a real failed write: the file-size limit
(``RLIMIT_FSIZE``) of the training process, which makes its writes past 1 MiB fail with EFBIG as
a full disk makes them fail with ENOSPC (and a real 10 MB tmpfs where mounting is allowed, slow).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT
from gpt2jax.cli import main as cli


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kt = _script("kill_test")
TINY_MODEL = str(FIXTURES / "openai_tiny")
ENGLISH = str(FIXTURES / "english.txt")


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """One SIGKILL as soon as a checkpoint save has begun, then a SIGINT, then to the end.

    Without dropout and gradient accumulation the step compiles a third faster; the slow test
    (and ``tests/test_finetune.py``'s resume tests) keep them on."""
    work = tmp_path_factory.mktemp("kill")
    report = kt.kill_test(
        work, moments=("save",), signals=("INT",), save_delay=0.0,
        settings=kt.Settings(steps=8, grad_accum=1, dropout=0.0), log=lambda _: None,
    )  # fmt: skip
    return work, report


def test_kill_9_mid_save_loses_nothing(killed):
    _, report = killed
    assert report["kills"] == 1 and report["by_moment"]["save"] == 1
    # the kill landed while the save was being written: its temporary directory was left
    assert report["partial_saves_left"] == 1, report["events"]
    assert report["corrupt_checkpoints"] == 0 and report["checkpoint_restores"] >= 2
    # the resumes started from the newest complete checkpoint (kill_test raises otherwise) and
    # the parameters and every logged loss equal the uninterrupted run's
    assert report["resumes_verified"] == report["resumes"] == 2
    assert report["final_params_bitwise_equal"]
    assert report["steps_lost_max"] <= 2 * kt.Settings.save_every


def test_sigint_saves_and_exits_within_30_s(killed):
    _, report = killed
    stop = report["signals"]["INT"]
    assert stop["exit_code"] == 130 and stop["seconds"] < 30
    event = report["events"][-1]
    assert event["signal"] == "INT" and event["lost"] == 0 and event["latest"] == stop["step"]


@pytest.mark.slow
def test_twenty_random_kills_and_both_signals(tmp_path):
    report = kt.kill_test(tmp_path, kills=20, seed=0, signals=("INT", "TERM"))
    print(kt.summary(report))
    assert report["kills"] == 20 and report["corrupt_checkpoints"] == 0
    assert report["by_moment"]["save"] >= 3 and report["partial_saves_left"] >= 3
    for name, code in (("INT", 130), ("TERM", 143)):
        assert report["signals"][name]["exit_code"] == code
        assert report["signals"][name]["seconds"] < 30


# -- unwritable output -----------------------------------------------------------------------


def finetune_args(out: str) -> list[str]:
    return ["finetune", TINY_MODEL, "--data", ENGLISH, "--out", out, "--seq-len", "8"]


def run_cli(args, capsys) -> tuple[int, str, float]:
    start = time.perf_counter()
    code = cli.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else "", time.perf_counter() - start


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs at ``path``, or a skip where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_unwritable_run_directory_fails_before_training(tmp_path, capsys):
    """Checked first, in about a second: no tokenizing, no compiling, nothing created."""
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    cases = {
        str(in_the_way / "run"): f"cannot be created ({in_the_way} is a file, not a directory)",
        "/proc/gpt2jax-test/run": "/proc/gpt2jax-test/run: cannot write the run there (/proc: ",
    }
    for out, message in cases.items():
        code, line, seconds = run_cli(finetune_args(out), capsys)
        assert code == 1 and line.startswith("gpt2jax finetune: error: ") and message in line
        assert seconds < 10, seconds
    assert os.listdir(tmp_path) == ["a-file"]


def test_read_only_disk_fails_before_training(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "1M", read_only=True) as ro:
        code, line, _ = run_cli(finetune_args(str(ro / "run")), capsys)
        assert code == 1 and "cannot write the run there" in line
        assert "Read-only file system" in line and not os.listdir(ro)


def test_resume_on_a_read_only_disk_fails_before_training(killed, tmp_path, capsys):
    work, _ = killed
    with tmpfs(tmp_path / "disk", "64M") as disk:
        shutil.copytree(work / "run", disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        code, line, seconds = run_cli(["finetune", "--resume", str(disk / "run")], capsys)
        assert code == 1 and "run: cannot write the run there" in line
        assert "Read-only file system" in line and seconds < 10


# -- a save that fails midway ---------------------------------------------------------------


def with_file_size_limit(limit: int, args: list[str]) -> list[str]:
    """``python -m gpt2jax ARGS`` with writes past ``limit`` bytes of a file failing (EFBIG: Python
    ignores SIGXFSZ), set in the child itself (``preexec_fn`` would fork this threaded process)."""
    code = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        f"sys.argv = ['gpt2jax', *{args!r}]; runpy.run_module('gpt2jax', run_name='__main__')"
    )
    return [sys.executable, "-c", code]


def test_failed_save_keeps_the_previous_checkpoint_and_says_so(killed, tmp_path):
    """Resumed with writes limited to 1 MiB per file, the run's next checkpoint (6.7 MB) fails
    while being written; the error is one line, and the last checkpoint still restores."""
    work, report = killed
    run = tmp_path / "run"
    shutil.copytree(work / "run", run)
    steps = report["steps"]
    before = kt.complete_steps(run)
    args = ["finetune", "--resume", str(run), "--steps", str(steps + 4)]
    done = subprocess.run(
        with_file_size_limit(1 << 20, args), env=kt.environment(work), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1] == (
        f"gpt2jax finetune: error: {run}/checkpoints/{steps + 2}: saving the checkpoint failed "
        f"(File too large); checkpoint {steps} is the newest complete one and is kept. Once "
        f"that is fixed, continue with: gpt2jax finetune --resume {run}"
    )
    assert kt.complete_steps(run) == before  # nothing deleted, nothing half-written
    assert kt.verify_checkpoint(run, steps) is None


@pytest.mark.slow
def test_full_disk_keeps_the_previous_checkpoint(killed, tmp_path):
    """A real full disk: a 10 MB tmpfs holds the first checkpoint (6.7 MB) but not the second."""
    work, _ = killed
    with tmpfs(tmp_path / "disk", "10M") as disk:
        run = disk / "run"
        done = subprocess.run(
            kt.finetune_command(run, kt.Settings(steps=8), resume=False),
            env=kt.environment(work), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert "saving the checkpoint failed (No space left on device)" in lines[-1]
        assert "checkpoint 2 is the newest complete one and is kept" in lines[-1]
        assert kt.complete_steps(run) == [2] and kt.verify_checkpoint(run, 2) is None
