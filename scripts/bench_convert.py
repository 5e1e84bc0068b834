"""Benchmark: convert an OpenAI-format TF checkpoint of a GPT-2 size (random weights).

Writes a random checkpoint of the chosen size under OpenAI's names (with our own bundle writer,
since the benchmark must not need TensorFlow), then measures, in fresh processes, each timed
from its start to its end:

* reading every file of the checkpoint once (the floor any converter pays),
* copying the files (every byte read once and written once, as ``cp`` does),
* ``gpt2jax convert`` (CRC-checked read, re-layout, model directory written): seconds, MB/s,
  peak RSS,
* a process that only imports what the converter imports (the fixed cost), and one that
  starts jax (which the converter no longer imports), for comparison.

Targets (issues 2, 17): conversion within 2x the read time; peak RSS <= 1.5x the checkpoint.

    python scripts/bench_convert.py --size 124M
    python scripts/bench_convert.py --size 1558M --dir /var/tmp --keep   # 6.2 GB, reused
"""

from __future__ import annotations

import argparse
import json
import os
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
    """Runs ``python -c code`` in a fresh process: (wall seconds, peak RSS bytes of that child)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark child failed ({status}): {code[:200]}")
    return wall, usage.ru_maxrss * 1024


def _has_google_crc32c() -> bool:
    from gpt2jax.formats.crc32c import _google_crc32c

    return _google_crc32c is not None


def drop_caches() -> bool:
    """Writes back and empties the OS page cache (root on Linux) so that a read comes from the
    disk, and the last run's written files are not still being written back."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def timed(code: str, repeats: int, cold: bool, before=None) -> tuple[float, int]:
    """Median wall seconds of ``repeats`` fresh runs and their largest peak RSS (the page cache
    dropped first when ``cold``; ``before()`` run first, untimed)."""
    walls, peak = [], 0
    for _ in range(repeats):
        if before is not None:
            before()
        if cold:
            drop_caches()
        wall, rss = run_child(code)
        walls.append(wall)
        peak = max(peak, rss)
    return float(np.median(walls)), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="124M", help="124M, 355M, 774M or 1558M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the random checkpoint in --dir/openai-SIZE and reuse it next time",
    )
    parser.add_argument(
        "--crc",
        choices=("auto", "numpy"),
        default="auto",
        help="numpy: convert as if google_crc32c were not installed (CRC32C in numpy, threads)",
    )
    args = parser.parse_args()

    scratch = tempfile.mkdtemp(prefix="bench_convert-", dir=args.dir)
    src = os.path.join(args.dir or scratch, f"openai-{args.size}") if args.keep else (
        os.path.join(scratch, "openai")
    )  # fmt: skip
    dst, copy = os.path.join(scratch, "gpt2jax"), os.path.join(scratch, "copy")
    try:
        if not (args.keep and os.path.exists(os.path.join(src, "checkpoint"))):
            # in a child: a child's peak RSS counts from its parent's size when it was forked
            here = os.path.dirname(os.path.abspath(__file__))
            code = f"import sys; sys.path.insert(0, {here!r}); import bench_convert as b; "
            run_child(code + f"b.write_random_checkpoint({src!r}, {args.size!r})")
        nbytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        print(f"checkpoint: {args.size}, {nbytes / 2**20:,.0f} MiB in {src}")
        crc = "google_crc32c" if args.crc == "auto" and _has_google_crc32c() else "numpy, threads"
        print(f"CRC32C in convert: {crc}")

        read_code = (
            "import os\n"
            f"d = {src!r}\n"
            "buf = bytearray(16 << 20)\n"
            "for f in sorted(os.listdir(d)):\n"
            "    with open(os.path.join(d, f), 'rb', buffering=0) as fh:\n"
            "        while fh.readinto(buf): pass\n"
        )
        # the floor of any converter: every byte read once and written once (no checks)
        copy_code = (
            "import os\n"
            f"d, out = {src!r}, {copy!r}\n"
            "os.makedirs(out)\n"
            "buf = memoryview(bytearray(16 << 20))\n"
            "for f in sorted(os.listdir(d)):\n"
            "    with open(os.path.join(d, f), 'rb', buffering=0) as fh, "
            "open(os.path.join(out, f), 'wb', buffering=0) as o:\n"
            "        while n := fh.readinto(buf): o.write(buf[:n])\n"
        )
        convert_code = (
            "import sys\n"
            + (
                "sys.modules['google_crc32c'] = None  # as if not installed\n"
                if args.crc == "numpy"
                else ""
            )
            + "from gpt2jax.cli.main import main\n"
            f"sys.exit(main(['convert', {src!r}, {dst!r}]))\n"
        )
        # what the convert command imports, and for comparison Python with jax started
        import_code = "import gpt2jax.cli.main, gpt2jax.convert.openai_tf, gpt2jax.store.model_dir"
        jax_code = "import jax; jax.numpy.zeros(1).block_until_ready()"
        n = args.repeats
        import_s, import_rss = timed(import_code, n, False)
        jax_s, _ = timed(jax_code, n, False)
        print(f"python + what convert imports {import_s:5.2f} s, {import_rss / 2**20:.0f} MiB")
        print(f"python + jax (not imported)   {jax_s:5.2f} s")
        mb = nbytes / 1e6

        def clean() -> None:
            shutil.rmtree(dst, ignore_errors=True)
            shutil.rmtree(copy, ignore_errors=True)

        cold_ok = drop_caches()
        peak = 0
        for cold in (False, True) if cold_ok else (False,):
            label = "cold cache" if cold else "warm cache"
            read_s, _ = timed(read_code, n, cold)
            copy_s, _ = timed(copy_code, n, cold, clean)
            conv_s, rss = timed(convert_code, n, cold, clean)
            peak = max(peak, rss)
            print(f"-- {label} (median of {n}, each a fresh process, started and ended)")
            print(f"read once          {read_s:7.2f} s  {mb / read_s:8.0f} MB/s")
            print(f"copy (read+write)  {copy_s:7.2f} s  {mb / copy_s:8.0f} MB/s")
            print(f"gpt2jax convert    {conv_s:7.2f} s  {mb / conv_s:8.0f} MB/s")
            print(f"convert / read     {conv_s / read_s:7.2f} x   (target <= 2)")
            print(f"convert / copy     {conv_s / copy_s:7.2f} x")
            print(f"of convert: start + imports {import_s / conv_s:.0%}")
        print(
            f"peak RSS of convert {peak / 2**20:7.0f} MiB = {peak / nbytes:.2f} x checkpoint "
            f"(target <= 1.5); its imports alone {import_rss / 2**20:.0f} MiB"
        )
        if not cold_ok:
            print("(page cache could not be dropped: not root; only warm-cache numbers)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
