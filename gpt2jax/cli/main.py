"""The ``gpt2jax`` command line (also ``python -m gpt2jax``).

Each subcommand is a ``_add_<name>(subparsers)`` function that declares its flags and sets
``func`` to a ``_cmd_<name>(args)`` that calls the library. Errors the user can fix arrive as
:class:`~gpt2jax.errors.Gpt2JaxError` and are printed as one line (exit code 1); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from gpt2jax.cli.generate import add_allow_changed_base, add_generate
from gpt2jax.cli.launch import add_launch
from gpt2jax.cli.plan import add_plan
from gpt2jax.cli.train import add_eval, add_finetune
from gpt2jax.errors import Gpt2JaxError, Terminated
from gpt2jax.host_malloc import restart_with_huge_pages

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an OpenAI TF or Hugging Face directory into a gpt2jax model directory",
        description="Convert a model directory into a gpt2jax model directory. SRC is an OpenAI "
        "checkpoint directory (hparams.json, model.ckpt.*, encoder.json, vocab.bpe), read "
        "without TensorFlow, every tensor CRC-checked; or a Hugging Face GPT-2 directory "
        "(config.json + model.safetensors, sharded or not, or pytorch_model.bin, which is "
        "read only with torch.load(weights_only=True)).",
    )
    p.add_argument("src", help="source directory, e.g. models/124M")
    p.add_argument("dst", help="gpt2jax model directory to create, e.g. ckpt/124M")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="stored dtype")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace DST if it is a model directory (never SRC, nor one holding or inside it)",
    )
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    import time

    from gpt2jax.cli.train import quiet_background_errors
    from gpt2jax.dtypes import dtype
    from gpt2jax.store.model_dir import detect
    from gpt2jax.store.sizes import resolve_model

    if not (args.debug or os.environ.get("GPT2JAX_DEBUG") == "1"):
        quiet_background_errors()  # a failed save: orbax's threads print pages of tracebacks
    args.src = resolve_model(args.src)  # a size name ("124M") means the download cache
    kind = detect(args.src)
    start = time.perf_counter()
    if kind == "openai":  # imports neither jax nor orbax (gpt2jax.store.orbax_layout)
        from gpt2jax.convert.openai_tf import convert_openai_dir

        config = convert_openai_dir(
            args.src, args.dst, dtype=dtype(args.dtype), overwrite=args.force, show_progress=True
        )
    elif kind == "hf":
        from gpt2jax.convert.hf import convert_hf_dir

        config = convert_hf_dir(
            args.src, args.dst, dtype=dtype(args.dtype), overwrite=args.force, show_progress=True
        )
    else:
        raise Gpt2JaxError(f"{args.src}: converting a {kind!r} directory is not supported")
    print(
        f"converted {args.src} -> {args.dst}: {config.num_params():,} parameters, "
        f"{args.dtype}, {time.perf_counter() - start:.1f}s"
    )
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to a Hugging Face / PyTorch directory (or OpenAI's TF format)",
        description="Export MODEL (any directory gpt2jax loads) to OUT: by default a Hugging "
        "Face directory that transformers' from_pretrained and AutoTokenizer load "
        "(config.json, model.safetensors, tokenizer files); --format bin writes "
        "pytorch_model.bin instead (needs torch); --format openai writes an OpenAI-style TF "
        "checkpoint directory (no model.ckpt.meta) for OpenAI's code and gpt-2-simple; "
        "--format gguf writes one .gguf file for llama.cpp (needs the gguf package).",
    )
    p.add_argument("model", help="model directory to export, e.g. ckpt/124M or runs/poems")
    p.add_argument("out", help="directory to create, e.g. hf/poems (gguf: a file, poems.gguf)")
    p.add_argument(
        "--format",
        default="safetensors",
        choices=("safetensors", "bin", "openai", "gguf"),
        dest="fmt",
        help="model.safetensors (default), pytorch_model.bin, an OpenAI TF checkpoint, or GGUF",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=(*DTYPE_CHOICES, "q8_0"),
        help="stored dtype (openai: always float32; gguf: float32, float16 or q8_0)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="split the weights into shards above this size, e.g. 5GB, 500MB, 2GiB (default 5GB)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it is a model directory (never MODEL, nor one holding or inside it)",
    )
    add_allow_changed_base(p)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    import time

    from gpt2jax.files import check_destination, check_output_file
    from gpt2jax.loader import describe, load

    start = time.perf_counter()
    if args.fmt == "openai" and args.dtype != "float32":
        raise Gpt2JaxError("--format openai stores float32 (OpenAI's graph declares float32)")
    if args.dtype == "q8_0" and args.fmt != "gguf":
        raise Gpt2JaxError("--dtype q8_0 is for --format gguf")
    source = describe(args.model)
    # what the export reads (the model, and a LoRA run's base model), checked before loading
    inputs = [source.path, source.train.source.model if source.train is not None else None]
    if args.fmt == "gguf":  # one file
        check_output_file(args.out, overwrite=args.force, inputs=inputs)
    else:
        check_destination(args.out, overwrite=args.force, inputs=inputs)
    model = load(source, allow_changed_base=args.allow_changed_base)
    args.model = model.path  # a size name ("124M") resolved to its directory
    if model.config.n_vocab != model.tokenizer.n_vocab:  # no tokenizer files: GPT-2's are written
        print(
            f"gpt2jax: warning: {args.model} has {model.config.n_vocab} tokens (n_vocab) but the "
            f"tokenizer written beside it has {model.tokenizer.n_vocab}: loading {args.out} will "
            "refuse the mismatch",
            file=sys.stderr,
        )
    if args.fmt == "gguf":
        from gpt2jax.convert.gguf_export import export_gguf

        files = [
            export_gguf(
                model.params, model.config, args.out, tokenizer_dir=args.model,
                dtype=args.dtype, name=os.path.basename(os.path.normpath(args.model)),
                overwrite=args.force,
            )
        ]  # fmt: skip
    elif args.fmt == "openai":
        from gpt2jax.convert.openai_export import export_openai

        files = export_openai(
            model.params,
            model.config,
            args.out,
            tokenizer_dir=args.model,
            overwrite=args.force,
            show_progress=True,
            inputs=inputs,
        )
    else:
        import jax

        from gpt2jax.convert.hf import export_hf

        rounding: list[float] = []  # each tensor's max |delta|, measured as it is cast
        files = export_hf(
            model.params,
            model.config,
            args.out,
            dtype=args.dtype,
            fmt=args.fmt,
            tokenizer_dir=args.model,
            max_shard_size=args.max_shard_size,
            overwrite=args.force,
            show_progress=True,
            on_rounding=rounding.append if args.dtype != "float32" else None,
            inputs=inputs,
        )
        if rounding:
            # Says what fewer bits cost this model (a LoRA delta can be below bfloat16's
            # resolution), measured rather than guessed.
            source = "/".join(sorted({x.dtype.name for x in jax.tree.leaves(model.params)}))
            print(
                f"gpt2jax: {args.dtype} export rounds the weights: max |delta| "
                f"{max(rounding):.1e} (relative to {source})",
                file=sys.stderr,
            )
    print(
        f"exported {args.model} -> {args.out} ({args.fmt}, {args.dtype}): {len(files)} files, "
        f"{_du(args.out) / 2**20:,.1f} MiB, {time.perf_counter() - start:.1f}s"
    )
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show a model directory's size, config, parameter count, dtype and source; "
        "without one, this machine's accelerator and the defaults chosen for it",
        description="Describe a model directory (gpt2jax or OpenAI) without loading its "
        "weights. Without PATH: the device JAX computes on and what gpt2jax chooses for it by "
        "default (compute dtype, loss scaling, attention implementation, KV cache dtype, "
        "compile cache).",
    )
    p.add_argument("path", nargs="?", help="model directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from gpt2jax.config import PRESETS
    from gpt2jax.loader import describe

    if args.path is None:
        return _device_info(args.json)

    src = describe(args.path)  # a size name ("124M") means the download cache
    args.path, kind, config = src.path, src.kind, src.config
    info: dict = {"path": os.path.abspath(args.path), "kind": kind}
    if kind == "gpt2jax":
        info.update(
            dtype=src.dtype, source=src.meta.get("source", {}), created=src.meta.get("created")
        )
    elif kind == "openai":
        info.update(dtype=src.dtype, source={"format": "openai-tf"})
    elif kind == "hf":
        hf = src.hf_weights()
        info.update(dtype=hf["dtype"], source={"format": "hf", "weights": hf["files"]})
    else:  # a training run
        start = src.train.source.model or f"random {src.train.source.init} weights"
        info.update(
            dtype=src.dtype, source={"format": "gpt2jax-run", "from": start, "step": src.step}
        )
    shape = config.to_hparams()
    size = next((name for name, c in PRESETS.items() if c.to_hparams() == shape), None)
    info.update(
        size=size or "custom",
        config=config.to_dict(),
        num_params=config.num_params(),
        disk_bytes=_du(args.path),
        tokenizer=" + ".join(src.tokenizer or ()) or "tiktoken gpt2 (no files in the directory)",
    )
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    print(f"{info['path']}  ({kind} model directory)")
    print(f"  size        {info['size']}")
    print(f"  parameters  {info['num_params']:,}")
    print(f"  dtype       {info['dtype']}")
    print(
        f"  config      n_layer={c['n_layer']} n_head={c['n_head']} n_embd={c['n_embd']} "
        f"n_ctx={c['n_ctx']} n_vocab={c['n_vocab']}"
    )
    print(f"  on disk     {info['disk_bytes'] / 2**20:,.1f} MiB")
    print(f"  tokenizer   {info['tokenizer']}")
    if info.get("source"):
        print(f"  source      {json.dumps(info['source'])}")
    if info.get("created"):
        print(f"  created     {info['created']}")
    return 0


def _device_info(as_json: bool) -> int:
    import flax
    import jax

    from gpt2jax.device import enable_compile_cache, summary

    enable_compile_cache()  # what the commands that compile do
    info = summary()
    info.update(jax=jax.__version__, flax=flax.__version__)
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    capability = info["compute_capability"]
    print(f"device         {info['count']} x {info['device']} ({info['platform']}"
          + (f", compute capability {capability}" if capability else "") + ")")  # fmt: skip
    scaling = " with dynamic loss scaling" if info["loss_scaling"] else ""
    print(f"compute dtype  {info['compute_dtype']}{scaling} (parameters, LayerNorm, softmax "
          "and loss in float32)")  # fmt: skip
    print(f"attention      {info['attention_train_1024']} (training at 1024 tokens)")
    print(f"kv cache       {info['kv_cache_dtype']}")
    print(f"compile cache  {info['compile_cache'] or 'off'}")
    print(f"versions       jax {info['jax']}, flax {info['flax']}")
    return 0


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="download OpenAI's GPT-2 checkpoints (124M, 355M, 774M, 1558M)",
        description="Download OpenAI's checkpoint of each SIZE into DIR/SIZE (default "
        "$GPT2JAX_CACHE/models, else ~/.cache/gpt2jax/models), where a size name then finds "
        "it: `gpt2jax finetune 355M ...`. Resumes partial files, skips complete ones.",
    )
    p.add_argument("sizes", nargs="+", metavar="SIZE", help="124M, 355M, 774M or 1558M")
    p.add_argument("--dir", help="folder the size directories go in")
    p.add_argument(
        "--base-url",
        help="mirror serving BASE_URL/SIZE/FILE (default $GPT2JAX_BASE_URL, else OpenAI's)",
    )
    p.add_argument(
        "--convert",
        action="store_true",
        help="also write a gpt2jax model directory SIZE-gpt2jax beside each (loads faster)",
    )
    p.set_defaults(func=_cmd_download)


def _cmd_download(args: argparse.Namespace) -> int:
    from gpt2jax.cli.train import quiet_background_errors
    from gpt2jax.store.download import download
    from gpt2jax.store.sizes import convert_downloaded

    if args.convert and not (args.debug or os.environ.get("GPT2JAX_DEBUG") == "1"):
        quiet_background_errors()  # see _cmd_convert

    for directory in download(args.sizes, dest=args.dir, base_url=args.base_url):
        print(directory)
        if args.convert:
            print(convert_downloaded(directory))
    return 0


def _du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


#: Subcommands in the order ``--help`` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_convert,
    _add_export,
    _add_info,
    _add_download,
    add_generate,
    add_finetune,
    add_eval,
    add_plan,
    add_launch,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2jax",
        description="GPT-2 in JAX: convert OpenAI checkpoints, fine-tune, generate, export.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def script_main(script: str, argv: list[str]) -> int:
    """``python convert/SCRIPT.py ARGV``: ``hf`` is ``import SRC DST`` (= ``convert``) or
    ``export MODEL OUT``, ``openai_export`` is ``export MODEL OUT --format openai``,
    ``openai_tf`` is ``convert SRC DST`` (same flags as the commands)."""
    if script == "openai_export":
        return main(["export", *argv, "--format", "openai"])
    if script == "openai_tf":
        return main(["convert", *argv])
    if not argv or argv[0] not in ("import", "export"):
        print(
            "usage: python convert/hf.py import HF_DIR DST [--dtype D] [--force]\n"
            "       python convert/hf.py export MODEL OUT [--format safetensors|bin] [--dtype D] "
            "[--max-shard-size 5GB] [--force]",
            file=sys.stderr,
        )
        return 2
    return main(["convert" if argv[0] == "import" else "export", *argv[1:]])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gpt2jax`` console script."""
    program = argv is None  # the command itself, not a call from Python code
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if program and args.command == "finetune":
        restart_with_huge_pages()  # returns where it changes nothing
    debug = args.debug or os.environ.get("GPT2JAX_DEBUG") == "1"
    try:
        return args.func(args) or 0
    except Gpt2JaxError as e:
        if debug:
            raise
        print(f"gpt2jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM where a command cleans up first
        print(f"gpt2jax {args.command}: interrupted", file=sys.stderr)
        code = 143 if isinstance(e, Terminated) else 130
        if program:
            _exit_now(code)
        return code


def _exit_now(code: int) -> None:
    """Ends the process at once: an interrupted command has cleaned up what it wrote, and
    interpreter shutdown would wait seconds to minutes for the work it abandoned (orbax's and
    TensorStore's threads finishing a save)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
