"""Training throughput: gpt2jax's pmapped train step vs transformers + torch.optim.AdamW.

Usage::

    python scripts/bench_train.py                 # 124M shape, float32, batch 4 x 256 tokens
    python scripts/bench_train.py --tiny          # a smoke run of the script itself

Both sides train the same shape from random weights with AdamW (lr 1e-4, weight decay 0.01,
no dropout, float32) on the same random batches. Each side runs in its own child process, one
after the other, so that its peak RSS is its own and they do not compete for the cores. Reported
per side (medians over the timed steps): step time, tokens/s, compile time (JAX: the first call
minus a median step; torch runs eagerly), peak RSS, and model FLOPs utilisation: the model's
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--tiny", action="store_true", help="a small model and batch: smoke test")
    p.add_argument("--layers", type=int, help="override the number of layers (a quicker look)")
    p.add_argument("--side", choices=("jax", "torch", "matmul"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def shape(args: argparse.Namespace):
    import dataclasses

    from gpt2jax.config import PRESETS, GPT2Config

    config = PRESETS["124M"]
    if args.tiny:
        config = GPT2Config(n_vocab=2048, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
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


def run_jax(args: argparse.Namespace) -> dict:
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
        "step_s": median,
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
        "step_s": statistics.median(times),
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
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(f"bench_train: the {side} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side:
        run = {"matmul": run_matmul, "jax": run_jax, "torch": run_torch}[args.side]
        print(json.dumps(run(args)))
        return
    config = shape(args)
    tokens = args.batch * args.seq
    rate = child(args, "matmul")["matmul_flops_per_s"]
    sides = {"gpt2jax": child(args, "jax"), "torch": child(args, "torch")}
    fpt = flops_per_token(config, args.seq)
    name = ("tiny" if args.tiny else "124M") + (
        f" ({config.n_layer} layers)" if args.layers else ""
    )
    print(
        f"{name} float32, batch {args.batch} x {args.seq} tokens, AdamW, medians of "
        f"{args.steps} steps; matmul rate {rate / 1e9:.1f} GFLOP/s, "
        f"{fpt / 1e6:.1f} MFLOP per token"
    )
    print(f"{'':10} {'tokens/s':>9} {'step s':>8} {'compile s':>10} {'peak RSS':>9} {'MFU':>6}")
    for side, r in sides.items():
        r["tokens_per_s"] = tokens / r["step_s"]
        r["mfu"] = fpt * r["tokens_per_s"] / rate
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "eager"
        print(
            f"{side:10} {r['tokens_per_s']:9.1f} {r['step_s']:8.3f} {compile_s:>10} "
            f"{r['peak_rss_gib']:7.2f}GiB {100 * r['mfu']:5.1f}%"
        )
    ratio = sides["gpt2jax"]["tokens_per_s"] / sides["torch"]["tokens_per_s"]
    print(f"gpt2jax / torch tokens/s: {ratio:.2f}x")
    summary = {"shape": name, "batch": args.batch, "seq": args.seq, "matmul_flops_per_s": rate}
    print(json.dumps({**summary, **sides, "ratio": ratio}))


if __name__ == "__main__":
    main()
