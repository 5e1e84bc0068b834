"""Benchmark: export a GPT-2 of a given size (random weights) to a Hugging Face directory.

Builds random float32 params of the chosen shape in place (each stacked array allocated once and
filled by the generator directly, so the model exists once in memory), then times
:func:`gpt2jax.convert.hf.export_hf` to ``model.safetensors`` and reports the process's peak
RSS (``VmHWM``, the same as ``ru_maxrss``) against the model's float32 size.

Target (issue 5): peak RSS under 1.5x the model's float32 size (1558M: 6.2 GB), the export
streaming one tensor at a time. Run the full size alone on an idle machine::

    python scripts/bench_export.py --size 1558M
    python scripts/bench_export.py --size 124M --layers 2     # a quick smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import tempfile
import time

import numpy as np

from gpt2jax.config import get_preset
from gpt2jax.convert.hf import export_hf
from gpt2jax.convert.mapping import our_shapes, unflatten
from gpt2jax.formats.safetensors_io import SafetensorsFile

TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "gpt2-tokenizer")


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def random_params(config, seed: int = 0) -> dict:
    """Random float32 params, every array filled in place (no temporary second copy)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in our_shapes(config).items():
        x = np.empty(shape, np.float32)
        rng.standard_normal(dtype=np.float32, out=x)
        x *= 0.02
        flat[path] = x
    return unflatten(flat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1558M", help="124M, 355M, 774M or 1558M")
    parser.add_argument("--layers", type=int, default=None, help="override n_layer (smoke runs)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()

    config = get_preset(args.size)
    if args.layers is not None:
        config = dataclasses.replace(config, n_layer=args.layers)
    model_bytes = config.num_params() * 4
    tokenizer_dir = TOKENIZER_DIR if os.path.isdir(TOKENIZER_DIR) else None

    base_kb = status_kb("VmRSS")
    params = random_params(config)
    params_kb = status_kb("VmRSS") - base_kb
    scratch = tempfile.mkdtemp(prefix="bench_export-", dir=args.dir)
    out = os.path.join(scratch, "hf")
    try:
        start = time.perf_counter()
        export_hf(params, config, out, dtype=args.dtype, tokenizer_dir=tokenizer_dir)
        seconds = time.perf_counter() - start
        # VmHWM and ru_maxrss are the same high-water mark; take the larger to be safe.
        peak = max(status_kb("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        weights = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
        written = sum(os.path.getsize(os.path.join(out, f)) for f in weights)
        # The files parse, and the last tensor written holds the params' values.
        last = SafetensorsFile(os.path.join(out, weights[-1])).get("transformer.ln_f.bias")
        want = params["ln_f"]["b"].astype(last.dtype)
        assert last.tobytes() == want.tobytes(), "exported ln_f.bias differs from the params"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    layers = f", n_layer={config.n_layer}" if args.layers is not None else ""
    print(f"model            {args.size}{layers}: {config.num_params():,} parameters, "
          f"{model_bytes / 1e9:.2f} GB in float32")  # fmt: skip
    print(f"export           {seconds:7.2f} s  {written / 1e6 / seconds:8.0f} MB/s written "
          f"({args.dtype}, {len(weights)} file(s), {written / 1e9:.2f} GB)")  # fmt: skip
    print(f"peak RSS         {peak / 1e9:7.2f} GB = {peak / model_bytes:.2f} x model float32 size "
          f"(target < 1.5)")  # fmt: skip
    print(f"  of which       imports {base_kb / 1e6:.2f} GB, params {params_kb / 1e6:.2f} GB, "
          f"export overhead {(peak / 1024 - base_kb - params_kb) / 1e6:.2f} GB")  # fmt: skip


if __name__ == "__main__":
    main()
