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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
