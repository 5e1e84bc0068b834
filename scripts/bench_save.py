"""What a checkpoint save costs in memory on top of the train state, on the CPU (issue #11).

Builds an AdamW-shaped train state of a GPT-2 shape (the parameters drawn with
:func:`gpt2jax.init_params`, two moment trees of the same shape, all resident) and saves it once
with :class:`gpt2jax.store.runs.Checkpoints`, the writer ``gpt2jax finetune`` uses, waiting for the
write as a CPU run does. Prints the state's size and the peak resident memory the save added
(VmHWM, reset just before the save), as a fraction of the state: the figure
:meth:`gpt2jax.train.memory.planner.Planner.whole_run` counts for a save. One fresh process per
shape::

    python scripts/bench_save.py --n-embd 768 --n-layer 4      # the whole-run test's model
    python scripts/bench_save.py --n-embd 1024 --n-layer 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed)")
    args = p.parse_args(argv)

    from gpt2jax.host_malloc import return_freed_memory

    return_freed_memory()  # as gpt2jax finetune --memory does
    import jax

    from gpt2jax.config import GPT2Config
    from gpt2jax.model import init_params
    from gpt2jax.store import runs

    config = GPT2Config(
        n_vocab=50257, n_ctx=1024, n_embd=args.n_embd, n_head=args.n_embd // 64,
        n_layer=args.n_layer,
    )  # fmt: skip
    params = init_params(config, 0)
    # two moment trees, every page written (zeros would not be resident)
    opt = {f"m{i}": jax.tree.map(lambda x, i=i: x * (0.5 + i), params) for i in range(2)}
    jax.block_until_ready(opt)
    leaves = jax.tree.leaves((params, opt))
    state = sum(x.size * x.dtype.itemsize for x in leaves)
    largest = max(x.size * x.dtype.itemsize for x in leaves)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        ckpts = runs.Checkpoints(os.path.join(d, "run"), keep=1, largest_leaf=largest)
        time.sleep(0.5)
        before = _status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        ckpts.save(1, params, opt, {"step": 1})
        ckpts.wait()
        seconds = time.perf_counter() - start
        extra = _status("VmHWM:") - before
        after = _status("VmRSS:") - before
        ckpts.close()
    result = {
        "n_embd": args.n_embd, "n_layer": args.n_layer, "state_gb": round(state / 1e9, 3),
        "largest_leaf_gb": round(largest / 1e9, 3),
        "save_concurrent_gb": runs.save_concurrent_gb(largest),
        "save_peak_extra_gb": round(extra / 1e9, 3), "extra_over_state": round(extra / state, 3),
        "resident_after_gb": round(after / 1e9, 3), "seconds": round(seconds, 1),
        "orbax": __import__("orbax.checkpoint").checkpoint.__version__,
    }  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
