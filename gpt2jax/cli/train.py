"""``gpt2jax finetune`` and ``gpt2jax eval``: flags, registered by :mod:`gpt2jax.cli.main`.

Every ``finetune`` flag defaults to None here so that the command can tell which ones were
given: a new run fills the rest from :class:`gpt2jax.train.settings.TrainConfig`'s defaults, a
resumed run from its ``run.json`` (and only the flags in ``TrainConfig.RESUMABLE`` may change then).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from gpt2jax.cli.generate import add_allow_changed_base
from gpt2jax.cli.plan import ATTENTION_HELP, add_memory_flags
from gpt2jax.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from gpt2jax.dtypes import COMPUTE
from gpt2jax.errors import ConfigError

# (flag, TrainConfig setting, type, help); defaults come from TrainConfig.
_TRAIN_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    (
        "--steps",
        "steps",
        int,
        "optimizer updates in the whole run (resuming with more keeps the lr's decay horizon: "
        "add --schedule-steps to stretch it)",
    ),
    (
        "--schedule-steps",
        "schedule_steps",
        int,
        "updates the lr decays over (default: --steps; a resume keeps the run's horizon unless "
        "this is given)",
    ),
    ("--batch-size", "batch_size", int, "windows per update, over all devices (global batch)"),
    ("--grad-accum", "grad_accum", int, "split each update into this many micro-batches"),
    ("--seq-len", "seq_len", int, "tokens per window (default: the model's context, <= 1024)"),
    (
        "--lr",
        "lr",
        float,
        "peak learning rate, AdamW's (Adafactor, whose steps are lr x each matrix's RMS, gets "
        "--lr / the RMS of the starting weights: steps as large as AdamW's)",
    ),
    (
        "--adafactor-lr",
        "adafactor_lr",
        float,
        "Adafactor's own peak rate (transformers' lr) instead of the one derived from --lr "
        "(default: --lr / RMS of the starting weights)",
    ),
    ("--warmup", "warmup", int, "linear warmup updates"),
    (
        "--weight-decay",
        "weight_decay",
        float,
        "weight decay of the matmul weights, times the lr "
        "(decoupled for adamw and adafactor; added to the gradient for sgd, as torch does)",
    ),
    ("--clip", "clip", float, "clip gradients to this global L2 norm (0: off)"),
    ("--dropout", "dropout", float, "dropout probability (0: off, usual for fine-tuning)"),
    ("--seed", "seed", int, "seed of the data order, dropout and --init weights"),
    ("--eval-every", "eval_every", int, "validate every N updates (0: only at the end)"),
    ("--eval-batches", "eval_batches", int, "validation batches per evaluation (at most)"),
    ("--sample-every", "sample_every", int, "print and save a sample every N updates (0: off)"),
    ("--sample-length", "sample_length", int, "tokens per sample (at most the model's context)"),
    ("--sample-prompt", "sample_prompt", str, "text samples start from (default: none)"),
    ("--save-every", "save_every", int, "checkpoint every N updates (and always at the end)"),
    ("--keep", "keep", int, "checkpoints to keep"),
    ("--val-fraction", "val_fraction", float, "hold out this tail fraction of the data"),
    ("--column", "column", str, "CSV column holding the text"),
    (
        "--field",
        "field",
        str,
        "JSONL field, parquet or saved-dataset column holding the text "
        "(default: text, or a table's only column)",
    ),
)


def add_finetune(sub: argparse._SubParsersAction) -> None:
    from gpt2jax.train.settings import OPTIMIZERS, SCHEDULES, TrainConfig

    defaults = TrainConfig()
    flat_defaults = defaults.to_dict()
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on text (or train one from scratch), or resume a run",
        description="Fine-tune MODEL (any model directory, or a run directory) on --data, "
        "writing checkpoints, metrics and samples to the run directory --out. "
        "`gpt2jax finetune --resume RUN` continues a run exactly where it stopped, with the "
        "settings recorded in RUN/run.json. Ctrl-C saves a checkpoint before exiting. "
        "On Linux with glibc 2.35+ and transparent huge pages set to madvise, the command "
        "restarts itself once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (fewer page faults "
        "in XLA's CPU steps); setting glibc.malloc.hugetlb in GLIBC_TUNABLES yourself "
        "(e.g. =0) keeps your choice.",
    )
    p.add_argument("model", nargs="?", help="starting model directory (or use --init SIZE)")
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help=".txt/.csv/.jsonl/.parquet files, dirs (or a saved HF dataset), globs",
    )
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this directory")
    p.add_argument("--init", metavar="SIZE", help="start from random weights of a preset size")
    p.add_argument("--val-data", nargs="+", metavar="PATH", help="held-out data to validate on")
    for flag, name, kind, text in _TRAIN_FLAGS:
        if "default:" not in text:
            text = f"{text} (default: {flat_defaults[name]})"
        metavar = {int: "N", float: "X"}.get(kind, "TEXT")
        p.add_argument(flag, dest=name, type=kind, metavar=metavar, help=text)
    p.add_argument("--schedule", choices=SCHEDULES, help=f"(default: {defaults.schedule.schedule})")
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, help=f"(default: {defaults.memory_settings.optimizer})"
    )
    add_memory_flags(p, skip=("optimizer",))
    p.add_argument(
        "--memory",
        metavar="SIZE",
        help="memory for the whole run, e.g. 16GB (10^9 bytes), 15GiB or auto: choose the "
        "fastest remat / micro-batches / loss chunking whose whole run fits, exact options "
        "first; only when none fits an approximate optimizer (Adafactor, bfloat16 state), "
        "which it says (flags given stay fixed; see `gpt2jax plan`)",
    )
    p.add_argument(
        "--skip-nonfinite",
        action="store_const",
        const=True,
        help="skip updates whose loss is NaN/inf instead of stopping",
    )
    p.add_argument(
        "--report-to",
        type=_report_list,
        metavar="LIST",
        help="also log to these, comma-separated: tensorboard (event files in RUN/tensorboard; "
        "needs the tensorboard package), wandb (needs wandb; WANDB_MODE=offline writes locally)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from a .toml, .json or .yaml file (keys named like the flags; a "
        "run's run.json works too); flags given on the command line win",
    )
    p.set_defaults(func=_cmd_finetune, settings_flags=_settings_flags(p))
    add_allow_changed_base(p)  # not a setting: a settings file cannot give it


def _report_list(text: str) -> list[str]:
    """``--report-to tensorboard,wandb`` -> ``["tensorboard", "wandb"]``."""
    return [name.strip() for name in text.split(",") if name.strip()]


@dataclasses.dataclass(frozen=True)
class _Flag:
    """What a settings-file key must be to stand for a flag."""

    name: str  # the flag as typed, for messages
    kind: Any  # int, float, str, bool (a switch), list (a flag taking several values)
    convert: Any = None  # the flag's own type function, applied to a string value
    choices: tuple | None = None


def _settings_flags(p: argparse.ArgumentParser) -> dict[str, _Flag]:
    """The finetune flags a settings file may set, by destination name."""
    flags = {}
    for action in p._actions:
        if action.dest in ("help", "config") or action.dest == argparse.SUPPRESS:
            continue
        name = action.option_strings[0] if action.option_strings else action.dest.upper()
        if action.nargs == "+":
            kind = list
        elif isinstance(action, argparse._StoreConstAction):
            kind = bool
        elif action.type in (int, float):
            kind = action.type
        elif action.type is _report_list:
            kind = list
        else:
            kind = str
        convert = action.type if kind is str else None
        choices = tuple(action.choices) if action.choices else None
        flags[action.dest] = _Flag(name, kind, convert, choices)
    return flags


def apply_settings(args: argparse.Namespace, settings: dict, source: str) -> dict:
    """Sets the flags of ``args`` not given on the command line from ``settings`` (checked
    as the flags are). Returns the training settings without a flag (e.g. ``approximate``
    from a run.json), for :class:`~gpt2jax.train.settings.TrainConfig`."""
    from gpt2jax.train.settings import SECTION_OF

    flags: dict[str, _Flag] = args.settings_flags
    fields = set(SECTION_OF)
    extra = {}
    for key, value in settings.items():
        flag = flags.get(key)
        if flag is None:
            if key not in fields:
                raise ConfigError(f"{source}: unknown setting {key!r} (not a finetune flag)")
            extra[key] = value
            continue
        value = _checked(flag, value, source, key)
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return extra


def _checked(flag: _Flag, value: Any, source: str, key: str) -> Any:
    """``value`` as the flag would hold it, or a ConfigError naming the key."""
    if value is None:
        return None
    kind = flag.kind
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
    }[kind]
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                list: "a string or a list of strings"}[kind]  # fmt: skip
        raise ConfigError(f"{source}: {key} ({flag.name}) must be {want}, got {value!r}")
    if kind is float:
        value = float(value)
    elif kind is list and isinstance(value, str):
        value = _report_list(value) if key == "report_to" else [value]
    elif kind is str and flag.convert is not None:
        value = flag.convert(value)
    if flag.choices is not None and value not in flag.choices:
        choices = ", ".join(map(str, flag.choices))
        raise ConfigError(f"{source}: {key} must be one of {choices}, got {value!r}")
    return value


def _given(args: argparse.Namespace) -> dict:
    """TrainConfig fields whose flags were given on the command line."""
    from gpt2jax.train.settings import SECTION_OF

    names = set(SECTION_OF) - {"model", "data", "val_data"}
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def _cmd_finetune(args: argparse.Namespace) -> int:
    import jax

    from gpt2jax.train import cluster
    from gpt2jax.train.loop import finetune
    from gpt2jax.train.settings import TrainConfig

    log_to_stderr()
    cache_compiled_code()
    if not (args.debug or os.environ.get("GPT2JAX_DEBUG") == "1"):
        quiet_background_errors()
    extra = {}
    if args.config:
        from gpt2jax.config_file import read_settings

        extra = apply_settings(args, read_settings(args.config), args.config)
    given = {**extra, **_given(args)}
    if args.resume:
        if args.model or args.data or args.out or args.val_data:
            raise ConfigError("--resume RUN takes its model, data and output from RUN/run.json")
        result = finetune(
            args.resume, resume=True, overrides=given, allow_changed_base=args.allow_changed_base
        )
    else:
        if not args.out:
            raise ConfigError("--out RUN is required (the run directory to create)")
        if args.memory:  # the flags given are checked first; process 0 plans, for every one
            TrainConfig(model=args.model, data=args.data or [], **given).validate()
            given.update(cluster.primary_first("plan", lambda: _planned(args, given)))
        train = TrainConfig(
            model=args.model, data=args.data or [], val_data=args.val_data or [], **given
        )
        result = finetune(args.out, train, allow_changed_base=args.allow_changed_base)
    if result.interrupted:
        return 128 + result.interrupted
    if jax.process_index() != 0:  # one process of several: process 0 reports
        return 0
    parts = [f"step {result.step}"]
    if result.loss is not None:
        parts.append(f"loss {result.loss:.4f}")
    if result.val_loss is not None:
        parts.append(f"validation loss {result.val_loss:.4f}")
    print(f"finished {result.run_dir}: {', '.join(parts)}")
    return 0


def _planned(args: argparse.Namespace, given: dict) -> dict:
    """The settings ``--memory`` chooses (:func:`gpt2jax.train.memory.planner.search`), the table
    on stderr."""
    from gpt2jax.cli.plan import make_planner, model_config, settings_from_args, where
    from gpt2jax.config import get_preset
    from gpt2jax.train.memory.planner import (
        approximate_settings,
        chosen_line,
        describe_choice,
        format_row,
        header,
        resolve_memory,
        search,
    )
    from gpt2jax.train.settings import TrainConfig

    if not (args.model or args.init):
        return {}  # TrainConfig.validate says what is missing
    budget, read_as = resolve_memory(args.memory)
    config = get_preset(args.init) if args.init else model_config(args.model)
    base, fixed = settings_from_args(args)
    fixed |= {"grad_accum"} & set(given)
    defaults = TrainConfig()
    seq_len = min(given.get("seq_len") or 1024, config.n_ctx)
    sample_length = given.get("sample_length", defaults.logging.sample_length)
    planner = make_planner(config, seq_len, base, sample_length=sample_length, fixed=fixed)
    print(f"--memory {read_as}: {where(planner)}", file=sys.stderr)
    print(header(budget), file=sys.stderr, flush=True)
    chosen, rows = search(
        planner, base, budget, given.get("batch_size", defaults.dataset.batch_size),
        batch_given="batch_size" in given, fixed=fixed,
        grad_accum=given.get("grad_accum", defaults.dataset.grad_accum),
        show=lambda row: print(format_row(row), file=sys.stderr, flush=True),
    )  # fmt: skip
    if chosen is None:
        raise ConfigError(
            f"--memory {args.memory}: no configuration fits (see `gpt2jax plan`); try "
            "--lora-rank, --param-dtype bfloat16, a shorter --seq-len or --parallel fsdp"
        )
    row = next(r for r in rows if r.candidate == chosen and r.fits)
    print(chosen_line(row, base), file=sys.stderr, flush=True)
    return {
        **describe_choice(chosen),
        "memory": args.memory,
        "approximate": approximate_settings(chosen.settings),
    }


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="loss and perplexity of a model on a text",
        description="Evaluate MODEL (any model or run directory) on --data: mean token "
        "cross-entropy (nats), perplexity, and the number of tokens predicted.",
    )
    p.add_argument("model", help="model or run directory")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text to evaluate on")
    p.add_argument("--seq-len", type=int, help="context per window (default: model's, <= 1024)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8)")
    p.add_argument("--column", help="CSV column holding the text")
    p.add_argument("--field", help="JSONL field or parquet/dataset column holding the text")
    p.add_argument(
        "--compute-dtype", choices=COMPUTE, default="auto",
        help="matmul dtype (default auto: bfloat16 on TPUs and GPUs of compute capability "
        ">= 8.0, float16 on older GPUs, float32 on CPUs); the loss is float32",
    )  # fmt: skip
    p.add_argument("--attention", choices=IMPLEMENTATIONS, default="auto", help=ATTENTION_HELP)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_allow_changed_base(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from gpt2jax.train.evaluate import evaluate

    log_to_stderr()
    cache_compiled_code()
    result = evaluate(
        args.model, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
        column=args.column, field=args.field, allow_changed_base=args.allow_changed_base,
        compute_dtype=args.compute_dtype, attention=args.attention,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
            f"tokens {result['tokens']:,}  ({result['model']} on {result['data']})"
        )
    return 0


class _TqdmHandler(logging.Handler):
    """Writes log lines above any progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        level = "warning: " if record.levelno >= logging.WARNING else ""
        tqdm.write(f"gpt2jax: {level}{record.getMessage()}", file=sys.stderr)


