"""Pretrains a small GPT-2 from scratch on one public-domain text: the starting model of
``scripts/quality_table.py`` (issue #11), committed as ``tests/fixtures/small_pretrained/``.

Usage::

    python scripts/pretrain_small.py                  # writes tests/fixtures/small_pretrained/
    python scripts/pretrain_small.py --steps 50 --out /tmp/small   # a quick look

What it does, with the library's own API only:

1. splits the text (default ``tests/fixtures/texts/kjv_pentateuch.txt``) into a training head and
   a held-out tail (the last ``--val-fraction`` of it, cut at a line break);
2. writes a randomly initialised model directory of a small GPT-2 shape (GPT-2's tokenizer and
   its 50257-token vocabulary, so the model fine-tunes on any English text) with
   :func:`gpt2jax.init_params` and :func:`gpt2jax.save_model_dir`;
3. trains it with :func:`gpt2jax.train.loop.finetune` (AdamW, cosine schedule), the loop behind
   ``gpt2jax finetune``;
4. saves the trained parameters as a model directory (``--dtype``: float32 by default, as
   committed; bfloat16 halves the size) and reports the held-out loss of what was saved,
   measured with :func:`gpt2jax.train.evaluate.evaluate` (the code of ``gpt2jax eval``), next to the
   unigram level of the same held-out tokens.

The unigram level is reported two ways, both in nats per token over the held-out tokens that
``gpt2jax eval`` predicts: the entropy of their own token frequencies (the best any unigram
model could do on them, knowing them in advance), and the cross-entropy of the training text's
token frequencies (add-0.5 smoothed over the vocabulary: what a unigram model trained on the
same data achieves). A model whose loss is well below the first has learned context.

Everything is seeded (``--seed``): the same command on the same machine writes the same model.
Run it on one core to keep a shared machine usable (``taskset -c 1``); the default needs about
eleven minutes of CPU time there (4 layers, width 64: 3.4M parameters, 3.2M of them the token
embedding that GPT-2's vocabulary needs; 450 updates of 8 x 128 tokens, 2.5 passes over the
text). The committed model: held-out loss 4.54 nats per token, a nat below the unigram
entropy of 5.52 (training-text unigram: 6.01).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "tests", "fixtures", "texts", "kjv_pentateuch.txt")
OUT = os.path.join(ROOT, "tests", "fixtures", "small_pretrained")
TOKENIZER_DIR = os.path.join(os.path.dirname(ROOT), "shared", "gpt2-tokenizer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Pretrain a small GPT-2 from scratch on one text and save it as a gpt2jax "
        "model directory (the starting model of scripts/quality_table.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--text", default=TEXT, help="the UTF-8 text to pretrain on")
    p.add_argument("--out", default=OUT, help="model directory to write (replaced if present)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out tail of the text")
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--n-embd", type=int, default=64, help="width")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--n-ctx", type=int, default=128, help="context length (and window length)")
    p.add_argument("--steps", type=int, default=450, help="optimizer updates")
    p.add_argument("--batch-size", type=int, default=8, help="windows per update")
    p.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (cosine decay)")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup updates")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=1611, help="initial weights and data order")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype the saved parameters are stored in",
    )
    p.add_argument(
        "--tokenizer-dir",
        default=TOKENIZER_DIR if os.path.isdir(TOKENIZER_DIR) else None,
        help="directory with GPT-2's encoder.json and vocab.bpe, copied into the model "
        "directory so it loads offline (none: tiktoken's 'gpt2' encoding)",
    )
    p.add_argument("--work-dir", help="where the training run is written (default: a temp dir)")
    p.add_argument("--keep-run", action="store_true", help="keep the training run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def split_text(path: str, fraction: float, out_dir: str) -> tuple[str, str]:
    """Writes ``train.txt`` (head) and ``val.txt`` (the last ``fraction`` of the characters,
    starting at a line break) into ``out_dir``; returns their paths."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    cut = int(len(text) * (1.0 - fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    paths = os.path.join(out_dir, "train.txt"), os.path.join(out_dir, "val.txt")
    for p, part in zip(paths, (text[:cut], text[cut:]), strict=True):
        with open(p, "w", encoding="utf-8") as f:
            f.write(part)
    return paths


