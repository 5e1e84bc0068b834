"""Benchmark: convert an OpenAI-format TF checkpoint of a GPT-2 size (random weights).

Writes a random checkpoint of the chosen size under OpenAI's names (with our own bundle writer,
since the benchmark must not need TensorFlow), then measures, in fresh processes:

* reading every file of the checkpoint once (the floor any converter pays),
* ``gpt2jax convert`` (CRC-checked read, re-layout, orbax save): seconds, MB/s, peak RSS,
* the peak RSS of a process that only imports what the converter imports (the fixed cost).

Targets (issue 2): conversion within 2x the read time; peak RSS under 1.5x the checkpoint size.

    python scripts/bench_convert.py --size 124M
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from gpt2jax.config import get_preset
from gpt2jax.convert.mapping import their_shapes
from gpt2jax.formats.tf_bundle import write_bundle


def write_random_checkpoint(path: str, size: str) -> int:
    config = get_preset(size)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = their_shapes(config, "openai")

    def tensors():
        for name in sorted(shapes):
            yield name, rng.standard_normal(shapes[name], dtype=np.float32) * 0.02

    write_bundle(os.path.join(path, "model.ckpt"), tensors())
    with open(os.path.join(path, "hparams.json"), "w") as f:
        json.dump(config.to_hparams(), f)
    with open(os.path.join(path, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n')
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def run_child(code: str) -> tuple[float, int]:
    """Runs ``python -c code`` in a fresh process: (wall seconds, peak RSS bytes of the child)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak * 1024


def drop_caches() -> bool:
    """Empties the OS page cache (root on Linux) so that a read comes from the disk."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def timed(code: str, repeats: int, cold: bool) -> tuple[float, int]:
    """Median wall seconds of ``repeats`` fresh runs (page cache dropped first when ``cold``)."""
    walls, peak = [], 0
    for _ in range(repeats):
        if cold:
            drop_caches()
        wall, peak = run_child(code)
        walls.append(wall)
    return float(np.median(walls)), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="124M", help="124M, 355M, 774M or 1558M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()

    scratch = tempfile.mkdtemp(prefix="bench_convert-", dir=args.dir)
    src, dst = os.path.join(scratch, "openai"), os.path.join(scratch, "gpt2jax")
    try:
        nbytes = write_random_checkpoint(src, args.size)
        print(f"checkpoint: {args.size}, {nbytes / 2**20:,.0f} MiB in {src}")

        read_code = (
            "import os\n"
            f"d = {src!r}\n"
            "buf = bytearray(16 << 20)\n"
            "for f in sorted(os.listdir(d)):\n"
            "    with open(os.path.join(d, f), 'rb', buffering=0) as fh:\n"
            "        while fh.readinto(buf): pass\n"
        )
        convert_code = (
            "import sys, shutil\n"
            "from gpt2jax.cli.main import main\n"
            f"shutil.rmtree({dst!r}, ignore_errors=True)\n"
            f"sys.exit(main(['convert', {src!r}, {dst!r}]))\n"
        )
        import_code = (
            "import gpt2jax.cli.main, gpt2jax.store.model_dir, gpt2jax.convert.openai_tf, "
            "orbax.checkpoint, jax; jax.numpy.zeros(1).block_until_ready()"
        )
        # RUSAGE_CHILDREN reports the largest child so far, so measure the small ones first.
        _, import_rss = run_child(import_code)
        mb, n = nbytes / 1e6, args.repeats
        cold_ok = drop_caches()
        for cold in (False, True) if cold_ok else (False,):
            label = "cold cache" if cold else "warm cache"
            read_s, _ = timed(read_code, n, cold)
            conv_s, peak = timed(convert_code, n, cold)
            print(f"-- {label} (median of {n})")
            print(f"read once        {read_s:7.2f} s  {mb / read_s:8.0f} MB/s")
            print(f"gpt2jax convert  {conv_s:7.2f} s  {mb / conv_s:8.0f} MB/s")
            print(f"convert / read   {conv_s / read_s:7.2f} x   (target <= 2)")
        print(
            f"peak RSS         {peak / 2**20:7.0f} MiB = {peak / nbytes:.2f} x checkpoint "
            f"(target < 1.5); imports alone {import_rss / 2**20:.0f} MiB"
        )
        if not cold_ok:
            print("(page cache could not be dropped: not root; only warm-cache numbers)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
