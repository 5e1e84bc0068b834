"""Fine-tuning quality per memory option, measured (issue #11).

Starting from the small pretrained model (``tests/fixtures/small_pretrained``, written by
``scripts/pretrain_small.py`` from the KJV Pentateuch), fine-tunes on a second text (Pride and
Prejudice) once per memory option, each through the real command line, ``gpt2jax finetune``, in
its own process, with the same steps, learning rate, batch, windows and seed. Every fine-tuned
model is then measured with ``gpt2jax eval`` on two held-out texts, the same windows for every
row:

* the new text's held-out tail (the last ``--val-fraction`` of it, never trained on): how well
  the option learned;
* the pretraining text's held-out tail (the same tail ``pretrain_small.py`` held out): how much
  of the old text the model forgot. Forgetting is the old-text loss increase over the
  pretrained model's, in percent of the pretrained model's.

Rows are *exact* (the same maths as the reference: remat, chunked loss, gradient accumulation,
FSDP over 8 host devices; their losses must equal the reference's up to float rounding,
``--exact-tol`` relative) or *approximate* (different numbers: Adafactor, bfloat16 compute,
parameters or optimizer state, LoRA, freezing; their new-text loss must be no more than 2%
above the reference's, and their forgetting no more than the reference's plus 2 percentage
points). A lower loss or less forgetting than the reference is always within target.
Adafactor runs twice: at the rate ``finetune`` gives it (``--lr`` over the starting weights'
RMS, :func:`gpt2jax.train.optim.adafactor_scale`) and at ``--lr`` itself (``--adafactor-lr``).

The defaults (60 updates of 8 windows of 128 tokens, lr 1e-3 with cosine decay after 6 warmup
updates, seed 0) take the new text's held-out loss from 8.23 to 6.41 nats per token while the
old text's rises from 4.54 to 5.36. The 13 rows need about half an hour of CPU time: about
15 minutes with ``--jobs 2`` on two idle cores. ``--also NAME=FLAGS`` adds rows (learning-rate
sweeps: BENCHMARKS.md lists the ones behind the defaults).

Usage::

    python scripts/quality_table.py --jobs 2 --json-out table.json   # every row
    python scripts/quality_table.py --rows reference remat-block adafactor
    python scripts/quality_table.py --quick                  # a tiny run: is the script sound?

Prints a markdown table (and, with ``--json-out``, writes every number as JSON). Exits 1 when
a row failed to run (its error is in the table); missed targets are reported, not an error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = os.path.join(ROOT, "tests", "fixtures", "texts")
MODEL = os.path.join(ROOT, "tests", "fixtures", "small_pretrained")
OLD_TEXT = os.path.join(TEXTS, "kjv_pentateuch.txt")
NEW_TEXT = os.path.join(TEXTS, "pride_and_prejudice.txt")
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

#: (name, exact?, extra `gpt2jax finetune` flags, extra environment). The first is the reference.
ROWS: tuple[tuple[str, bool, tuple[str, ...], dict[str, str]], ...] = (
    ("reference", True, ("--optimizer", "adamw"), {}),
    ("adafactor", False, ("--optimizer", "adafactor"), {}),
    # transformers' Adafactor given AdamW's rate as its own: what --lr meant before the rule
    ("adafactor-same-lr", False, ("--optimizer", "adafactor", "--adafactor-lr", "{lr}"), {}),
    ("compute-bf16", False, ("--compute-dtype", "bfloat16"), {}),
    ("param-bf16", False, ("--param-dtype", "bfloat16"), {}),
    ("opt-state-bf16", False, ("--opt-state-dtype", "bfloat16"), {}),
    ("remat-block", True, ("--remat", "block"), {}),
    ("remat-dots", True, ("--remat", "dots"), {}),
    ("loss-chunk", True, ("--loss-chunk", "32"), {}),
    ("grad-accum", True, ("--grad-accum", "4"), {}),
    ("lora", False, ("--lora-rank", "8"), {}),
    ("freeze-embeddings", False, ("--freeze", "embeddings"), {}),
    (
        "fsdp-8",
        True,
        ("--parallel", "fsdp"),
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    ),
)
ROW_NAMES = tuple(r[0] for r in ROWS)
QUICK_ROWS = ("reference", "remat-block", "adafactor")

NEW_TOL_PCT = 2.0  # approximate rows: new-text loss at most this % above the reference's
FORGET_TOL_PP = 2.0  # ... and forgetting at most this many percentage points above it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fine-tune the small pretrained model on a new text with each memory "
        "option (gpt2jax finetune) and tabulate held-out loss on the new text and on the "
        "pretraining text (gpt2jax eval).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=MODEL, help="the pretrained model directory")
    p.add_argument("--new-text", default=NEW_TEXT, help="text to fine-tune on")
    p.add_argument("--old-text", default=OLD_TEXT, help="the text the model was pretrained on")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="held-out tail of each text (0.1: the tail pretrain_small.py held out)",
    )
    p.add_argument("--rows", nargs="+", choices=ROW_NAMES, help="rows to run (default: all)")
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="one more approximate row: NAME and its `gpt2jax finetune` flags (e.g. "
        "'adafactor-lr1e-2=--optimizer adafactor --lr 1e-2'; later flags override the common "
        "ones); repeatable, for learning-rate sweeps",
    )
    p.add_argument("--steps", type=int, help="fine-tuning updates (default: 60; --quick: 3)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (a multiple of 8)")
    p.add_argument("--seq-len", type=int, help="window length (default: 128; --quick: 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay)")
    p.add_argument("--warmup", type=int, help="warmup updates (default: steps // 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--exact-tol",
        type=float,
        default=1e-4,
        help="exact rows: largest relative difference from the reference's losses",
    )
    p.add_argument("--quick", action="store_true", help="tiny run of 3 rows (for tests)")
    p.add_argument("--jobs", type=int, default=1, help="rows run at the same time")
    p.add_argument("--json-out", help="write the results as JSON here")
    p.add_argument("--work-dir", help="keep the runs here (default: a temp dir, removed)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 60
    if args.seq_len is None:
        args.seq_len = 32 if args.quick else 128
    if args.warmup is None:
        args.warmup = args.steps // 10
    if args.rows is None:
        args.rows = list(QUICK_ROWS if args.quick else ROW_NAMES)
    if "reference" not in args.rows:
        args.rows.insert(0, "reference")
    args.rows = [r for r in ROW_NAMES if r in args.rows]  # table order, reference first
    args.extra_rows = {}
    for spec in args.also:
        name, sep, flags = spec.partition("=")
        if not sep or not name or name in ROW_NAMES or name in args.extra_rows:
            p.error(f"--also {spec!r}: give NAME=FLAGS with a new NAME")
        args.extra_rows[name] = (name, False, tuple(flags.split()), {})
    args.rows += list(args.extra_rows)
    if args.batch_size % 8:
        p.error("--batch-size must be a multiple of 8 (the FSDP row shards it over 8 devices)")
    return args


# -- data ----------------------------------------------------------------------------------------


def split_text(path: str, fraction: float, train_path: str, val_path: str, val_chars: int) -> None:
    """Head of ``path`` to ``train_path``, its last ``fraction`` (from a line break) to
    ``val_path``; ``val_chars`` > 0 keeps only that many characters of the tail (to the last
    line break before them)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    cut = int(len(text) * (1.0 - fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    head, tail = text[:cut], text[cut:]
    if val_chars > 0 and len(tail) > val_chars:
        end = tail.rfind("\n", 0, val_chars)
        tail = tail[: end + 1 if end > 0 else val_chars]
    for p, part in ((train_path, head), (val_path, tail)):
        if p is not None:
            with open(p, "w", encoding="utf-8") as f:
                f.write(part)


# -- running the CLI -----------------------------------------------------------------------------


def gpt2jax_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpt2jax", *args]


def run_cmd(cmd: list[str], env: dict[str, str], log_path: str) -> str:
    """Runs ``cmd``, stderr to ``log_path``; returns stdout. Raises RuntimeError naming the
    last lines of stderr when it fails."""
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    if proc.returncode != 0:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines()]
        tail = [line for line in lines if line][-3:]
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))
    return proc.stdout