def log_to_stderr() -> None:
    """Shows the library's info and warning lines on stderr (once per process)."""
    logger = logging.getLogger("gpt2jax")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        logger.addHandler(_TqdmHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def quiet_background_errors() -> None:
    """Hides what orbax's threads print when an asynchronous save fails (absl and asyncio error
    records, and "exception ignored" reports from its coroutines and from TensorStore calling
    back into its closed event loop: hundreds of traceback lines for one full disk). The failure
    itself is raised again by the next save and reported as one line
    (:class:`gpt2jax.store.runs.Checkpoints`). ``--debug`` keeps them all."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.unraisablehook = _unraisable_unless_orbax


def _unraisable_unless_orbax(unraisable: Any) -> None:
    import traceback

    files = [f.filename for f in traceback.extract_tb(unraisable.exc_traceback)]
    code = getattr(unraisable.object, "cr_code", None)  # an orbax coroutine never awaited
    if code is not None:
        files.append(code.co_filename)
    if "Event loop is closed" in str(unraisable.exc_value) or any("orbax" in f for f in files):
        return
    sys.__unraisablehook__(unraisable)


def cache_compiled_code() -> None:
    """Starts ``jax.distributed`` when asked (before anything starts JAX's backends), then
    the persistent compile cache (:func:`gpt2jax.device.enable_compile_cache`: on
    accelerators, or where ``JAX_COMPILATION_CACHE_DIR`` says)."""
    import jax

    from gpt2jax.device import enable_compile_cache
    from gpt2jax.train import cluster

    cluster.initialize()  # before anything starts JAX's backends
    if jax.process_index() != 0:  # process 0 says what the run does; the others only warn
        logging.getLogger("gpt2jax").setLevel(logging.WARNING)
    enable_compile_cache()
