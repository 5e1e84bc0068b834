"""Benchmark: what the attention implementation does to a training step's memory.

Compiles the real ``finetune`` training step (:class:`gpt2jax.train.memory.planner.Planner`: the
same recipe, on abstract shapes, nothing allocated) of GPT-2 124M (12 layers, width 768, 12
heads), batch 1, float32, no remat, AdamW, for each attention implementation that runs here and
each sequence length, and prints XLA's memory analysis: the step's temporaries (activations kept
for the backward pass, scores, gradients in flight), one layer's share of them (the step of all
layers minus the step of one, over the difference in layers: what the layers add, without the
logits, the loss and the embeddings' gradients, which no attention changes) and the predicted
peak (arguments + outputs + temporaries - aliased). At 2048 tokens the model's context is
widened to 2048 (same width). First, the attention alone: forward and gradient of one layer's
attention (12 heads of 64, batch 1, float32), the issue's measure of the blockwise step.

    python scripts/bench_attention_memory.py                  # 1024 and 2048 tokens (minutes)
    python scripts/bench_attention_memory.py --seq-len 256 --layers 2   # quick look
    python scripts/bench_attention_memory.py --speed --seq-len 1024     # time, not memory

``--speed`` instead runs the attention-alone forward and gradient, the implementations
interleaved, and prints each one's median time and its ratio to ``xla``'s.
"""

from __future__ import annotations

import argparse
import dataclasses

MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--implementations", nargs="+", default=["xla", "blockwise"])
    parser.add_argument("--speed", action="store_true", help="time the attention instead")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.speed:
        return speed(args.seq_len, args.implementations, args.repeats)

    import jax

    from gpt2jax.config import get_preset
    from gpt2jax.train.memory.planner import Candidate, Planner
    from gpt2jax.train.settings import MemorySettings

    print(f"jax {jax.__version__}, backend {jax.default_backend()}; GPT-2 124M width, "
          f"{args.layers} layers, batch 1, float32, remat none, AdamW")  # fmt: skip
    print(f"{'seq':>5} {'attention':<10} {'attention alone: forward + gradient':>36}")
    for seq in args.seq_len:
        alone = {impl: attention_temporaries(impl, seq) for impl in args.implementations}
        for impl, temp in alone.items():
            print(f"{seq:>5} {impl:<10} {temp / MiB:>32,.1f} MiB")
        if "xla" in alone and "blockwise" in alone:
            print(f"{seq:>5} blockwise / xla: {alone['blockwise'] / alone['xla']:.3f}")
    print(f"{'seq':>5} {'attention':<10} {'temporaries':>12} {'per layer':>10} {'peak':>10} "
          f"{'compile':>8}")  # fmt: skip
    for seq in args.seq_len:
        temps, layers = {}, {}
        for impl in args.implementations:
            settings = MemorySettings(compute_dtype="float32", attention=impl)
            found = {}
            for n_layer in (args.layers, 1):
                config = dataclasses.replace(
                    get_preset("124M"), n_ctx=max(1024, seq), n_layer=n_layer
                )
                planner = Planner(config, seq, runtime=0)
                found[n_layer] = planner.predict(Candidate(settings, batch_size=1, grad_accum=1))
            peak, details = found[args.layers]
            temps[impl] = details["temporaries"]
            layers[impl] = (temps[impl] - found[1][1]["temporaries"]) / (args.layers - 1)
            print(
                f"{seq:>5} {impl:<10} {temps[impl] / MiB:>8,.0f} MiB {layers[impl] / MiB:>6,.0f} "
                f"MiB {peak / MiB:>6,.0f} MiB {details['compile_s']:>7.1f}s",
                flush=True,
            )
        if "xla" in temps and "blockwise" in temps:
            print(f"{seq:>5} blockwise / xla: step temporaries "
                  f"{temps['blockwise'] / temps['xla']:.3f}, per layer "
                  f"{layers['blockwise'] / layers['xla']:.3f}")  # fmt: skip


def attention_temporaries(impl: str, seq: int) -> int:
    """XLA's temporaries of the forward and gradient of one attention call (12 x seq x 64)."""
    import jax
    import jax.numpy as jnp

    from gpt2jax import attention

    q = jax.ShapeDtypeStruct((1, 12, seq, 64), jnp.float32)

    def loss(q, k, v):
        return attention.attend(q, (k,), (v,), None, implementation=impl).sum()

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, q, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def speed(seq_lens: list[int], implementations: list[str], repeats: int) -> None:
    """Median time of the attention's forward and gradient per implementation, interleaved."""
    import time

    import jax

    from gpt2jax import attention

    print(f"jax {jax.__version__}, backend {jax.default_backend()}; attention alone, 12 heads "
          f"of 64, batch 1, float32, forward + gradient, median of {repeats}")  # fmt: skip
    for seq in seq_lens:
        q, k, v = (jax.random.normal(key, (1, 12, seq, 64))
                   for key in jax.random.split(jax.random.PRNGKey(0), 3))  # fmt: skip
        fns = {}
        for impl in implementations:

            def loss(q, k, v, impl=impl):
                return attention.attend(q, (k,), (v,), None, implementation=impl).sum()

            fns[impl] = jax.jit(jax.grad(loss, (0, 1, 2)))
            jax.block_until_ready(fns[impl](q, k, v))  # compiled outside the timing
        times: dict[str, list[float]] = {impl: [] for impl in implementations}
        for _ in range(repeats):
            for impl, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times[impl].append(time.perf_counter() - start)
        median = {impl: sorted(t)[len(t) // 2] for impl, t in times.items()}
        for impl, t in median.items():
            ratio = f"{t / median['xla']:.2f}x xla" if "xla" in median else ""
            print(f"{seq:>5} {impl:<10} {t * 1000:>8.0f} ms  {ratio}", flush=True)


if __name__ == "__main__":
    main()
