"""Benchmark: text generation speed of ``gpt2jax.generate`` against Hugging Face's PyTorch GPT-2.

Random weights of a preset's shape (default 124M), random 32-token prompts, 128 new tokens,
top-k sampling (k=40), every row forced to its full length (no ``<|endoftext|>`` stop). For
each parameter dtype and batch size it reports, medians over ``--repeats`` runs:

* ``compile_s``: the first call's extra time (compiling the prefill and the decoding loop);
* ``ttft_ms``: time to the first token (prompt pass + first sample), seen by a streaming
  callback;
* ``tok/s``: new tokens per second over the whole call (batch rows included), and
  ``stream tok/s``, the same when streaming (the loop runs in chunks);
* ``bound tok/s``: the memory-bandwidth bound, ``batch * bandwidth / bytes read per step``,
  where a step reads every weight once (``wpe`` aside) and the bandwidth is measured here by a
  compiled reduction over a buffer far larger than the caches;

and the same numbers for ``transformers.GPT2LMHeadModel.generate`` (float32, KV cache on,
the same weights, top-k sampling) in the same run, with the ratios. Run it alone on an idle
machine::

    python scripts/bench_generate.py                    # 124M, batch 1 and 8, f32 and bf16
    python scripts/bench_generate.py --tiny             # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.config import EOT_TOKEN, GPT2Config, get_preset
from gpt2jax.convert.mapping import our_shapes, to_theirs, unflatten
from gpt2jax.generation.host import generate
from gpt2jax.loader import Pretrained
from gpt2jax.tokenizer import Tokenizer

TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "gpt2-tokenizer")
TINY = GPT2Config(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2)


def random_params(config: GPT2Config, seed: int = 0) -> dict:
    """GPT-2-like random float32 params (normal 0.02, LayerNorm gains 1) as numpy arrays."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in our_shapes(config).items():
        if name.endswith("/g"):
            flat[name] = np.ones(shape, np.float32)
        elif name.endswith("/b"):
            flat[name] = np.zeros(shape, np.float32)
        else:
            flat[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    return unflatten(flat)


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of a compiled sum over a float32 buffer of ``nbytes``."""
    buf = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(lambda x: x.sum())
    total(buf).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        total(buf).block_until_ready()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


def weight_bytes(params: dict) -> int:
    """Bytes one decoding step reads: every weight once; of ``wpe`` a single row."""
    return sum(x.nbytes for x in jax.tree.leaves(params)) - params["wpe"].nbytes


def bench_ours(model: Pretrained, prompts: list[list[int]], args) -> dict:
    kwargs = dict(max_new_tokens=args.new_tokens, top_k=args.top_k, stop_at_eot=False)
    kwargs.update(batch_size=len(prompts), seed=0)

    def run(stream: bool) -> tuple[float, float]:
        first: list[float] = []
        start = time.perf_counter()

        def on_token(i, ids, text):
            if not first:
                first.append(time.perf_counter() - start)

        out = generate(model, prompts, on_token=on_token if stream else None, **kwargs)
        seconds = time.perf_counter() - start
        assert all(len(g.tokens) == args.new_tokens for g in out)
        return seconds, first[0] if first else float("nan")

    first_call, _ = run(stream=False)
    plain = statistics.median(run(stream=False)[0] for _ in range(args.repeats))
    streamed = [run(stream=True) for _ in range(args.repeats)]
    n = len(prompts) * args.new_tokens
    return {
        "compile_s": first_call - plain,
        "ttft_ms": 1e3 * statistics.median(t for _, t in streamed),
        "tok/s": n / plain,
        "stream tok/s": n / statistics.median(s for s, _ in streamed),
    }


def hf_model(params: dict, config: GPT2Config):
    import torch
    import transformers

    hf = {
        k: v for k, v in config.to_hf_config().items() if k not in ("architectures", "model_type")
    }
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf)).eval()
    state = {
        f"transformer.{k}": torch.from_numpy(np.array(v))
        for k, v in to_theirs(params, config, "hf")
    }
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=False)
    return model


def bench_torch(model, prompts: list[list[int]], args) -> dict:
    import torch

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, do_sample=True, top_k=args.top_k, max_new_tokens=n,
                min_new_tokens=n, pad_token_id=EOT_TOKEN, use_cache=True,
            )  # fmt: skip
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start

    torch.manual_seed(0)
    first_call = run(args.new_tokens)
    plain = statistics.median(run(args.new_tokens) for _ in range(args.repeats))
    ttft = statistics.median(run(1) for _ in range(args.repeats))
    n = len(prompts) * args.new_tokens
    return {"compile_s": first_call - plain, "ttft_ms": 1e3 * ttft, "tok/s": n / plain}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="124M", help="preset shape of the random model")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--dtypes", default="float32,bfloat16", help="parameter dtypes to run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="buffer of the bandwidth test")
    p.add_argument("--no-torch", action="store_true", help="skip transformers")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny model, few tokens")
    args = p.parse_args()
    if args.tiny:
        config = TINY
        args.prompt_len, args.new_tokens, args.repeats, args.bandwidth_mib = 8, 16, 1, 128
    else:
        config = get_preset(args.size)
        if args.layers:
            config = dataclasses.replace(config, n_layer=args.layers)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    dtypes = args.dtypes.split(",")

    print(f"model: {config}  devices: {jax.devices()}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, top-k {args.top_k}, "
          f"medians of {args.repeats}")  # fmt: skip
    bandwidth = read_bandwidth(args.bandwidth_mib << 20)
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s ({args.bandwidth_mib} MiB buffer)")

    params = random_params(config)
    tokenizer = Tokenizer.from_dir(TOKENIZER_DIR)
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, EOT_TOKEN, (max(batches), args.prompt_len)).tolist()

    rows = []
    torch_model = None if args.no_torch else hf_model(params, config)
    torch_rates = {}
    for batch in batches:
        if torch_model is not None:
            r = bench_torch(torch_model, prompts[:batch], args)
            torch_rates[batch] = r["tok/s"]
            bound = batch * bandwidth / weight_bytes(params)
            rows.append(("torch", "float32", batch, r, bound))
    for dtype in dtypes:
        typed = jax.tree.map(lambda x, d=dtype: jnp.asarray(x, d), params)
        model = Pretrained(config, typed, tokenizer, path="", kind="random")
        per_step = weight_bytes(typed)
        print(f"{dtype}: {per_step / 1e6:.0f} MB of weights read per decoding step")
        for batch in batches:
            r = bench_ours(model, prompts[:batch], args)
            rows.append(("gpt2jax", dtype, batch, r, batch * bandwidth / per_step))

    cols = ["impl", "dtype", "batch", "compile_s", "ttft_ms", "tok/s", "stream tok/s",
            "bound tok/s", "% of bound", "x torch f32"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for impl, dtype, batch, r, bound in rows:
        vs = r["tok/s"] / torch_rates[batch] if batch in torch_rates else float("nan")
        cells = [impl, dtype, str(batch), f"{r['compile_s']:.1f}", f"{r['ttft_ms']:.0f}",
                 f"{r['tok/s']:.1f}", f"{r.get('stream tok/s', float('nan')):.1f}", f"{bound:.1f}",
                 f"{100 * r['tok/s'] / bound:.0f}", f"{vs:.2f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
