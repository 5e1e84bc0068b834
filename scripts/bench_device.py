"""Benchmark: gpt2jax on whatever accelerator JAX sees, in one table.

Rows, all with the library's default settings for the device (compute dtype, attention, KV
cache dtype: what ``gpt2jax info`` prints), random weights (no download):

* ``train``: tokens/s and MFU of the ``finetune`` training step (the same recipe, optimizer and
  step, :mod:`gpt2jax.train.memory.build`), 124M and 355M, batch 8 x 1024 tokens; MFU = model FLOPs
  (6 N + 12 L T C per token, N without position embeddings) / the device's published dense
  peak for the compute dtype (:data:`PEAKS`; "n/a" where unknown, e.g. a CPU).
* ``generate``: tokens/s of the compiled KV-cache sampler (:func:`gpt2jax.generation.decoding.
  generate_tokens`: prefill + ``while_loop``), 16-token prompts, 256 new tokens, batch 1 and 8;
  at batch 1 also the bandwidth floor (every weight read once per token at the published
  memory bandwidth) and how far above it the time per token is.
* ``1558M --memory 16GB``: ``gpt2jax finetune --init 1558M --memory 16GB`` through the command
  line (``gpt2jax.cli.main`` in a fresh process, 2 steps), and the device allocator's
  ``peak_bytes_in_use`` after it (peak RSS on a CPU).
* ``torch``: the same training step and sampling with ``transformers`` + torch (bf16 autocast,
  SDPA attention, AdamW; ``generate`` with its defaults) when torch sees a CUDA GPU; the ratio
  column is gpt2jax / torch.

    python scripts/bench_device.py                   # the full table (needs the tokenizer:
                                                     # tiktoken's cache or network)
    python scripts/bench_device.py --smoke           # tiny sizes, any machine (CI runs it)
    python scripts/bench_device.py --json out.json   # also the numbers as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Published dense peaks per JAX device, TFLOP/s: (16-bit, float32 as JAX runs it: TF32 on
#: NVIDIA GPUs of compute capability >= 8.0), and memory bandwidth in TB/s. Matched against
#: ``device_kind`` (first match wins). TPU v2/v3 devices are single cores (half a chip).
PEAKS: tuple[tuple[str, float, float, float], ...] = (
    ("H200", 989.0, 494.7, 4.8),
    ("H100 PCIe", 756.0, 378.0, 2.0),
    ("H100", 989.0, 494.7, 3.35),
    ("A100-SXM4-80GB", 312.0, 156.0, 2.04),
    ("A100", 312.0, 156.0, 1.56),
    ("L40S", 362.0, 183.0, 0.86),
    ("L4", 121.0, 60.0, 0.3),
    ("A10G", 70.0, 35.0, 0.6),
    ("A10", 125.0, 62.5, 0.6),
    ("RTX 4090", 165.0, 82.6, 1.01),
    ("V100", 125.0, 15.7, 0.9),
    ("T4", 65.0, 8.1, 0.32),
    ("TPU v6 lite", 918.0, 918.0, 1.64),
    ("TPU v5 lite", 197.0, 197.0, 0.82),
    ("TPU v5p", 459.0, 459.0, 2.76),
    ("TPU v5", 459.0, 459.0, 2.76),
    ("TPU v4", 275.0, 275.0, 1.2),
    ("TPU v3", 61.5, 61.5, 0.45),
    ("TPU v2", 22.5, 22.5, 0.35),
)


@dataclasses.dataclass
class Sizes:
    train: tuple[str, ...]
    gen: tuple[str, ...]
    seq_len: int
    batch: int
    steps: int
    new_tokens: int
    prompt: int


FULL = Sizes(("124M", "355M"), ("124M", "355M"), 1024, 8, 10, 256, 16)
SMOKE = Sizes(("tiny",), ("tiny",), 32, 2, 2, 8, 4)


def config_of(name: str):
    from gpt2jax.config import GPT2Config, get_preset

    if name == "tiny":
        return GPT2Config(n_vocab=512, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
    return get_preset(name)


def peak_of(kind: str) -> tuple[float, float, float] | None:
    return next(((a, b, c) for key, a, b, c in PEAKS if key.lower() in kind.lower()), None)


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (N without position embeddings) + 12 L T C (attention)."""
    n = config.num_params() - config.n_ctx * config.n_embd
    return 6 * n + 12 * config.n_layer * seq_len * config.n_embd


