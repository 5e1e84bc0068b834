"""Training throughput: ``gpt2jax finetune`` and its plain step vs transformers + torch AdamW.

Usage::

    python scripts/bench_train.py                 # 124M shape, float32, batch 4 x 256 tokens
    python scripts/bench_train.py --tiny          # a smoke run of the script itself

Three sides train the same shape from random weights with AdamW (lr 1e-4 constant, weight decay
0.01, clipping at 1.0, no dropout, float32): ``finetune`` is the command users run
(``python -m gpt2jax finetune --init 124M``, a subprocess on text, which restarts itself with
its host settings, :mod:`gpt2jax.host_malloc`; its step times are the intervals its own
metrics.jsonl records), ``step`` a bare pmapped step with a plain optax chain on random batches
(in the same host settings), ``torch`` transformers' GPT2LMHeadModel with torch.optim.AdamW on
the same batches (in the environment the script was started in).
Each side runs in its own child process, one after the other, so that its peak RSS is its own
and they do not compete for the cores. Reported per side (medians over the timed steps, which
follow one warm-up step): step time, tokens/s, the slowest timed step over the median, compile
time (the step: its first call minus a median step; finetune compiles before its first step,
torch runs eagerly), peak RSS, and model FLOPs utilisation: the model's
FLOPs per token (6 x parameters + 12 x layers x width x sequence, the PaLM appendix B count,
with the LM head counted once through ``wte``) times tokens/s, over the machine's matmul rate
measured here by a large jitted float32 matmul. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = ("finetune", "step", "torch")
TEXT = os.path.join(ROOT, "tests", "fixtures", "english.txt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 256; --tiny: 32)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every side this many times, in rotating order (this VM's speed drifts by "
        "10%% from minute to minute; ratios are taken within each round, then the median)",
    )
    p.add_argument("--tiny", action="store_true", help="a small model and batch: smoke test")
    p.add_argument("--layers", type=int, help="override the number of layers (a quicker look)")
    p.add_argument("--side", choices=SIDES + ("matmul",), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seq is None:
        args.seq = 32 if args.tiny else 256  # the tiny model's context is 64
    return args


def shape(args: argparse.Namespace):
    import dataclasses

    from gpt2jax.config import PRESETS, GPT2Config

    config = PRESETS["124M"]
    if args.tiny:
        config = GPT2Config(n_vocab=50257, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
    return dataclasses.replace(config, n_layer=args.layers or config.n_layer)


def flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls (forward + backward) + attention."""
    n = config.num_params() - config.n_ctx * config.n_embd  # position embeddings do no matmul
    return 6 * n + 12 * config.n_layer * config.n_embd * seq


def batches(args: argparse.Namespace, config, count: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(0, config.n_vocab, (args.batch, args.seq + 1)) for _ in range(count)]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# -- the sides, each run in a child process -------------------------------------------------


def run_matmul(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    n = 512 if args.tiny else 4096
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.dot)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return {"matmul_flops_per_s": 2 * n**3 / statistics.median(times), "n": n}


def timed_steps(times: list[float]) -> dict:
    """Median step time and the slowest timed step over it."""
    median = statistics.median(times)
    return {"step_s": median, "slowest_over_median": max(times) / median, "steps_s": times}