_EVAL_LOCK = threading.Lock()
# Progress lines go here: an evaluation redirects sys.stderr (process-wide) while it runs, and a
# row finishing in another thread meanwhile would print into that evaluation's log.
_PROGRESS = sys.stderr


def eval_loss(model: str, data: str, seq_len: int, log_path: str) -> float:
    """The loss of ``gpt2jax eval MODEL --data DATA --seq-len SEQ_LEN --json``, run in this
    process (its entry point, :func:`gpt2jax.cli.main.main`, one at a time): a new interpreter per
    evaluation would spend more time importing JAX than evaluating. One device reads every
    run, the FSDP run's sharded checkpoint too (:func:`gpt2jax.store.runs.restore_params`)."""
    from gpt2jax.cli.main import main as gpt2jax_main

    argv = ["eval", model, "--data", data, "--seq-len", str(seq_len), "--json"]
    out, err = io.StringIO(), io.StringIO()
    with _EVAL_LOCK, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = gpt2jax_main(argv)
    with open(log_path, "w") as f:
        f.write("gpt2jax " + " ".join(argv) + "\n" + err.getvalue() + out.getvalue())
    if rc != 0:
        lines = [line.strip() for line in err.getvalue().replace("\r", "\n").splitlines()]
        raise RuntimeError(f"gpt2jax eval: exit {rc}: " + " | ".join([x for x in lines if x][-3:]))
    text = out.getvalue()
    return float(json.loads(text[text.index("{") :])["loss"])