def bench_train(name: str, sizes: Sizes) -> dict:
    """tokens/s of ``steps`` training steps (after two warm-up steps, compilation included)."""
    import jax
    import numpy as np

    from gpt2jax.device import needs_loss_scaling, resolve_compute_dtype
    from gpt2jax.loss_scale import LossScale
    from gpt2jax.model import init_params
    from gpt2jax.train.memory.build import build
    from gpt2jax.train.optim import learning_rate_schedule
    from gpt2jax.train.settings import MemorySettings
    from gpt2jax.train.step import AXIS, DataParallel, TrainState, make_train_step

    config = config_of(name)
    settings = MemorySettings()  # the defaults: compute dtype and attention "auto"
    dtype = resolve_compute_dtype(settings.compute_dtype)
    schedule = learning_rate_schedule(1e-4, 0, 1000, "cosine")
    recipe = build(config, settings, schedule)
    dp = DataParallel()
    dp.check_batch(sizes.batch, 1)
    axis = AXIS if dp.num_devices > 1 else None
    step = make_train_step(recipe.model, recipe.tx, loss_fn=recipe.loss_fn, schedule=schedule,
                           axis_name=axis, accumulate=recipe.accumulate)  # fmt: skip
    p_step = dp.compile_train_step(step)
    scaler = LossScale.create() if needs_loss_scaling(dtype) else None

    def create():
        trained, frozen = recipe.split(init_params(config, 0), 0)
        return TrainState.create(trained, recipe.tx, 0, frozen=frozen, loss_scale=scaler)

    state = dp.init(create)
    rng = np.random.default_rng(0)
    batch = dp.shard(rng.integers(0, config.n_vocab, (sizes.batch, sizes.seq_len + 1), np.int32))
    start = time.perf_counter()
    for _ in range(2):
        state, metrics = p_step(state, batch)
    jax.block_until_ready(metrics)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(sizes.steps):
        state, metrics = p_step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / sizes.steps
    tokens = sizes.batch * sizes.seq_len / seconds
    kind = jax.devices()[0].device_kind
    peak = peak_of(kind)
    mfu = None
    if peak is not None and jax.default_backend() != "cpu":
        tflops = peak[0] if dtype in ("bfloat16", "float16") else peak[1]
        mfu = tokens * flops_per_token(config, sizes.seq_len) / (tflops * 1e12 * dp.num_devices)
    loss = float(np.asarray(metrics["loss"]).reshape(-1)[0])
    return {"tokens_per_s": tokens, "mfu": mfu, "step_s": seconds, "warmup_s": warm,
            "compute_dtype": dtype, "loss": loss}  # fmt: skip


