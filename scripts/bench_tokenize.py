"""Benchmark: ``--data`` tokenization (``gpt2jax.train.data.load_tokens``) against tiktoken's
own batch API on the same text, in one run, as a ratio (so a busy machine affects both).

The text is the test fixture ``english.txt`` repeated into documents until ``--mb`` megabytes,
written as a ``.txt`` file (one long document, cut at safe points and encoded on threads), as
``.jsonl`` (one document per line) and, with pyarrow, as ``.parquet``. The reference is
``tiktoken.Encoding.encode_batch(documents, num_threads=N)`` over the documents
already in memory (no reading, no splitting, no writing): the floor for this tokenizer.

    python scripts/bench_tokenize.py --mb 20
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from gpt2jax.tokenizer import Tokenizer
from gpt2jax.train.data import load_tokens

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20, help="megabytes of text (default 20)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    tokenizer = Tokenizer.from_dir(ROOT.parent / "shared" / "gpt2-tokenizer")
    base = (ROOT / "tests" / "fixtures" / "english.txt").read_text(encoding="utf-8")
    docs, size = [], 0
    while size < args.mb * 1e6:
        docs.append(f"{len(docs)}. {base}")
        size += len(docs[-1])
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"txt": os.path.join(tmp, "d.txt"), "jsonl": os.path.join(tmp, "d.jsonl")}
        with open(paths["txt"], "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs))
        with open(paths["jsonl"], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq

            paths["parquet"] = os.path.join(tmp, "d.parquet")
            pq.write_table(pa.table({"text": docs}), paths["parquet"], row_group_size=256)
        except ModuleNotFoundError:
            pass
        start = time.perf_counter()
        encoded = tokenizer.encoding.encode_batch(
            docs, num_threads=args.threads, allowed_special="all"
        )
        n_ref = sum(map(len, encoded))
        ref = n_ref / (time.perf_counter() - start)
        print(f"{size / 1e6:.1f} MB, {len(docs)} documents, {os.cpu_count()} CPUs")
        print(f"tiktoken encode_batch ({args.threads} threads): {ref:,.0f} tokens/s")
        for kind, path in paths.items():
            start = time.perf_counter()
            data = load_tokens([path], tokenizer, cache_dir=os.path.join(tmp, kind),
                               show_progress=False)  # fmt: skip
            rate = len(data.tokens) / (time.perf_counter() - start)
            print(f"load_tokens .{kind}: {rate:,.0f} tokens/s = {rate / ref:.2f}x tiktoken")


if __name__ == "__main__":
    main()
