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
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- convert: a full disk, Ctrl-C, SIGTERM ----------------------------------------------------


def _convert_process(src: str, dst: Path, work: Path, limit: int | None = None):
    """``gpt2jax convert SRC DST`` in a new process (caches in ``work``), with the file-size
    limit ``limit`` if given."""
    args = ["convert", src, str(dst)]
    command = with_file_size_limit(limit, args) if limit else [sys.executable, "-m", "gpt2jax",
                                                               *args]  # fmt: skip
    # SIGINT's default action in the child: a test run started as a background job (`&` in a
    # shell without job control) inherits it ignored, and so would the convert.
    return subprocess.Popen(command, env=kt.environment(work), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)  # fmt: skip


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _assert_one_line_and_nothing_left(done_err: str, parent: Path, message: str) -> None:
    lines = [x for x in done_err.splitlines() if x.strip() and not x.startswith("converting:")]
    assert "Traceback" not in done_err and len(lines) == 1, done_err[-3000:]
    assert lines[0].startswith("gpt2jax convert: error: ") and message in lines[0], lines[0]
    assert os.listdir(parent) == [], os.listdir(parent)  # no output, no temporary directory


def test_convert_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A real full disk (a 1 MB tmpfs; the parameters need 2.4 MB) where mounting is allowed,
    else the file-size limit (EFBIG): orbax's RESOURCE_EXHAUSTED and its threads' tracebacks
    become one line naming the destination."""
    disk = tmp_path / "disk"
    try:
        with tmpfs(disk, "1M"):
            child = _convert_process(TINY_MODEL, disk / "ckpt", tmp_path)
            _, err = child.communicate(timeout=300)
            assert child.returncode == 1
            _assert_one_line_and_nothing_left(
                err, disk, f"{disk}/ckpt: writing the parameters failed (No space left on device)"
            )
    except pytest.skip.Exception:
        disk.mkdir(exist_ok=True)
        child = _convert_process(TINY_MODEL, disk / "ckpt", tmp_path, limit=1 << 20)
        _, err = child.communicate(timeout=300)
        assert child.returncode == 1
        _assert_one_line_and_nothing_left(
            err, disk, f"{disk}/ckpt: writing the parameters failed (File too large)"
        )


@pytest.fixture(scope="module")
def wide_openai(tmp_path_factory) -> str:
    """An OpenAI directory of 57 MB (8 layers, 384 wide, 97 tokens): its save takes long
    enough to be interrupted."""
    from gpt2jax.config import GPT2Config
    from gpt2jax.convert import mapping
    from gpt2jax.formats.tf_bundle import write_bundle

    path = tmp_path_factory.mktemp("wide") / "openai"
    path.mkdir()
    config = GPT2Config(n_vocab=97, n_ctx=16, n_embd=384, n_head=4, n_layer=8)
    rng = np.random.default_rng(0)
    ours = {k: (0.02 * rng.standard_normal(s)).astype(np.float32)
            for k, s in mapping.our_shapes(config).items()}  # fmt: skip
    write_bundle(path / "model.ckpt", dict(mapping.to_theirs(mapping.unflatten(ours), config,
                                                                "openai")))  # fmt: skip
    (path / "hparams.json").write_text(json.dumps(config.to_hparams()))
    return str(path)


@pytest.mark.parametrize(("sig", "code"), [("INT", 130), ("TERM", 143)])
def test_convert_interrupted_mid_save_stops_at_once_and_cleans_up(wide_openai, tmp_path, sig,
                                                                 code):  # fmt: skip
    """Orbax waits for TensorStore in C++, where Ctrl-C went unseen until the whole save was
    done; now the save runs on a thread, the signal ends the command within a second or two,
    and the temporary directory is gone."""
    out = tmp_path / "out" / "ckpt"
    out.parent.mkdir()
    child = _convert_process(wide_openai, out, tmp_path)
    deadline = time.monotonic() + 240
    while not list(out.parent.glob(".ckpt.tmp-*/params*")):  # the save has begun
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.005)
    start = time.monotonic()
    child.send_signal(getattr(signal, f"SIG{sig}"))
    _, err = child.communicate(timeout=120)
    seconds = time.monotonic() - start
    assert child.returncode == code, err[-3000:]
    assert err.strip().splitlines()[-1] == "gpt2jax convert: interrupted"
    assert seconds < 5, seconds
    # Removed on the way out; orbax's abandoned threads may still add a file in the last
    # milliseconds, and then the next convert to the same place removes what they left
    # (its owner's pid is no longer running).
    left = os.listdir(out.parent)
    assert all(name.startswith(f".ckpt.tmp-{child.pid}@") for name in left), left
    if left:
        assert cli.main(["convert", TINY_MODEL, str(out)]) == 0
        assert os.listdir(out.parent) == ["ckpt"]


# -- one writer per run ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_finetune_of_the_same_run_refuses_at_once_naming_the_first(tmp_path):
    """Two ``gpt2jax finetune`` on one run directory: the second ends with one line naming
    the first's pid, before reading any data (no ``data:`` line), while the first goes on.
    (Slow: the first must get as far as creating the run; 130 s on the shared 2-core machine.
    The default suite's corpus cases ``run_in_use_*`` hold the lock with a live process.)"""
    run = tmp_path / "run"
    args = ["finetune", TINY_MODEL, "--data", ENGLISH, "--out", str(run), "--seq-len", "8",
            "--batch-size", "2", "--steps", "400", "--save-every", "100", "--eval-every", "0",
            "--sample-every", "0"]  # fmt: skip
    env = kt.environment(tmp_path)
    first = subprocess.Popen([sys.executable, "-m", "gpt2jax", *args], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        lock = tmp_path / ".run.lock"
        deadline = time.monotonic() + 240
        while not lock.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        for second_args in (args, ["finetune", "--resume", str(run)]):
            if second_args[1] == "--resume":  # once the first has created the run
                while not (run / "run.json").exists():
                    assert first.poll() is None and time.monotonic() < deadline
                    time.sleep(0.05)
            second = subprocess.run([sys.executable, "-m", "gpt2jax", *second_args], env=env,
                                    capture_output=True, text=True, timeout=300)  # fmt: skip
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
            assert len(lines) == 1, second.stderr  # nothing tokenized, nothing compiled
            assert lines[0].startswith(f"gpt2jax finetune: error: {run}: in use by another "
                                       f"gpt2jax process (pid {first.pid} on ")  # fmt: skip
            assert first.poll() is None  # the first goes on
    finally:
        first.send_signal(signal.SIGTERM)  # saves, then ends
        first.communicate(timeout=300)
    assert first.returncode == 143 and not lock.exists()
