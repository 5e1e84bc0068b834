"""``gpt2jax plan MODEL --memory 16GB``: which training settings fit, and why
(:mod:`gpt2jax.train.memory.planner`).

Registered by :mod:`gpt2jax.cli.main`. Only the model's shape is read (no weights are loaded), and
nothing is allocated: every candidate's training step is compiled on abstract shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from gpt2jax.config import GPT2Config


def add_memory_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The memory flags shared by ``plan`` and ``finetune``, except those in ``skip``. They
    default to None, so that a command can tell which were given (the defaults in the help are
    :class:`gpt2jax.train.memory.build.MemorySettings`'s)."""
    from gpt2jax.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
    from gpt2jax.config import REMAT_CHOICES
    from gpt2jax.dtypes import COMPUTE, TRAINING
    from gpt2jax.train.settings import OPTIMIZERS, PARALLEL, MemorySettings

    dtypes = TRAINING
    flags = (
        ("--remat", dict(choices=REMAT_CHOICES, type=_remat), "recompute activations in "
         "the backward pass: none, dots (keep matmul outputs) or block (keep each block's "
         "input; 'full' is accepted for it); auto = dots on CPUs (faster there), none on "
         "GPUs and TPUs"),
        ("--optimizer", dict(choices=OPTIMIZERS), "adamw, adafactor or sgd (momentum 0.9)"),
        ("--opt-state-dtype", dict(choices=dtypes), "AdamW's moments / SGD's momentum dtype"),
        ("--param-dtype", dict(choices=dtypes), "dtype the parameters are stored in"),
        ("--compute-dtype", dict(choices=COMPUTE), "matmul dtype (LayerNorm, softmax, "
         "loss stay float32; parameters float32 unless --param-dtype): auto = bfloat16 on TPUs "
         "and GPUs of compute capability >= 8.0, float16 with dynamic loss scaling on older "
         "GPUs (T4, V100), float32 on CPUs"),
        ("--attention", dict(choices=IMPLEMENTATIONS), ATTENTION_HELP),
        ("--loss-chunk", dict(type=int, metavar="N"), "compute the loss N sequence positions "
         "at a time (0: all at once)"),
        ("--parallel", dict(choices=PARALLEL), "data: replicated state, pmap; fsdp: state "
         "sharded over the devices"),
        ("--lora-rank", dict(type=int, metavar="R"), "train rank-R LoRA adapters on the "
         "attention and MLP projections only (0: train the model)"),
        ("--lora-alpha", dict(type=float, metavar="X"), "LoRA scale is alpha / R "
         "(default: R, scale 1)"),
        ("--freeze", dict(metavar="WHAT"), "'embeddings', or 'top:N' to train only the top N "
         "blocks"),
    )  # fmt: skip
    defaults = MemorySettings()
    for flag, kwargs, text in flags:
        name = flag[2:].replace("-", "_")
        if name in skip:
            continue
        default = getattr(defaults, name)
        if default not in (None, 0) and "default:" not in text:
            text = f"{text} (default: {default})"
        p.add_argument(flag, dest=name, help=text, **kwargs)


ATTENTION_HELP = (
    "attention implementation; auto: cudnn on GPUs with cuDNN flash attention (compute "
    "capability >= 8.0, 16-bit compute), splash on TPUs, else blockwise for long sequences "
    "(memory-lean, pure JAX) and xla (the plain einsum) for short ones"
)


def _remat(name: str) -> str:
    """``--remat full`` (everything inside a block recomputed) is ``block``."""
    return "block" if name == "full" else name


def model_config(path: str) -> GPT2Config:
    """The shape of a model directory or preset size name, without reading any weights."""
    from gpt2jax.config import PRESETS
    from gpt2jax.loader import describe

    if path in PRESETS and not os.path.exists(path):
        return PRESETS[path]
    return describe(path).config