def run_finetune(args: argparse.Namespace) -> dict:
    """``python -m gpt2jax finetune``, the command itself (it restarts itself with its host
    settings, :mod:`gpt2jax.host_malloc`); step times from its metrics.jsonl."""
    import tempfile

    from gpt2jax.host_malloc import HUGE_PAGES_NOTE

    config = shape(args)
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        data = os.path.join(tmp, "text.txt")
        with open(TEXT, encoding="utf-8") as f:  # enough text for every step's windows
            text = f.read()
        with open(data, "w", encoding="utf-8") as f:
            f.write(text * (1 + (args.steps + 2) * args.batch * (args.seq + 1) // len(text)))
        if args.tiny or args.layers:  # no preset of this shape: a model directory of it
            from gpt2jax.model import init_params
            from gpt2jax.store.model_dir import save_model_dir

            start = [os.path.join(tmp, "model")]
            save_model_dir(start[0], config, init_params(config, 0))
        else:
            start = ["--init", "124M"]
        out = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "gpt2jax", "finetune", *start, "--data", data, "--out", out]
        cmd += ["--steps", str(args.steps + 1), "--batch-size", str(args.batch)]
        cmd += ["--seq-len", str(args.seq), "--lr", "1e-4", "--schedule", "constant"]
        cmd += ["--weight-decay", "0.01", "--clip", "1.0", "--sample-every", "0"]
        cmd += ["--eval-every", "0", "--eval-batches", "1"]
        t = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t
        if run.returncode:
            sys.exit(f"finetune exited with {run.returncode}:\n{run.stderr[-3000:]}")
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
    elapsed = [r["elapsed"] for r in records if "tokens_per_s" in r]
    times = [elapsed[i + 1] - elapsed[i] for i in range(len(elapsed) - 1)]  # after the first
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        **timed_steps(times),
        "first_step_s": elapsed[0],
        "wall_s": wall,
        "loss": [r for r in records if "tokens_per_s" in r][-1]["loss"],
        "peak_rss_gib": usage.ru_maxrss / 2**20,
        "process_sys_s": usage.ru_stime,  # the whole command: start-up and compile included
        "process_minor_faults": usage.ru_minflt,
        "huge_pages": HUGE_PAGES_NOTE in run.stderr,
    }