def child_env(work: str, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken-cache"))
    env["GPT2JAX_CACHE"] = os.path.join(work, "cache")  # tokenized once, shared by the rows
    for key, value in extra.items():
        env[key] = f"{env[key]} {value}".strip() if key == "XLA_FLAGS" and key in env else value
    return env


def run_row(name: str, args: argparse.Namespace, paths: dict[str, str], work: str) -> dict:
    """Fine-tunes and evaluates one row; ``{"option", ..., "error"}``."""
    _, exact, flags, extra = args.extra_rows.get(name) or next(r for r in ROWS if r[0] == name)
    flags = tuple(f.format(lr=args.lr) for f in flags)
    row: dict[str, Any] = {"option": name, "exact": exact, "flags": " ".join(flags)}
    env = child_env(work, extra)
    run_dir = os.path.join(work, "runs", name)
    logs = os.path.join(work, "logs")
    t0 = time.perf_counter()
    try:
        if os.path.exists(run_dir):
            shutil.rmtree(run_dir)
        cmd = gpt2jax_cmd(
            "finetune", args.model,
            "--data", paths["new_train"], "--val-data", paths["new_val"],
            "--out", run_dir,
            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), "--lr", str(args.lr),
            "--warmup", str(args.warmup), "--seed", str(args.seed),
            "--eval-every", "0", "--eval-batches", "1", "--sample-every", "0",
            "--save-every", str(args.steps), "--keep", "1",
            *flags,
        )  # fmt: skip
        row["command"] = " ".join([f"{k}={v}" for k, v in extra.items()] + ["gpt2jax"] + cmd[3:])
        run_cmd(cmd, env, os.path.join(logs, f"{name}.finetune.log"))
        for key, text in (("new_loss", "new"), ("old_loss", "old")):
            log = os.path.join(logs, f"{name}.{text}.log")
            row[key] = eval_loss(run_dir, paths[f"{text}_val"], args.seq_len, log)
    except (RuntimeError, OSError, ValueError) as e:
        row["error"] = str(e)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    status = (
        f"failed: {row['error']}"
        if "error" in row
        else (f"new {row['new_loss']:.4f}, old {row['old_loss']:.4f}")
    )
    print(f"[{name}] {status} ({row['seconds']:.0f} s)", file=_PROGRESS, flush=True)
    return row


# -- the table -----------------------------------------------------------------------------------


def judge(rows: list[dict], base: dict[str, float], exact_tol: float) -> None:
    """Adds the deltas and the within-target verdict to every row (in place)."""
    ref = next(r for r in rows if r["option"] == "reference")
    for r in rows:
        if "error" in r:
            r["within_target"] = False
            continue
        r["forgetting"] = r["old_loss"] - base["old_loss"]
        r["forgetting_pct"] = 100.0 * r["forgetting"] / base["old_loss"]
        if "error" in ref:
            r["within_target"] = None
            continue
        r["delta_new_pct"] = 100.0 * (r["new_loss"] - ref["new_loss"]) / ref["new_loss"]
        r["delta_old_rel"] = (r["old_loss"] - ref["old_loss"]) / ref["old_loss"]
        r["delta_forgetting_pp"] = r["forgetting_pct"] - ref["forgetting_pct"]
        if r["exact"]:
            r["within_target"] = (
                abs(r["delta_new_pct"]) / 100.0 <= exact_tol
                and abs(r["delta_old_rel"]) <= exact_tol
            )
        else:
            r["within_target"] = (
                r["delta_new_pct"] <= NEW_TOL_PCT and r["delta_forgetting_pp"] <= FORGET_TOL_PP
            )