def bench_generate(name: str, batch: int, sizes: Sizes) -> dict:
    """tokens/s of the compiled sampler (second call; the first compiles)."""
    import jax
    import numpy as np

    from gpt2jax.device import kv_cache_dtype, resolve_compute_dtype
    from gpt2jax.dtypes import dtype as dtype_of
    from gpt2jax.generation.decoding import generate_tokens, layer_params
    from gpt2jax.generation.sampling import Sampler
    from gpt2jax.model import init_params

    config = config_of(name)
    dtype = dtype_of(resolve_compute_dtype("auto"))
    params = layer_params(init_params(config, 0))  # float32, as OpenAI's weights load
    rng = np.random.default_rng(0)
    ids = jax.device_put(rng.integers(0, config.n_vocab, (batch, sizes.prompt), np.int32))
    pad = jax.device_put(np.zeros(batch, np.int32))
    keys = jax.random.split(jax.random.PRNGKey(0), batch)
    sampler = Sampler.make(1.0, 0, 1.0, False)

    def run():
        tokens, _ = generate_tokens(
            config, params, ids, pad, keys, max_new_tokens=sizes.new_tokens, sampler=sampler,
            dtype=dtype, attention="auto", cache_dtype=kv_cache_dtype(dtype),
        )  # fmt: skip
        return jax.block_until_ready(tokens)

    start = time.perf_counter()
    run()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    out = {"tokens_per_s": batch * sizes.new_tokens / seconds, "warmup_s": warm}
    peak = peak_of(jax.devices()[0].device_kind)
    if batch == 1 and peak is not None and jax.default_backend() != "cpu":
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        floor = peak[2] * 1e12 / weight_bytes  # tokens/s if every weight is read once a token
        out.update(floor_tokens_per_s=floor, over_floor=floor / out["tokens_per_s"])
    return out