def run_step(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from gpt2jax.model import GPT2, init_params
    from gpt2jax.train.optim import learning_rate_schedule, make_optimizer
    from gpt2jax.train.step import AXIS, DataParallel, TrainState, make_train_step

    config = shape(args)
    schedule = learning_rate_schedule(1e-4, 0, 1000, "constant")
    tx = make_optimizer("adamw", schedule, weight_decay=0.01, clip=1.0)
    dp = DataParallel()
    step = dp.compile_train_step(make_train_step(GPT2(config), tx, axis_name=AXIS))
    state = dp.replicate(TrainState.create(init_params(config, 0), tx, 0))
    data = [dp.shard(b.astype(np.int32)) for b in batches(args, config, args.steps + 1)]
    t = time.perf_counter()
    state, metrics = step(state, data[0])
    jax.block_until_ready((state, metrics))
    first = time.perf_counter() - t
    times = []
    for b in data[1:]:
        t = time.perf_counter()
        state, metrics = step(state, b)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return {
        **timed_steps(times),
        "compile_s": first - median,
        "loss": float(metrics["loss"]),
        "peak_rss_gib": peak_rss_gib(),
        "device": str(jax.devices()[0]),
    }


def run_torch(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    config = shape(args)
    hf = {
        k: v for k, v in config.to_hf_config().items() if k not in ("architectures", "model_type")
    }
    hf.update(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    data = [torch.from_numpy(b) for b in batches(args, config, args.steps + 1)]

    def step(b):
        opt.zero_grad(set_to_none=True)
        logits = model(b[:, :-1]).logits  # the same T inputs and T targets as ours
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, config.n_vocab), b[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    t = time.perf_counter()
    step(data[0])
    first = time.perf_counter() - t
    times = []
    for b in data[1:]:
        t = time.perf_counter()
        loss = step(b)
        times.append(time.perf_counter() - t)
    return {
        **timed_steps(times),
        "first_step_s": first,
        "loss": loss,
        "peak_rss_gib": peak_rss_gib(),
        "threads": torch.get_num_threads(),
    }


# -- the parent -------------------------------------------------------------------------------


def child(args: argparse.Namespace, side: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--batch", str(args.batch)]
    cmd += ["--seq", str(args.seq), "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
    cmd += ["--layers", str(args.layers)] if args.layers else []
    env = None
    if side == "step":  # the host settings finetune restarts itself with (none for torch)
        from gpt2jax.host_malloc import host_environment

        env = host_environment()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        sys.exit(f"bench_train: the {side} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side:
        run = {
            "matmul": run_matmul, "finetune": run_finetune, "step": run_step, "torch": run_torch
        }[args.side]  # fmt: skip
        print(json.dumps(run(args)))
        return
    config = shape(args)
    tokens = args.batch * args.seq
    rate = child(args, "matmul")["matmul_flops_per_s"]
    rounds = []
    for i in range(args.rounds):  # the order rotates, so that no side always runs first
        order = SIDES[i % len(SIDES) :] + SIDES[: i % len(SIDES)]
        rounds.append({side: child(args, side) for side in order})
        for r in rounds[-1].values():
            r["tokens_per_s"] = tokens / r["step_s"]
    fpt = flops_per_token(config, args.seq)
    name = ("tiny" if args.tiny else "124M") + (
        f" ({config.n_layer} layers)" if args.layers else ""
    )
    print(
        f"{name} float32, batch {args.batch} x {args.seq} tokens, AdamW, medians of "
        f"{args.steps} steps, {args.rounds} round(s); matmul rate {rate / 1e9:.1f} GFLOP/s, "
        f"{fpt / 1e6:.1f} MFLOP per token"
    )
    print(
        f"{'':10} {'tokens/s':>9} {'step s':>8} {'slowest':>8} {'compile s':>10} "
        f"{'peak RSS':>9} {'MFU':>6}"
    )
    sides = {}
    for side in SIDES:  # over rounds: the median step, the slowest step, the largest peak
        runs = [r[side] for r in rounds]
        step_s = statistics.median(r["step_s"] for r in runs)
        sides[side] = {
            "step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "mfu": fpt * tokens / step_s / rate,
            "slowest_over_median": max(r["slowest_over_median"] for r in runs),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
        }
        compile_s = {"finetune": "ahead", "torch": "eager"}.get(side)
        compile_s = compile_s or f"{statistics.median(r['compile_s'] for r in runs):.1f}"
        r = sides[side]
        print(
            f"{side:10} {r['tokens_per_s']:9.1f} {r['step_s']:8.3f} "
            f"{r['slowest_over_median']:7.2f}x {compile_s:>10} "
            f"{r['peak_rss_gib']:7.2f}GiB {100 * r['mfu']:5.1f}%"
        )
    huge = rounds[0]["finetune"]["huge_pages"]
    print(
        "finetune and step ran with "
        + ("transparent huge pages (glibc.malloc.hugetlb=1)" if huge else "glibc's defaults")
        + "; torch in this script's environment"
    )
    # Each round's sides over its torch side (they ran minutes apart, not hours), then the median.
    per_round = {
        side: [r[side]["tokens_per_s"] / r["torch"]["tokens_per_s"] for r in rounds]
        for side in ("finetune", "step")
    }
    ratios = {side: statistics.median(v) for side, v in per_round.items()}
    print(
        f"tokens/s over torch's (median of the rounds' ratios): finetune "
        f"{ratios['finetune']:.2f}x (target >= 1.0x, stretch 1.1x), bare step "
        f"{ratios['step']:.2f}x; finetune's slowest timed step "
        f"{sides['finetune']['slowest_over_median']:.2f}x its median (target <= 1.2x)"
    )
    if args.rounds > 1:
        print(
            "each round: finetune "
            + ", ".join(f"{x:.2f}x" for x in per_round["finetune"])
            + "; bare step "
            + ", ".join(f"{x:.2f}x" for x in per_round["step"])
        )
    summary = {"shape": name, "batch": args.batch, "seq": args.seq, "matmul_flops_per_s": rate}
    print(json.dumps({**summary, **sides, "ratios": ratios, "rounds": rounds}))


if __name__ == "__main__":
    main()