def markdown(rows: list[dict], base: dict[str, float], exact_tol: float) -> str:
    head = (
        "| option | exact? | new-text loss | Δ vs reference | old-text loss | forgetting "
        "| Δ forgetting vs reference | within target? |\n"
        "|---|---|---:|---:|---:|---:|---:|---|\n"
        f"| pretrained (before fine-tuning) | | {base['new_loss']:.4f} | | "
        f"{base['old_loss']:.4f} | | | |\n"
    )
    lines = []
    for r in rows:
        kind = "exact" if r["exact"] else "approximate"
        name = f"{r['option']} (`{r['flags']}`)"
        if "error" in r:
            msg = r["error"].replace("|", "/")
            lines.append(f"| {name} | {kind} | failed: {msg} | | | | | no |")
            continue

        def fmt(key: str, spec: str, suffix: str = "", r: dict = r) -> str:
            return format(r[key], spec) + suffix if key in r else ""

        forgetting = f"{r['forgetting']:+.4f} ({r['forgetting_pct']:+.2f}%)"
        verdict = {True: "yes", False: "**no**", None: "?"}[r["within_target"]]
        if r["option"] == "reference":
            verdict = "(reference)"
        lines.append(
            f"| {name} | {kind} | {r['new_loss']:.4f} | {fmt('delta_new_pct', '+.3f', '%')} | "
            f"{r['old_loss']:.4f} | {forgetting} | {fmt('delta_forgetting_pp', '+.2f', ' pp')} | "
            f"{verdict} |"
        )
    foot = (
        f"\nTargets: exact rows equal the reference's losses within {exact_tol:g} relative; "
        f"approximate rows' new-text loss at most {NEW_TOL_PCT:g}% above the reference's and "
        f"forgetting at most {FORGET_TOL_PP:g} pp above it. Forgetting: old-text loss minus the "
        "pretrained model's (in % of it)."
    )
    return head + "\n".join(lines) + "\n" + foot


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="quality_table_")
    for sub in ("logs", "runs", "data"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    # the evaluations run in this process: the same tokenizer and token cache as the runs'
    os.environ.update({k: v for k, v in child_env(work, {}).items() if k.endswith("_DIR")})
    os.environ["GPT2JAX_CACHE"] = os.path.join(work, "cache")
    data = os.path.join(work, "data")
    paths = {k: os.path.join(data, f"{k}.txt") for k in ("new_train", "new_val", "old_val")}
    val_chars = 6000 if args.quick else 0
    split_text(args.new_text, args.val_fraction, paths["new_train"], paths["new_val"], val_chars)
    split_text(args.old_text, args.val_fraction, None, paths["old_val"], val_chars)
    print(
        f"{len(args.rows)} rows: {args.steps} steps x {args.batch_size} windows x "
        f"{args.seq_len} tokens, lr {args.lr:g}, warmup {args.warmup}, seed {args.seed}; "
        f"work dir {work}",
        file=_PROGRESS,
        flush=True,
    )
    t0 = time.perf_counter()
    try:
        base = {
            f"{text}_loss": eval_loss(
                args.model, paths[f"{text}_val"], args.seq_len,
                os.path.join(work, "logs", f"base.{text}.log"),
            )
            for text in ("new", "old")
        }  # fmt: skip
        print(f"[pretrained] new {base['new_loss']:.4f}, old {base['old_loss']:.4f}",
              file=_PROGRESS, flush=True)  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            rows = list(pool.map(lambda name: run_row(name, args, paths, work), args.rows))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    judge(rows, base, args.exact_tol)
    table = markdown(rows, base, args.exact_tol)
    print(table)
    if args.json_out:
        result = {
            "settings": {
                "model": os.path.relpath(os.path.abspath(args.model), ROOT),
                "new_text": os.path.relpath(os.path.abspath(args.new_text), ROOT),
                "old_text": os.path.relpath(os.path.abspath(args.old_text), ROOT),
                **{k: getattr(args, k) for k in (
                    "val_fraction", "steps", "batch_size", "seq_len", "lr", "warmup", "seed",
                    "exact_tol", "quick",
                )},
                "new_tol_pct": NEW_TOL_PCT,
                "forget_tol_pp": FORGET_TOL_PP,
            },
            "pretrained": base,
            "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1),
            "markdown": table,
        }  # fmt: skip
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