def unigram_levels(train_ids: np.ndarray, val_ids: np.ndarray, n_vocab: int) -> dict[str, float]:
    """Unigram entropy of the held-out tokens and the train unigram's cross-entropy on them.

    ``val_ids`` are the tokens a loss is measured on (the first token of the stream, which
    nothing predicts, already dropped by the caller).
    """
    counts = np.bincount(val_ids, minlength=n_vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    train = np.bincount(train_ids, minlength=n_vocab).astype(np.float64) + 0.5
    q = train / train.sum()
    cross = float(-np.log(q[val_ids]).mean())
    return {"entropy": entropy, "train_cross_entropy": cross}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("gpt2jax").addHandler(handler)  # the library's progress, not orbax's
    logging.getLogger("gpt2jax").setLevel(logging.INFO)
    os.environ.setdefault(
        "TIKTOKEN_CACHE_DIR", os.path.join(os.path.dirname(ROOT), "shared", "tiktoken-cache")
    )
    import jax

    from gpt2jax import GPT2Config, TrainConfig, init_params, load, save_model_dir
    from gpt2jax.config import EOT_TOKEN
    from gpt2jax.tokenizer import Tokenizer
    from gpt2jax.train.evaluate import evaluate
    from gpt2jax.train.loop import finetune

    config = GPT2Config(
        n_ctx=args.n_ctx, n_embd=args.n_embd, n_head=args.n_head, n_layer=args.n_layer
    )
    mb = config.num_params() * (2 if args.dtype == "bfloat16" else 4) / 1e6
    print(
        f"model: {args.n_layer} layers, width {args.n_embd}, {args.n_head} heads, context "
        f"{args.n_ctx}, vocabulary {config.n_vocab}: {config.num_params():,} parameters "
        f"({mb:.1f} MB in {args.dtype})",
        flush=True,
    )
    work = args.work_dir or tempfile.mkdtemp(prefix="pretrain_small_")
    os.makedirs(work, exist_ok=True)
    cache = os.path.join(work, "token-cache")
    train_txt, val_txt = split_text(args.text, args.val_fraction, work)

    tokenizer = (
        Tokenizer.from_dir(args.tokenizer_dir) if args.tokenizer_dir else Tokenizer.default()
    )
    train_ids = np.asarray(tokenizer.encode(open(train_txt, encoding="utf-8").read()))
    val_ids = np.asarray(tokenizer.encode(open(val_txt, encoding="utf-8").read()))
    print(
        f"text: {args.text}: {len(train_ids):,} training tokens, {len(val_ids):,} held out "
        f"(the last {args.val_fraction:.0%})",
        flush=True,
    )

    init_dir = os.path.join(work, "init")
    if os.path.exists(init_dir):
        shutil.rmtree(init_dir)
    save_model_dir(
        init_dir,
        config,
        jax.device_get(init_params(config, args.seed)),
        tokenizer_dir=args.tokenizer_dir,
        source={"format": "random-init", "seed": args.seed},
    )
    run_dir = os.path.join(work, "run")
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    train = TrainConfig(
        model=init_dir,
        data=[train_txt],
        val_data=[val_txt],
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.n_ctx,
        lr=args.lr,
        warmup=args.warmup,
        schedule="cosine",
        weight_decay=args.weight_decay,
        seed=args.seed,
        eval_every=max(1, args.steps // 6),
        eval_batches=4,
        sample_every=0,
        save_every=args.steps,
        keep=1,
    )
    t0 = time.perf_counter()
    result = finetune(run_dir, train, cache_dir=cache, show_progress=not args.quiet)
    train_s = time.perf_counter() - t0
    print(f"trained {result.step} steps in {train_s:.0f} s; last training loss {result.loss:.4f}")

    trained = load(run_dir)
    save_model_dir(
        args.out,
        config,
        jax.device_get(trained.params),
        tokenizer_dir=args.tokenizer_dir,
        source={
            "format": "gpt2jax-pretrain-small",
            "script": "scripts/pretrain_small.py",
            "text": os.path.relpath(os.path.abspath(args.text), ROOT),
            "held_out_fraction": args.val_fraction,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup": args.warmup,
            "weight_decay": args.weight_decay,
            "seed": args.seed,
        },
        dtype=args.dtype,
        overwrite=True,
    )
    saved = load(args.out)  # what was written must load as a model directory
    result_eval = evaluate(args.out, [val_txt], cache_dir=cache, show_progress=False)
    # gpt2jax eval predicts every held-out token after the first (the stream ends with
    # <|endoftext|>): the unigram levels are over exactly those
    predicted = np.append(val_ids, EOT_TOKEN)[1:]
    if len(predicted) != result_eval["tokens"]:
        raise SystemExit(
            f"internal error: {len(predicted)} held-out tokens here, {result_eval['tokens']} "
            "predicted by gpt2jax eval"
        )
    levels = unigram_levels(train_ids, predicted, config.n_vocab)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    summary = {
        "held_out_loss": result_eval["loss"],
        "held_out_tokens": result_eval["tokens"],
        "unigram_entropy": levels["entropy"],
        "unigram_train_cross_entropy": levels["train_cross_entropy"],
        "train_seconds": round(train_s, 1),
        "steps": args.steps,
        "dtype": str(jax.tree.leaves(saved.params)[0].dtype),
        "bytes_on_disk": size,
    }
    print(
        f"held-out loss {summary['held_out_loss']:.4f} nats/token over "
        f"{summary['held_out_tokens']:,} tokens; unigram level: entropy "
        f"{levels['entropy']:.4f}, training-text unigram {levels['train_cross_entropy']:.4f} "
        f"({levels['entropy'] - summary['held_out_loss']:.2f} nats below the unigram entropy)"
    )
    print(f"wrote {args.out} ({size / 1e6:.1f} MB, {summary['dtype']})")
    print(json.dumps(summary))
    if not args.keep_run and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
