"""Kill test: SIGKILL ``gpt2jax finetune`` at random moments, resume, and check nothing is lost.

A tiny run (``tests/fixtures/openai_tiny``, 16-token windows, a checkpoint every 2 updates,
dropout and gradient accumulation on) is first trained without interruption: the reference.
Then the same run is started again and killed with SIGKILL at ``--kills`` random moments (seeded),
each time restarted with ``gpt2jax finetune --resume``. The moments are drawn from:

* ``save``: while a checkpoint is being written (orbax writes step N under
  ``checkpoints/N.orbax-checkpoint-tmp`` and renames it when complete; the kill comes 0-20 ms
  after that directory appears);
* ``step``: 0-0.8 s after the session logged its first update, wherever the loop is;
* ``startup``: 0.05-4 s after the process started: importing, tokenizing, compiling, restoring.

After every kill the script checks what the run directory holds: every checkpoint present
(every ``checkpoints/<step>`` directory) must restore completely (parameters, optimizer state
and metadata, whose step must match). Each restarted session must report ``resuming ... from
step N`` with N the newest complete checkpoint (or start from scratch when there is none). At
the end, the final parameters must equal the reference's bitwise, and ``metrics.jsonl`` must
hold each update exactly once with the reference's loss. It prints the counts: kills, resumes,
updates lost per kill (logged to ``metrics.jsonl`` but not yet checkpointed), corrupt checkpoints.

``--signals`` appends sessions ended by SIGINT / SIGTERM instead, which must save a checkpoint
at the step they stop at, exit with 128 + the signal, and do so within ``--signal-timeout``
seconds.

Every restart recompiles the training step; XLA's persistent compilation cache (in the work
directory) makes that a cache read.

    python scripts/kill_test.py                          # 20 kills (~3 min on 2 CPU cores)
    python scripts/kill_test.py --kills 5 --seed 1 --signals INT TERM
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "openai_tiny"
DATA = ROOT / "tests" / "fixtures" / "english.txt"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
MOMENTS = ("save", "step", "startup")
MOMENT_WEIGHTS = (0.4, 0.4, 0.2)


@dataclasses.dataclass
class Settings:
    """The training run every session continues (small, so that a step takes ~0.1 s on CPU)."""

    steps: int = 100
    save_every: int = 2
    keep: int = 3
    batch_size: int = 4
    grad_accum: int = 2
    seq_len: int = 16
    lr: float = 1e-3
    dropout: float = 0.1
    seed: int = 7

    def flags(self) -> list[str]:
        return [
            "--steps", str(self.steps), "--save-every", str(self.save_every),
            "--keep", str(self.keep), "--batch-size", str(self.batch_size),
            "--grad-accum", str(self.grad_accum), "--seq-len", str(self.seq_len),
            "--lr", str(self.lr), "--dropout", str(self.dropout), "--seed", str(self.seed),
            "--warmup", "0", "--schedule", "constant", "--val-fraction", "0",
            "--eval-every", "0", "--sample-every", "0",
        ]  # fmt: skip


class KillTestFailure(AssertionError):
    """A check failed: the message says which session and what."""


def environment(work: Path) -> dict[str, str]:
    """The subprocesses' environment: caches in the work directory, CPU unless told otherwise."""
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["GPT2JAX_CACHE"] = str(work / "cache")
    env["JAX_COMPILATION_CACHE_DIR"] = str(work / "cache" / "jax")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache even quick compiles
    env["PYTHONUNBUFFERED"] = "1"
    return env


def finetune_command(run: Path, settings: Settings, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "gpt2jax", "finetune"]
    if resume:
        return [*cmd, "--resume", str(run)]
    return [*cmd, str(MODEL), "--data", str(DATA), "--out", str(run), *settings.flags()]


def complete_steps(run: Path) -> list[int]:
    """The steps of the complete checkpoints: orbax renames a step to its number when done."""
    ckpts = run / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())


def partial_saves(run: Path) -> dict[str, int]:
    """The unfinished saves in the checkpoint directory, with their inodes."""
    ckpts = run / "checkpoints"
    if not ckpts.is_dir():
        return {}
    found = {}
    for name in os.listdir(ckpts):
        if name.endswith(TMP_SUFFIX):
            inode = _inode(ckpts / name)
            if inode is not None:
                found[name] = inode
    return found


