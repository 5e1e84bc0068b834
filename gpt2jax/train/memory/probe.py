"""Measuring what a training step really uses, to check :mod:`gpt2jax.train.memory.planner`'s
predictions: :func:`run_probe` runs :func:`probe` in a fresh process
(``python -m gpt2jax.train.memory.probe SPEC``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

from gpt2jax.errors import Gpt2JaxError


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise Gpt2JaxError(f"/proc/self/status has no {field}")


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Predicted and measured peak bytes of one step of ``spec`` (see :func:`run_probe`).

    Compiles the step of a configuration (the prediction comes from this compiled step),
    records the process's resident memory, creates the train state straight on the device
    (random weights from a jitted init: no host copies), resets the kernel's high-water mark
    (``/proc/self/clear_refs``), runs one real step, and reads the high-water mark back
    (``VmHWM``). The measured figure is that peak minus the resident memory before the state
    existed: the step's arguments, outputs and temporaries, as predicted. Linux only. On a GPU
    or TPU the measured figure is the device allocator's ``peak_bytes_in_use`` instead (which
    includes the state), and the step time is averaged over a few more steps.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gpt2jax.config import GPT2Config, get_preset
    from gpt2jax.model import init_params
    from gpt2jax.train.memory.build import build
    from gpt2jax.train.memory.planner import Candidate, Planner, memory_details, peak_bytes
    from gpt2jax.train.settings import MemorySettings
    from gpt2jax.train.step import TrainState

    config = spec["config"]
    config = get_preset(config) if isinstance(config, str) else GPT2Config.from_dict(config)
    settings = MemorySettings(**spec["settings"])
    candidate = Candidate(settings, spec["batch_size"], spec["grad_accum"])
    planner = Planner(config, spec["seq_len"])
    compiled, compile_s = planner.compile(candidate)
    batch_shape = (candidate.grad_accum, candidate.micro_batch, spec["seq_len"] + 1)

    recipe = build(config, settings, lambda s: 1e-4)
    before = _status_kib("VmRSS") * 1024

    @jax.jit
    def init():  # the starting state, made on the device
        params = init_params(config, 0)
        trained, frozen = recipe.split(params, 0)
        return TrainState.create(trained, recipe.tx, 0, frozen=frozen)

    state = jax.block_until_ready(init())
    rng = np.random.default_rng(0)
    batch = jnp.asarray(rng.integers(0, config.n_vocab, batch_shape), jnp.int32)  # (A, b, T+1)
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    step_start = time.perf_counter()
    state, metrics = compiled(state, batch)
    loss = float(jax.block_until_ready(metrics["loss"]))
    step_s = time.perf_counter() - step_start
    if on_cpu:
        hwm = _status_kib("VmHWM") * 1024
        measured = hwm - before
    else:  # an accelerator: its allocator's own high-water mark, and the speed of more steps
        hwm = measured = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
        steps = spec.get("timed_steps", 5)
        step_start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        step_s = (time.perf_counter() - step_start) / steps
    return {
        "backend": jax.default_backend(),
        "predicted": peak_bytes(compiled),
        "measured": measured,
        "rss_before": before,
        "rss_peak": hwm,
        "loss": loss,
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_per_s": candidate.batch_size * spec["seq_len"] / step_s,
        "tokens": candidate.batch_size * spec["seq_len"],
        **memory_details(compiled),
    }


def run_probe(
    config: Any,
    settings: Any,
    *,
    seq_len: int,
    batch_size: int,
    grad_accum: int = 1,
    timeout: float = 1800,
) -> dict[str, Any]:
    """:func:`probe` of a configuration in a fresh subprocess (one device), its result.

    ``config`` is a preset name or a :class:`~gpt2jax.config.GPT2Config`; ``settings`` a
    :class:`~gpt2jax.train.memory.build.MemorySettings`.
    """
    spec = {
        "config": config if isinstance(config, str) else config.to_dict(),
        "settings": dataclasses.asdict(settings),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
    }
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2jax.train.memory.probe", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise Gpt2JaxError(f"memory probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
