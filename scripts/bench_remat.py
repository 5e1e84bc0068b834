"""Training step time per ``--remat`` policy, the steps interleaved in one process.

Usage::

    python scripts/bench_remat.py                  # 124M shape, float32, batch 4 x 256, AdamW
    python scripts/bench_remat.py --tiny           # a smoke run of the script itself

Each policy's step is the one ``finetune`` builds (:func:`gpt2jax.train.memory.build.build`,
AdamW, clipping, the layer-wise update) on ``bench_train.py``'s shapes and random batches,
compiled once; then the timed steps run in turn, one
step of each policy per round, so that a machine whose speed drifts between processes (this
VM's does by 10%) slows every policy alike. Reported: the median step, its ratio to ``none``,
the process CPU time per step, and how far each policy's parameters are from ``none``'s after
the first step (remat recomputes the same functions; XLA fuses the recomputation differently,
so float32 rounding may differ). Like ``finetune``, the script restarts itself with glibc's
transparent huge pages where they apply (:mod:`gpt2jax.host_malloc`). Run it on an otherwise
idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 256; --tiny: 32)")
    p.add_argument("--steps", type=int, default=4, help="timed rounds (after one warm-up step)")
    p.add_argument("--policies", default="none,dots,block", help="comma-separated, none first")
    p.add_argument("--tiny", action="store_true", help="a small model and batch: smoke test")
    p.add_argument("--layers", type=int, help="override the number of layers (a quicker look)")
    args = p.parse_args(argv)
    args.seq = args.seq or (32 if args.tiny else 256)  # the tiny model's context is 64
    if argv is None:  # the host settings finetune runs in (gpt2jax.host_malloc)
        from gpt2jax.host_malloc import restart_with_huge_pages

        restart_with_huge_pages()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_train import batches as random_batches
    from bench_train import shape

    from gpt2jax.model import init_params
    from gpt2jax.train.memory.build import build
    from gpt2jax.train.optim import learning_rate_schedule
    from gpt2jax.train.settings import MemorySettings
    from gpt2jax.train.step import AXIS, DataParallel, TrainState, make_train_step

    config = shape(args)  # the shapes bench_train times
    policies = args.policies.split(",")
    schedule = learning_rate_schedule(1e-4, 0, 1000, "constant")
    dp = DataParallel()
    batches = [dp.shard(b.astype(np.int32)) for b in random_batches(args, config, args.steps + 1)]
    runs = {}
    for name in policies:
        settings = dataclasses.replace(MemorySettings(), remat=name)
        r = build(config, settings, schedule, weight_decay=0.01, clip=1.0)
        train_step = make_train_step(
            r.model, r.tx, loss_fn=r.loss_fn, schedule=schedule, axis_name=AXIS
        )
        step = dp.compile_train_step(train_step)
        state = dp.replicate(TrainState.create(init_params(config, 0), r.tx, 0))
        state, metrics = step(state, batches[0])
        jax.block_until_ready(state)
        runs[name] = [step, state, float(metrics["loss"])]
    first = runs[policies[0]][1].params
    diff = {
        name: max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(run[1].params), strict=True)
        )
        for name, run in runs.items()
    }
    times = {name: [] for name in policies}
    cpus = {name: [] for name in policies}
    for batch in batches[1:]:
        for name in policies:
            step, state, _ = runs[name]
            t, c = time.perf_counter(), cpu_s()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            times[name].append(time.perf_counter() - t)
            cpus[name].append(cpu_s() - c)
            runs[name][1] = state
    base = statistics.median(times[policies[0]])
    title = "tiny" if args.tiny else "124M"
    title += f" ({config.n_layer} layers)" if args.layers else ""
    print(
        f"{title} float32, batch {args.batch} x {args.seq}, AdamW, {args.steps} interleaved rounds"
    )
    print(f"{'remat':8} {'step s':>8} {'ratio':>7} {'CPU s':>7} {'max |param - none| step 1':>26}")
    for name in policies:
        median = statistics.median(times[name])
        print(
            f"{name:8} {median:8.3f} {median / base:6.2f}x {statistics.median(cpus[name]):7.2f} "
            f"{diff[name]:26.2e}"
        )


if __name__ == "__main__":
    main()