def bench_cli_memory(smoke: bool, work: str) -> dict:
    """``gpt2jax finetune ... --memory`` through the CLI in a fresh process; its peak memory."""
    data = os.path.join(work, "data.txt")
    text = (ROOT / "tests" / "fixtures" / "english.txt").read_text(encoding="utf-8")
    with open(data, "w", encoding="utf-8") as f:
        f.write(text * (1 if smoke else 20))
    if smoke:
        model = [str(ROOT / "tests" / "fixtures" / "openai_tiny")]
        memory = "2GB"  # the settings fixed, so the planner compiles one candidate
        extra = ["--seq-len", "16", "--batch-size", "2", "--grad-accum", "1", "--remat", "none",
                 "--optimizer", "adamw", "--opt-state-dtype", "float32", "--loss-chunk",
                 "0"]  # fmt: skip
    else:
        model, memory, extra = ["--init", "1558M"], "16GB", []
    argv = ["finetune", *model, "--data", data, "--out", os.path.join(work, "run"), "--steps",
            "2", "--memory", memory, "--eval-every", "0", "--sample-every", "0",
            "--val-fraction", "0", *extra]  # fmt: skip
    code = (
        "import json, resource, sys, jax\n"
        "from gpt2jax.cli.main import main\n"
        "rc = main(sys.argv[1:])\n"
        "stats = jax.devices()[0].memory_stats() or {}\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print('BENCH ' + json.dumps({'rc': rc, 'peak': stats.get('peak_bytes_in_use'),"
        " 'limit': stats.get('bytes_limit'), 'rss': rss}))\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"gpt2jax {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    result = json.loads(line[6:])
    chosen = [x for x in out.stderr.splitlines() if x.startswith("chosen")]
    result.update(seconds=time.perf_counter() - start, chosen=chosen[-1] if chosen else "")
    return result


def bench_torch(name: str, sizes: Sizes) -> dict | None:
    """transformers + torch on the same GPU: training tokens/s (bf16 autocast, AdamW, SDPA) and
    sampling tokens/s at batch 1 and 8; None without CUDA torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    cfg = config_of(name)
    hf = transformers.GPT2Config(
        vocab_size=cfg.n_vocab, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(hf).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.n_vocab, (sizes.batch, sizes.seq_len), device="cuda")

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        train_step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(sizes.steps):
        train_step()
    torch.cuda.synchronize()
    out = {"train_tokens_per_s": sizes.batch * sizes.seq_len * sizes.steps
           / (time.perf_counter() - start)}  # fmt: skip
    model.eval()
    for batch in (1, 8):
        prompt = torch.randint(0, cfg.n_vocab, (batch, sizes.prompt), device="cuda")
        kw = dict(max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens,
                  do_sample=True, pad_token_id=0)  # fmt: skip
        with torch.no_grad():
            model.generate(prompt, **kw)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(prompt, **kw)
            torch.cuda.synchronize()
        out[f"gen{batch}_tokens_per_s"] = batch * sizes.new_tokens / (time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI, any machine)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--skip-cli", action="store_true", help="leave out the 1558M CLI row")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    rows: list[tuple[str, str, str, str]] = []  # (what, gpt2jax, torch, ratio)
    results: dict = {"train": {}, "generate": {}}

    def show(what, ours, theirs=None, ratio=None):
        row = (what, ours, theirs or "n/a", f"{ratio:.2f}" if ratio else "")
        rows.append(row)
        print(f"  {row[0]:<32} {row[1]:<40} {row[2]:<14} {row[3]}", flush=True)

    # Order matters on a GPU: the CLI's own process first, then torch, then this process's JAX,
    # whose allocator then holds most of the device's memory.
    cli_row = None
    if not args.skip_cli:
        with tempfile.TemporaryDirectory() as work:
            r = bench_cli_memory(args.smoke, work)
        results["cli"] = r
        what = "tiny --memory 2GB (CLI)" if args.smoke else "1558M --memory 16GB (CLI)"
        if r["peak"] is not None:
            text = f"peak {r['peak'] / 1e9:.2f} GB (peak_bytes_in_use)"
        else:
            text = f"peak RSS {r['rss'] / 1e9:.2f} GB (no device allocator)"
        cli_row = (what, text + f", {r['seconds']:.0f}s")
        print(f"  {r['chosen']}", flush=True)
    torch_results = {}
    for name in dict.fromkeys(sizes.train + sizes.gen):
        torch_results[name] = None if args.smoke else bench_torch(name, sizes)
        if torch_results[name] is not None:
            import torch

            torch.cuda.empty_cache()  # its memory back before JAX allocates
    results["torch"] = torch_results

    import jax

    import gpt2jax
    from gpt2jax.device import summary

    info = results["device"] = summary()
    print(f"gpt2jax {gpt2jax.__version__}, jax {jax.__version__}: {info['count']} x "
          f"{info['device']} ({info['platform']}); defaults: compute {info['compute_dtype']}, "
          f"attention {info['attention_train_1024']} (training, 1024 tokens), "
          f"kv cache {info['kv_cache_dtype']}", flush=True)  # fmt: skip
    for name in sizes.train:
        r = bench_train(name, sizes)
        results["train"][name] = r
        mfu = f", MFU {r['mfu'] * 100:.1f}%" if r["mfu"] is not None else ", MFU n/a"
        t = torch_results.get(name)
        theirs = t and t["train_tokens_per_s"]
        show(f"train {name} {sizes.batch}x{sizes.seq_len}",
             f"{r['tokens_per_s']:,.0f} tok/s{mfu} ({r['compute_dtype']})",
             f"{theirs:,.0f} tok/s" if theirs else None,
             r["tokens_per_s"] / theirs if theirs else None)  # fmt: skip
    for name in sizes.gen:
        for batch in (1, 8):
            r = bench_generate(name, batch, sizes)
            results["generate"][f"{name}/{batch}"] = r
            floor = (f", {r['over_floor']:.2f}x the bandwidth floor"
                     if "over_floor" in r else "")  # fmt: skip
            t = torch_results.get(name)
            theirs = t and t[f"gen{batch}_tokens_per_s"]
            show(f"generate {name} batch {batch}", f"{r['tokens_per_s']:,.0f} tok/s{floor}",
                 f"{theirs:,.0f} tok/s" if theirs else None,
                 r["tokens_per_s"] / theirs if theirs else None)  # fmt: skip
    if cli_row is not None:
        show(*cli_row)
    print()
    print(f"| {'what':<32} | {'gpt2jax':<40} | {'torch':<14} | ratio |")
    print(f"|{'-' * 34}|{'-' * 42}|{'-' * 16}|-------|")
    for row in rows:
        print(f"| {row[0]:<32} | {row[1]:<40} | {row[2]:<14} | {row[3]:<5} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
