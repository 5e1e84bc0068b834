"""GPT-2 to a GGUF file, for llama.cpp and the tools built on it (ollama, LM Studio, ...)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from gpt2jax.config import EOT_TOKEN, GPT2Config
from gpt2jax.convert import mapping
from gpt2jax.errors import CheckpointError, Gpt2JaxError

GGUF_TYPES = ("float32", "float16", "q8_0")
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _gguf() -> Any:
    try:
        import gguf
    except ModuleNotFoundError:
        raise Gpt2JaxError(
            '--format gguf needs the gguf package: pip install "gpt2jax[gguf]"'
        ) from None
    return gguf


def tensor_type(gguf: Any, name: str, shape: tuple[int, ...], dtype: str) -> Any:
    """The GGML type a tensor is stored in (see the module docstring)."""
    types = gguf.GGMLQuantizationType
    if dtype == "float32" or len(shape) < 2 or name.startswith("position_embd"):
        return types.F32
    if dtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] == 0:
        return types.Q8_0
    return types.F16


def read_vocab(tokenizer_dir: str) -> tuple[list[str], list[str]]:
    """Tokens by id (in the byte-level alphabet of ``encoder.json``) and merges, from a model
    directory's ``encoder.json`` + ``vocab.bpe`` or ``vocab.json`` + ``merges.txt``."""
    for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        vp, mp = os.path.join(tokenizer_dir, vocab), os.path.join(tokenizer_dir, merges)
        if os.path.isfile(vp) and os.path.isfile(mp):
            break
    else:
        raise CheckpointError(
            f"{tokenizer_dir}: no tokenizer files (encoder.json + vocab.bpe) to put in the GGUF"
        )
    with open(vp, encoding="utf-8") as f:
        encoder = json.load(f)
    tokens = [""] * len(encoder)
    for token, i in encoder.items():
        tokens[i] = token
    if any(t == "" for t in tokens):
        raise CheckpointError(f"{vp}: token ids are not 0..{len(tokens) - 1}")
    with open(mp, encoding="utf-8") as f:
        lines = f.read().splitlines()
    merge_lines = [m for m in lines if m and not m.startswith("#version")]
    return tokens, merge_lines


def export_gguf(
    params: Any,
    config: GPT2Config,
    out: str | os.PathLike,
    *,
    tokenizer_dir: str,
    dtype: str = "float32",
    name: str = "gpt2",
    overwrite: bool = False,
) -> str:
    """Writes ``out`` (a ``.gguf`` file) under a temporary name, renamed when complete.

    Written with ggml's own ``gguf`` package (an optional extra: ``pip install "gpt2jax[gguf]"``),
    in the layout llama.cpp's ``convert_hf_to_gguf.py`` gives a Hugging Face GPT-2: architecture
    ``gpt2``; tensor names from ``gguf``'s name table for that architecture (``token_embd``,
    ``position_embd``, ``blk.N.attn_norm``, ``blk.N.attn_qkv``, ``blk.N.attn_output``,
    ``blk.N.ffn_norm``, ``blk.N.ffn_up``, ``blk.N.ffn_down``, ``output_norm``; no ``output``: the
    head is tied, and llama.cpp then uses ``token_embd``); the ``Conv1D`` weights transposed to
    ``(out, in)``; the byte-level BPE vocabulary and merges (``tokenizer.ggml.model = gpt2``,
    pre-tokenizer ``gpt-2``, ``<|endoftext|>`` as BOS/EOS, no BOS added).

    Types: ``float32``; ``float16`` (matrices in float16, vectors and ``position_embd`` in float32,
    as llama.cpp's converter keeps them); ``q8_0`` (those matrices in 8-bit blocks of 32 with a
    float16 scale each; a matrix whose rows do not split into blocks of 32 stays float16).
    """
    gguf = _gguf()
    if dtype not in GGUF_TYPES:
        raise Gpt2JaxError(f"--format gguf stores {', '.join(GGUF_TYPES)}, not {dtype}")
    out = os.fspath(out)
    if os.path.exists(out) and not overwrite:
        raise Gpt2JaxError(f"{out}: exists; pass --force to replace it")
    tokens, merges = read_vocab(tokenizer_dir)
    if len(tokens) != config.n_vocab:
        raise CheckpointError(
            f"{tokenizer_dir}: {len(tokens)} tokens, the model has {config.n_vocab}"
        )
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        _write(gguf, tmp, params, config, tokens, merges, dtype, name)
        os.replace(tmp, out)
    except OSError as e:
        raise Gpt2JaxError(f"{out}: cannot write ({e.strerror})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _write(
    gguf: Any,
    path: str,
    params: Any,
    config: GPT2Config,
    tokens: list[str],
    merges: list[str],
    dtype: str,
    name: str,
) -> None:
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    try:
        file_type = {"float32": "ALL_F32", "float16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}[dtype]
        writer.add_name(name)
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_ctx)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        token_types = [gguf.TokenType.NORMAL] * len(tokens)
        token_types[EOT_TOKEN] = gguf.TokenType.CONTROL
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(EOT_TOKEN)
        writer.add_eos_token_id(EOT_TOKEN)
        writer.add_add_bos_token(False)

        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
        for hf_name, value in mapping.to_theirs(params, config, "hf"):
            base, suffix = hf_name.rsplit(".", 1)
            new = names.get_name(base)
            if new is None:
                raise CheckpointError(f"no GGUF name for {hf_name}")
            value = np.asarray(value, np.float32)
            if hf_name.endswith(_CONV1D):
                value = np.ascontiguousarray(value.T)  # (in, out) -> (out, in), as llama.cpp
            qtype = tensor_type(gguf, new, value.shape, dtype)
            data = value
            if qtype == gguf.GGMLQuantizationType.F16:
                data = value.astype(np.float16)
            elif qtype == gguf.GGMLQuantizationType.Q8_0:
                data = gguf.quants.quantize(value, qtype)
            writer.add_tensor(f"{new}.{suffix}", data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
