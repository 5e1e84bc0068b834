"""``gpt2jax launch --processes N -- finetune ...``: one run as N processes on this machine.

A rehearsal, on one machine's CPU, of a run over several hosts (a TPU pod slice, a GPU cluster;
:mod:`gpt2jax.train.cluster`): starts N ``gpt2jax`` processes with ``GPT2JAX_DISTRIBUTED=1``, JAX's
coordinator on 127.0.0.1 (a free port) and ``--cpu-devices`` CPU devices each, exactly as a pod
starts one per host; forwards SIGINT and SIGTERM to all of them; says which process failed and
exits with its status. On a real pod or cluster, run the gpt2jax command itself on every host
(README: "TPU pods and clusters"). Registered by :mod:`gpt2jax.cli.main`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from gpt2jax.errors import ConfigError


def add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="run a gpt2jax command as several processes on this machine's CPU (a rehearsal "
        "of a multi-host run)",
        description="Start --processes copies of COMMAND (a gpt2jax command, e.g. finetune "
        "...) as the processes of one multi-process JAX run on this machine: "
        "GPT2JAX_DISTRIBUTED=1, coordinator on 127.0.0.1, --cpu-devices CPU devices each. "
        "Process 0 writes the run's files. SIGINT/SIGTERM go to every process; the exit status "
        "is the first failing process's. On a pod or cluster, start the command on each host "
        "instead (see README).",
    )
    p.add_argument("--processes", "-n", type=int, required=True, metavar="N", help="processes")
    p.add_argument(
        "--cpu-devices", type=int, default=1, metavar="D", help="CPU devices each (default 1)"
    )
    p.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="COMMAND", help="the gpt2jax command and flags"
    )
    p.set_defaults(func=_cmd_launch)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd_launch(args: argparse.Namespace) -> int:
    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or command[0].startswith("-") or command[0] == "launch":
        raise ConfigError("give a gpt2jax command, e.g. launch --processes 2 -- finetune ...")
    if args.processes < 1:
        raise ConfigError(f"--processes must be >= 1, got {args.processes}")
    if args.cpu_devices < 1:
        raise ConfigError(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
    env = {
        **os.environ,
        "GPT2JAX_DISTRIBUTED": "1",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
        "JAX_NUM_PROCESSES": str(args.processes),
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": str(args.cpu_devices),
    }
    # Each in its own session: a Ctrl-C at the terminal reaches the launcher only, which
    # forwards it once (twice would interrupt a run at once instead of checkpointing).
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gpt2jax", *command],
            env={**env, "JAX_PROCESS_ID": str(i)},
            start_new_session=True,
        )
        for i in range(args.processes)
    ]
    try:
        return _wait(procs)
    finally:
        for p in procs:  # the launcher itself interrupted: no process outlives it
            if p.poll() is None:
                p.kill()


def _wait(procs: list[subprocess.Popen]) -> int:
    """Waits for every process, forwarding SIGINT/SIGTERM; the first failure's exit status."""
    from gpt2jax.train.cluster import JAX_HEARTBEAT

    def forward(signum: int, frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed: tuple[int, int] | None = None
    deadline = None  # after a failure, the others stop by themselves within JAX_HEARTBEAT s
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                code = p.poll()
                if code not in (None, 0) and failed is None:
                    failed = (i, code)
                    print(f"gpt2jax launch: process {i} {_how(code)}", file=sys.stderr, flush=True)
                    deadline = time.monotonic() + JAX_HEARTBEAT + 15
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if failed is None:
        failed = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode), None)
    if failed is None:
        return 0
    code = failed[1]
    return 128 - code if code < 0 else code


def _how(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"
