"""Benchmark: training memory of every GPT-2 size under each memory configuration.

For each model size x configuration it prints the predicted peak of one training step (XLA's
compiled memory analysis: arguments + outputs + temporaries - aliased, nothing allocated; per
device under FSDP) and, with ``--measure``, for the configurations whose prediction fits
``--measure-limit``, the measured peak of one real step in a fresh process
(:mod:`gpt2jax.train.memory.probe`: peak RSS growth on CPU; ``peak_bytes_in_use`` and tokens/s on a
GPU/TPU). It also prints how long the 1558M step takes to compile.

Targets (issue 6), seq 1024, all parameters trained unless LoRA:
  1558M "16 GB" (remat block + Adafactor + bf16 compute + chunked loss, batch 1)  <= 15 GiB
  774M  same configuration                                                         <= 8 GiB
  1558M LoRA rank 16 (float32 frozen base, bf16 compute)                           <= 8 GiB
  1558M AdamW, FSDP over 8 devices (fake CPU devices), per device                  <= 8 GiB
  compile time of the 1558M step                                                   < 60 s
Anchors measured on this machine (issue 6): transformers + torch AdamW float32, seq 1024,
batch 1, one step of 774M peaks at 19.2 GiB RSS (13.3 GiB with gradient checkpointing); 1558M
does not run in 24 GB.

    python scripts/bench_memory.py                        # predictions only (minutes)
    python scripts/bench_memory.py --measure              # + real steps (run alone: ~16 GiB)
    python scripts/bench_memory.py --sizes tiny --seq-len 64 --measure    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

GiB = 2**30

#: (name, settings, batch size, grad accum, target GiB or None). Settings as MemorySettings kwargs.
LEAN = dict(remat="block", optimizer="adafactor", compute_dtype="bfloat16", loss_chunk=128)
CONFIGS = (
    ("plain f32 AdamW", dict(), 1, 1, None),
    ("remat block, AdamW bf16 state", dict(remat="block", opt_state_dtype="bfloat16"), 1, 1, None),
    ("16GB: block+adafactor+bf16+chunk", LEAN, 1, 1, {"774M": 8, "1558M": 15}),
    (
        "LoRA r16, AdamW, block+bf16+chunk",
        dict(LEAN, optimizer="adamw", lora_rank=16),
        1,
        1,
        {"1558M": 8},
    ),  # fmt: skip
)
FSDP_CONFIG = ("FSDP x8 AdamW f32, block+bf16+chunk", dict(LEAN, optimizer="adamw"), 8, 1, 8)


def tiny_config():
    from gpt2jax.config import GPT2Config

    return GPT2Config(n_vocab=2003, n_ctx=64, n_embd=64, n_head=4, n_layer=2)


def config_of(size: str):
    from gpt2jax.config import get_preset

    return tiny_config() if size == "tiny" else get_preset(size)


def predict(size: str, settings: dict, batch: int, accum: int, seq_len: int) -> dict:
    from gpt2jax.cli.plan import make_planner
    from gpt2jax.train.memory.planner import Candidate
    from gpt2jax.train.settings import MemorySettings

    s = MemorySettings(**settings)
    planner = make_planner(config_of(size), seq_len, s)
    peak, details = planner.predict(Candidate(s, batch, accum))
    return {"predicted": peak, **details, "devices": planner.n_devices}


def fsdp_child(size: str, seq_len: int) -> None:
    """Runs in a process with 8 fake CPU devices: prints the FSDP row's prediction as JSON."""
    name, settings, batch, accum, _ = FSDP_CONFIG
    print(json.dumps(predict(size, dict(settings, parallel="fsdp"), batch, accum, seq_len)))


def predict_fsdp(size: str, seq_len: int) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, __file__, "--fsdp-child", size, "--seq-len", str(seq_len)],
        capture_output=True, text=True, env=env, timeout=3600,
    )  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"FSDP prediction failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(size: str, settings: dict, batch: int, accum: int, seq_len: int) -> dict:
    from gpt2jax.train.memory.probe import run_probe
    from gpt2jax.train.settings import MemorySettings

    cfg = size if size != "tiny" else tiny_config()
    return run_probe(
        cfg, MemorySettings(**settings), seq_len=seq_len, batch_size=batch, grad_accum=accum
    )


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:7.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["124M", "355M", "774M", "1558M"])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--measure", action="store_true", help="also run one real step per config")
    p.add_argument("--measure-limit", type=float, default=17.0,
                   help="measure configs predicted below this many GiB (default 17)")  # fmt: skip
    p.add_argument("--no-fsdp", action="store_true", help="skip the 8-device FSDP rows")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--fsdp-child", metavar="SIZE", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.fsdp_child:
        return fsdp_child(args.fsdp_child, args.seq_len)

    import jax

    print(f"backend {jax.default_backend()}, seq {args.seq_len}; GiB; predicted = compiled "
          f"memory analysis, measured = one real step (peak RSS growth on CPU)")  # fmt: skip
    print(f"{'size':<6} {'configuration':<38} {'batch':>5} {'predicted':>9} {'measured':>9} "
          f"{'target':>6} {'compile s':>9} {'step s':>7}")  # fmt: skip
    rows = []
    for size in args.sizes:
        plan = [(n, s, b, a, (t or {}).get(size)) for n, s, b, a, t in CONFIGS]
        for name, settings, batch, accum, target in plan:
            predicted = predict(size, settings, batch, accum, args.seq_len)
            row = {"size": size, "config": name, "batch": batch, "grad_accum": accum}
            row.update(target_gib=target, **predicted)
            if args.measure and row["predicted"] < args.measure_limit * GiB:
                measured = measure(size, settings, batch, accum, args.seq_len)
                row.update({f"measured_{k}": v for k, v in measured.items()})
            rows.append(row)
            show(row)
        if not args.no_fsdp:
            name, settings, batch, accum, target = FSDP_CONFIG
            row = {"size": size, "config": name, "batch": batch, "grad_accum": accum}
            row.update(target_gib=target if size == "1558M" else None)
            row.update(predict_fsdp(size, args.seq_len))
            rows.append(row)
            show(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def show(row: dict) -> None:
    target = f"{row['target_gib']:>6}" if row.get("target_gib") else f"{'':>6}"
    measured = row.get("measured_measured")
    step = row.get("measured_step_s")
    print(
        f"{row['size']:<6} {row['config']:<38} {row['batch']:>5} {gib(row['predicted']):>9} "
        f"{gib(measured):>9} {target} {row['compile_s']:>9.1f} "
        f"{'-' if step is None else f'{step:.1f}':>7}",
        flush=True,
    )
    if measured is not None and row.get("measured_backend", "cpu") != "cpu":
        print(f"       tokens/s {row['measured_tokens_per_s']:.0f}")


if __name__ == "__main__":
    main()