def add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="predict the training memory of MODEL and pick the fastest settings that fit",
        description="Compile MODEL's training step for candidate settings (remat, optimizer "
        "state, micro-batches, chunked loss) on abstract shapes, predict each one's peak memory "
        "from XLA's memory analysis (arguments + outputs + temporaries - aliased, per device), "
        "and print what fits --memory and why. Settings given as flags stay fixed; the "
        "`finetune --memory` flag runs the same search. Nothing is allocated.",
    )
    p.add_argument("model", help="model directory, run directory or size name (124M ... 1558M)")
    p.add_argument(
        "--memory", required=True,
        help="memory for the whole run, e.g. 16GB (10^9 bytes), 15GiB (2^30), or auto (the "
        "device's limit; on the CPU the machine's memory)",
    )  # fmt: skip
    p.add_argument(
        "--seq-len", type=int, help="tokens per window (default: the model's context, <= 1024)"
    )
    p.add_argument(
        "--batch-size", type=int, help="windows per update (default: 8, halved while nothing fits)"
    )
    p.add_argument("--grad-accum", type=int, help="micro-batches per update (default: searched)")
    add_memory_flags(p)
    p.set_defaults(func=_cmd_plan)


def settings_from_args(args: argparse.Namespace):
    """``(MemorySettings, names given)``: the memory settings of the flags (defaults where not
    given)."""
    from gpt2jax.train.settings import MemorySettings

    names = [f.name for f in dataclasses.fields(MemorySettings)]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return MemorySettings(**given), set(given)


def _cmd_plan(args: argparse.Namespace) -> int:
    from gpt2jax.device import enable_compile_cache
    from gpt2jax.train.memory.planner import chosen_line, format_row, header, resolve_memory, search
    from gpt2jax.validate import check_number

    for flag, value in (("--batch-size", args.batch_size), ("--grad-accum", args.grad_accum)):
        if value is not None:  # given: checked, never replaced by the default
            check_number(flag, value, low=1, integer=True)
    enable_compile_cache()
    budget, read_as = resolve_memory(args.memory)
    config = model_config(args.model)
    seq_len = args.seq_len if args.seq_len is not None else min(1024, config.n_ctx)
    check_number("--seq-len", seq_len, low=1, high=config.n_ctx, integer=True,
                 hint=f"the model's context is {config.n_ctx} tokens")  # fmt: skip
    base, fixed = settings_from_args(args)
    base.validate()
    if args.grad_accum is not None:
        fixed.add("grad_accum")
    planner = make_planner(config, seq_len, base, fixed=fixed)
    print(f"{args.model}: {config.num_params():,} parameters, seq-len {seq_len}, "
          f"{where(planner)}; --memory {read_as}")  # fmt: skip
    print(header(budget), flush=True)
    batch = args.batch_size if args.batch_size is not None else 8
    chosen, rows = search(
        planner, base, budget, batch, batch_given=args.batch_size is not None,
        fixed=fixed, grad_accum=args.grad_accum if args.grad_accum is not None else 1,
        show=lambda row: print(format_row(row), flush=True),
    )  # fmt: skip
    if chosen is None:
        print("nothing fits: try --lora-rank 16, --param-dtype bfloat16, a shorter --seq-len, "
              "or --parallel fsdp over more devices")  # fmt: skip
        return 1
    row = next(r for r in rows if r.candidate == chosen and r.fits)
    print(chosen_line(row, base))
    return 0


def make_planner(
    config: GPT2Config, seq_len: int, settings, sample_length: int = 64, fixed=frozenset()
):
    """A planner over every device of the run (all processes' with ``GPT2JAX_DISTRIBUTED=1``):
    for ``settings.parallel`` when ``"parallel"`` is in ``fixed`` or there is one device, else
    for both data parallelism and FSDP
    (:class:`gpt2jax.train.memory.planner.EitherParallel`)."""
    import jax

    from gpt2jax.train.memory.planner import EitherParallel, Planner
    from gpt2jax.train.sharding import FSDP

    data = Planner(config, seq_len, n_devices=jax.device_count(), sample_length=sample_length)
    if settings.parallel == "data" and ("parallel" in fixed or jax.device_count() == 1):
        return data
    fsdp = Planner(config, seq_len, fsdp=FSDP(), sample_length=sample_length)
    if "parallel" in fixed or jax.device_count() == 1:
        return fsdp
    return EitherParallel(data, fsdp)


def where(planner) -> str:
    """``8 device(s) in 2 process(es), data or fsdp parallel``."""
    import jax

    modes = " or ".join(planner.parallels)
    return f"{planner.n_devices} device(s) in {jax.process_count()} process(es), {modes} parallel"