def verify_checkpoint(run: Path, step: int) -> str | None:
    """None if checkpoint ``step`` restores completely, else what went wrong."""
    import orbax.checkpoint as ocp
    from etils import epath

    from gpt2jax.store import runs

    directory = epath.Path(run / "checkpoints" / str(step))
    try:
        config, _ = runs.read_run(str(run))
        params = runs.restore_params(str(run), config, step)
        with warnings.catch_warnings():  # "Sharding info not provided": we want host arrays
            warnings.simplefilter("ignore")
            opt_state = ocp.PyTreeCheckpointHandler().restore(directory / "opt_state")
        meta = ocp.JsonCheckpointHandler().restore(directory / "meta")
        leaves = [np.asarray(x) for x in _leaves((params, opt_state))]
        if not all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f"):
            return "non-finite values"
        if meta.get("step") != step:
            return f"meta says step {meta.get('step')}"
    except Exception as e:  # anything at all: this is what the test looks for
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def _leaves(tree: Any) -> list[Any]:
    import jax

    return jax.tree.leaves(tree)


def logged_steps(run: Path) -> list[int]:
    from gpt2jax.train.metrics import read_metrics

    return [r["step"] for r in read_metrics(str(run / "metrics.jsonl")) if "loss" in r]


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


class Session:
    """One ``gpt2jax finetune`` process, its log and what it was expected to resume from."""

    def __init__(self, index: int, run: Path, settings: Settings, env: dict, logs: Path) -> None:
        self.index = index
        self.run = run
        self.resume = (run / "run.json").exists()
        done = complete_steps(run)
        self.expected = done[-1] if done else 0  # where it must start
        self.metrics_inode = _inode(run / "metrics.jsonl")
        self.stale_saves = partial_saves(run)  # left by the last kill, removed at start-up
        self.log_path = logs / f"session-{index:02d}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in finish()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            finetune_command(run, settings, self.resume),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics_rewritten(self) -> bool:
        """True once the session truncated ``metrics.jsonl`` to its starting step (a new file):
        the records there are then its own."""
        return _inode(self.run / "metrics.jsonl") not in (None, self.metrics_inode)

    def loop_started(self) -> bool:
        """True once this session's training loop logged an update."""
        return self.metrics_rewritten() and any(s > self.expected for s in logged_steps(self.run))

    def new_saves(self) -> list[str]:
        """Unfinished saves this session started."""
        return [n for n, i in partial_saves(self.run).items() if self.stale_saves.get(n) != i]

    def finish(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
        return code

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def resumed_from(self) -> int | None:
        """The step the session said it resumed from; 0 for a start from scratch; None if it
        died before saying."""
        m = re.search(r"resuming .* from step (\d+)", self.text())
        if m:
            return int(m.group(1))
        return 0 if self.metrics_rewritten() else None


def wait_for(condition, session: Session, timeout: float = 240) -> bool:
    """Polls ``condition`` every 2 ms; False if the process exited (or time ran out) first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not session.alive():
            return False
        time.sleep(0.002)
    return False


def kill_at(
    session: Session, moment: str, rng: np.random.Generator, sig: int, save_delay: float = 0.02
) -> dict[str, Any]:
    """Sends ``sig`` at a moment of kind ``moment``; returns what happened."""
    event: dict[str, Any] = {"moment": moment}
    if moment == "startup":
        time.sleep(rng.uniform(0.05, 4.0))
    elif moment == "step":
        if wait_for(session.loop_started, session):
            time.sleep(rng.uniform(0.0, 0.8))
    elif moment == "save":
        nth = int(rng.integers(1, 3))  # the first or second save of the session
        seen: set[str] = set()

        def saving() -> bool:
            now = session.new_saves()
            seen.update(now)
            return len(seen) >= nth and bool(now)

        if wait_for(session.loop_started, session) and wait_for(saving, session):
            time.sleep(rng.uniform(0.0, save_delay))
    else:
        raise ValueError(moment)
    event["finished_first"] = not session.alive()
    event["signal_time"] = time.monotonic()
    if session.alive():
        session.proc.send_signal(sig)
    return event


def check_after_stop(session: Session, verified: dict[str, int]) -> dict[str, Any]:
    """Every checkpoint present restores; what the session reached and left behind."""
    run = session.run
    steps = complete_steps(run)
    corrupt = {}
    for step in steps:
        problem = verify_checkpoint(run, step)
        verified["restores"] += 1
        if problem:
            corrupt[step] = problem
    # The updates this session logged (none if it died before its loop started).
    reached = max(logged_steps(run), default=0) if session.metrics_rewritten() else session.expected
    latest = steps[-1] if steps else 0
    if latest < session.expected:
        raise KillTestFailure(
            f"session {session.index}: the newest checkpoint went back from step "
            f"{session.expected} to {latest}"
        )
    return {
        "complete": steps,
        "partial": sorted(session.new_saves()),
        "corrupt": corrupt,
        "reached": reached,
        "latest": latest,
        "lost": max(0, reached - latest),
    }


def kill_test(
    work: Path,
    *,
    kills: int = 20,
    seed: int = 0,
    signals: tuple[str, ...] = (),
    moments: tuple[str, ...] | None = None,
    save_delay: float = 0.02,
    settings: Settings | None = None,
    signal_timeout: float = 30.0,
    log=print,
) -> dict[str, Any]:
    """Runs the whole test in ``work``; returns the report, raises :class:`KillTestFailure`.

    ``moments`` chooses the kills' moments instead of drawing ``kills`` of them; ``save_delay``
    is the most a ``save`` kill waits after the save began."""
    from gpt2jax.store import runs

    settings = settings or Settings()
    rng = np.random.default_rng(seed)
    env = environment(work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    # The reference: the same run, uninterrupted (it also fills the compilation cache).
    reference = work / "reference"
    with open(logs / "reference.log", "w") as err:
        code = subprocess.run(
            finetune_command(reference, settings, resume=False),
            env=env, stdout=subprocess.DEVNULL, stderr=err,
        ).returncode  # fmt: skip
    if code != 0:
        raise KillTestFailure(f"the reference run failed: see {logs / 'reference.log'}")
    ref_seconds = time.monotonic() - t0
    log(f"reference: {settings.steps} updates in {ref_seconds:.1f} s")

    run = work / "run"
    if moments is None:
        moments = tuple(str(rng.choice(MOMENTS, p=MOMENT_WEIGHTS)) for _ in range(kills))
    plan = [("KILL", moment) for moment in moments]
    plan += [(name, "step") for name in signals]
    verified = {"restores": 0}
    events: list[dict[str, Any]] = []
    for index, (sig_name, moment) in enumerate(plan):
        session = Session(index, run, settings, env, logs)
        sig = getattr(signal, f"SIG{sig_name}")
        event = kill_at(session, moment, rng, sig, save_delay)
        code = session.finish()
        event.update(
            signal=sig_name, session=index, resumed=session.resume, expected=session.expected,
            code=code,
        )  # fmt: skip
        event["exit_seconds"] = round(time.monotonic() - event.pop("signal_time"), 2)
        if event["finished_first"]:
            log(f"session {index}: finished before the signal (raise --steps); stopping here")
            events.append(event)
            break
        event.update(check_after_stop(session, verified))
        if sig_name != "KILL":
            _check_clean_stop(session, event, sig, signal_timeout)
        if event["corrupt"]:
            raise KillTestFailure(f"session {index}: unreadable checkpoint(s) {event['corrupt']}")
        log(
            f"session {index:2d}: SIG{sig_name:4s} {moment:7s} started at {session.expected:3d}, "
            f"reached {event['reached']:3d}, checkpoints {event['complete']}"
            + (f", partial save {event['partial']}" if event["partial"] else "")
        )
        _check_resume(session, event)
        events.append(event)

    # The last session runs to the end.
    final = Session(len(plan), run, settings, env, logs)
    if final.finish() != 0:
        raise KillTestFailure(f"the final session failed: see {final.log_path}")
    _check_resume(final, {})

    # Nothing lost: the same parameters and the same loss at every update.
    config, _ = runs.read_run(str(run))
    got = runs.restore_params(str(run), config, settings.steps)
    want = runs.restore_params(str(reference), config, settings.steps)
    for (path, a), b in zip(_leaves_with_path(got), _leaves(want), strict=True):
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            raise KillTestFailure(f"final parameters differ from the reference at {path}")
    losses, ref_losses = _losses(run), _losses(reference)
    if losses != ref_losses:
        differ = sorted(set(losses.items()) ^ set(ref_losses.items()))[:3]
        raise KillTestFailure(f"metrics.jsonl differs from the reference's: {differ}")

    kill_events = [e for e in events if e["signal"] == "KILL" and not e["finished_first"]]
    lost = [e["lost"] for e in kill_events]
    report = {
        "kills": len(kill_events),
        "by_moment": {m: sum(e["moment"] == m for e in kill_events) for m in MOMENTS},
        "partial_saves_left": sum(bool(e["partial"]) for e in kill_events),
        "sessions": len(events) + 1,
        "resumes": sum(e["resumed"] for e in events) + 1,
        "resumes_verified": sum(e["resumed"] and e["resumed_from"] is not None for e in events) + 1,
        "steps_lost_mean": round(statistics.mean(lost), 2) if lost else 0.0,
        "steps_lost_max": max(lost, default=0),
        "checkpoint_restores": verified["restores"],
        "corrupt_checkpoints": sum(len(e.get("corrupt", {})) for e in events),
        "signals": {
            e["signal"]: {"step": e["latest"], "exit_code": e["code"], "seconds": e["exit_seconds"]}
            for e in events
            if e["signal"] != "KILL" and not e["finished_first"]
        },
        "final_params_bitwise_equal": True,
        "steps": settings.steps,
        "seed": seed,
        "reference_seconds": round(ref_seconds, 1),
        "seconds": round(time.monotonic() - t0, 1),
        "events": events,
    }
    return report


def _check_resume(session: Session, event: dict[str, Any]) -> None:
    """A session that got as far as saying where it starts started from the newest complete
    checkpoint there was (0: none)."""
    event["resumed_from"] = session.resumed_from()
    if event["resumed_from"] not in (None, session.expected):
        raise KillTestFailure(
            f"session {session.index}: resumed from step {event['resumed_from']}, but the newest "
            f"complete checkpoint was {session.expected}: see {session.log_path}"
        )


def _check_clean_stop(session: Session, event: dict[str, Any], sig: int, timeout: float) -> None:
    """A SIGINT/SIGTERM session saved where it stopped, said so, and exited in time."""
    name = signal.Signals(sig).name
    text = session.text()
    m = re.search(rf"{name} at step (\d+): checkpoint saved", text)
    if event["code"] != 128 + sig or not m:
        raise KillTestFailure(
            f"session {session.index}: {name} gave exit code {event['code']} and no "
            f"'checkpoint saved' line: see {session.log_path}"
        )
    if int(m.group(1)) != event["latest"] or event["lost"]:
        raise KillTestFailure(
            f"session {session.index}: stopped at step {m.group(1)} but the newest checkpoint is "
            f"{event['latest']} and {event['lost']} logged update(s) were not saved"
        )
    if event["exit_seconds"] > timeout:
        raise KillTestFailure(
            f"session {session.index}: {name} took {event['exit_seconds']} s to exit (> {timeout})"
        )


def _leaves_with_path(tree: Any) -> list[tuple[str, Any]]:
    import jax

    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _losses(run: Path) -> dict[int, float]:
    from gpt2jax.train.metrics import read_metrics

    records = [r for r in read_metrics(str(run / "metrics.jsonl")) if "loss" in r]
    steps = [r["step"] for r in records]
    if len(steps) != len(set(steps)):
        raise KillTestFailure(f"{run}/metrics.jsonl logs some update twice")
    return {r["step"]: r["loss"] for r in records}


def summary(report: dict[str, Any]) -> str:
    moments = ", ".join(f"{n} {m}" for m, n in report["by_moment"].items())
    lines = [
        f"kills (SIGKILL):          {report['kills']} ({moments})",
        f"  partial save left:      {report['partial_saves_left']} (a kill landed mid-save)",
        f"resumes:                  {report['resumes']} with --resume; "
        f"{report['resumes_verified']} got far enough to start, all from the newest checkpoint",
        f"steps lost per kill:      mean {report['steps_lost_mean']}, "
        f"max {report['steps_lost_max']} (updates logged but not yet checkpointed)",
        f"checkpoints restored:     {report['checkpoint_restores']} "
        f"(every checkpoint present after every stop)",
        f"corrupt checkpoints:      {report['corrupt_checkpoints']}",
    ]
    for name, s in report["signals"].items():
        lines.append(
            f"{'SIG' + name + ':':26s}checkpoint at step {s['step']}, exit code "
            f"{s['exit_code']}, {s['seconds']} s after the signal"
        )
    lines += [
        f"final parameters:         bitwise equal to the uninterrupted run "
        f"({report['steps']} updates, same seed)",
        f"wall time:                {report['seconds']} s "
        f"(reference run {report['reference_seconds']} s)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--steps", type=int, default=Settings.steps, help="updates in the run")
    p.add_argument(
        "--signals", nargs="*", default=[], choices=("INT", "TERM"),
        help="then end sessions with these signals, which must save and exit cleanly",
    )  # fmt: skip
    p.add_argument("--signal-timeout", type=float, default=30.0, help="seconds to exit after it")
    p.add_argument("--workdir", help="keep everything here (default: a temporary directory)")
    p.add_argument("--json", help="also write the report (with every session) to this file")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpt2jax-kill-test-"))
    try:
        report = kill_test(
            work, kills=args.kills, seed=args.seed, signals=tuple(args.signals),
            settings=Settings(steps=args.steps), signal_timeout=args.signal_timeout,
        )  # fmt: skip
    except KillTestFailure as e:
        print(f"FAILED: {e} (work directory kept: {work})", file=sys.stderr)
        return 1
    print(summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
