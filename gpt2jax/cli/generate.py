"""``gpt2jax generate``: flags and command, registered by :mod:`gpt2jax.cli.main`.

A single sample streams to the terminal as it is generated; several are printed one after the
other, or written to ``--out`` as JSON lines (one :class:`~gpt2jax.generation.host.Generation`
each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from gpt2jax.cli.plan import ATTENTION_HELP
from gpt2jax.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from gpt2jax.errors import DataError, Gpt2JaxError
from gpt2jax.files import read_bytes

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
MAX_PROMPT_FILE_BYTES = 256 * 1024 * 1024


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a model (streams a single sample to the terminal)",
        description="Sample continuations of prompts with a compiled KV-cache sampler. Without "
        "--prompt or --prompt-file the samples are unconditional (they start from "
        "<|endoftext|>).",
    )
    p.add_argument("model", help="model directory (gpt2jax, OpenAI, Hugging Face or a run)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument(
        "--prompt-file",
        help='one prompt per line, or JSON lines with a "prompt" field (.jsonl or lines that '
        'start with "{")',
    )
    p.add_argument("--out", help="write the samples here as JSON lines (checked before any work)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="tokens per sample at most (default: 256, or the model's context if smaller; "
        "a sample ends when the context is full)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="samples decoded together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--include-prompt",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="print (and store) each sample's prompt before its continuation",
    )
    p.add_argument(
        "--stop", action="append", default=[], help="end a sample at this string (repeatable)"
    )
    p.add_argument(
        "--no-stop-at-eot",
        dest="stop_at_eot",
        action="store_false",
        help="keep going after <|endoftext|>",
    )
    p.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="keep the end of a prompt too long for the context instead of refusing it",
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="parameter dtype (default: as stored)")
    p.add_argument(
        "--compute-dtype",
        choices=("auto", *DTYPE_CHOICES),
        default="auto",
        help="matmul dtype, also the KV cache's off the CPU (default auto: bfloat16 on TPUs and "
        "GPUs of compute capability >= 8.0, float16 on older GPUs, float32 on CPUs)",
    )
    p.add_argument("--attention", choices=IMPLEMENTATIONS, default="auto", help=ATTENTION_HELP)
    add_allow_changed_base(p)
    p.set_defaults(func=_cmd_generate)


def add_allow_changed_base(p: argparse.ArgumentParser) -> None:
    """``--allow-changed-base``, for the commands that load a model (a LoRA run included)."""
    p.add_argument(
        "--allow-changed-base",
        action="store_true",
        help="load a LoRA run even if its base model's weights changed since it was trained "
        "(refused otherwise)",
    )


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per non-empty line) or JSON lines ``{"prompt": ...}``: a
    regular UTF-8 file (a leading byte-order mark is dropped) of at most
    :data:`MAX_PROMPT_FILE_BYTES`."""
    try:
        text = read_bytes(path, MAX_PROMPT_FILE_BYTES, DataError).decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the prompt file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() reads
    lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise DataError(f"{path}: no prompts in the file")
    if not (path.endswith(".jsonl") or lines[0][1].lstrip().startswith("{")):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(f'{path}: line {n} has no string "prompt" field')
        prompts.append(record["prompt"])
    return prompts


def _cmd_generate(args: argparse.Namespace) -> int:
    from gpt2jax.device import enable_compile_cache, resolve_compute_dtype
    from gpt2jax.dtypes import DTYPES
    from gpt2jax.files import check_output_file, write_text_atomic
    from gpt2jax.generation.host import check_settings, context_note, generate
    from gpt2jax.loader import describe, load

    prompts = read_prompts(args.prompt_file) if args.prompt_file else args.prompt
    n_prompts = 1 if prompts is None or isinstance(prompts, str) else len(prompts)
    source = describe(args.model)
    check_settings(
        source.config, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, num_samples=args.num_samples,
        batch_size=args.batch_size,
    )  # fmt: skip
    if args.max_new_tokens is not None and args.max_new_tokens > source.config.n_ctx:
        note = context_note(args.max_new_tokens, source.config.n_ctx)
        print(f"gpt2jax: warning: {note.replace('max_new_tokens', '--max-new-tokens', 1)}",
              file=sys.stderr)  # fmt: skip
        args.max_new_tokens = source.config.n_ctx
    if args.out:  # before any work: never found unwritable after all samples are made
        check_output_file(args.out, overwrite=args.force, inputs=[args.prompt_file, source.path])
    enable_compile_cache()
    model = load(
        source,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        compute_dtype=DTYPES[resolve_compute_dtype(args.compute_dtype)],
        attention=args.attention,
        allow_changed_base=args.allow_changed_base,
    )
    streaming = n_prompts * args.num_samples == 1

    def on_token(i: int, ids: list[int], text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if streaming and args.include_prompt and prompts:  # --prompt, or a file of one prompt
        sys.stdout.write(prompts if isinstance(prompts, str) else prompts[0])
    start = time.perf_counter()
    try:
        samples = generate(
            model,
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            greedy=args.greedy,
            seed=args.seed,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            stop_at_eot=args.stop_at_eot,
            stop=args.stop,
            include_prompt=args.include_prompt,
            truncate_prompt=args.truncate_prompt,
            on_token=on_token if streaming else None,
            show_progress=not streaming,
        )
    except Gpt2JaxError as e:
        if args.prompt_file and str(e).startswith("prompt "):  # name the file it came from
            raise Gpt2JaxError(f"{args.prompt_file}: {e}") from None
        raise
    seconds = time.perf_counter() - start
    if streaming:
        print()
    elif not args.out:
        for k, s in enumerate(samples):
            print(f"===== sample {k} (prompt {s.prompt_index}, sample {s.sample_index}) =====")
            print(s.text)
    if args.out:
        lines = "".join(json.dumps(s.to_json(), ensure_ascii=False) + "\n" for s in samples)
        try:
            write_text_atomic(os.path.abspath(args.out), lines)
        except OSError as e:
            raise Gpt2JaxError(f"{args.out}: cannot write the samples ({e.strerror})") from None
    prompt_tokens = sum(len(s.prompt_tokens) for s in samples) if args.include_prompt else 0
    n_tokens = sum(len(s.tokens) for s in samples) - prompt_tokens
    print(
        f"{len(samples)} sample(s), {n_tokens} tokens in {seconds:.1f}s "
        f"({n_tokens / seconds:.1f} tokens/s, compilation included)"
        + (f"; wrote {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return 0
