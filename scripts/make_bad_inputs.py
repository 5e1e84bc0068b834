"""Write the bad-input corpus: ``tests/fixtures/bad_inputs/`` (deterministic; run to regenerate).

    python scripts/make_bad_inputs.py [--out tests/fixtures/bad_inputs]

Every case is a damaged copy of a small, valid *base* directory, and only the damaged files are
stored: ``cases/<dir>/`` holds the files that replace (or are added to) the base's, and the
manifest says which base files to delete. The bases:

* ``bases/openai_mini/``: an OpenAI TF checkpoint directory (``hparams.json``, ``checkpoint``,
  ``model.ckpt.index``, ``model.ckpt.data-00000-of-00001``) of a 1-layer, 6-wide, 97-token
  GPT-2 with random weights, written with :func:`gpt2jax.formats.tf_bundle.write_bundle`;
* ``bases/hf_mini/``: the same weights as a Hugging Face directory (``config.json`` +
  ``model.safetensors``, written with :mod:`gpt2jax.formats.safetensors_io`);
* ``gpt2jax_mini`` (not stored: orbax's files hold timestamps): ``openai_mini`` converted with
  ``gpt2jax convert`` when the cases run;
* ``tests/fixtures/openai_tiny`` (the real 50257-token vocabulary) for the data-file cases.

Inputs too big to commit (huge single lines) are described in the manifest (``generate``) and
written when the cases run. ``manifest.json`` lists each case: its files, the command to run
(``{case}`` is the assembled case directory, ``{dst}`` a destination that must not exist
afterwards, ``{tiny}`` ``tests/fixtures/openai_tiny``), and what must come out: a non-zero exit and
one error line naming ``expect.file`` and saying ``expect.phrase`` (or, for ``expect.exit`` 0, a
warning). ``scripts/bad_input_table.py`` runs them and prints the table;
``tests/test_bad_inputs.py`` asserts it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MINI = {"n_vocab": 97, "n_ctx": 11, "n_embd": 6, "n_head": 2, "n_layer": 1}
SEED = 20240808
DATA = "model.ckpt.data-00000-of-00001"
INDEX = "model.ckpt.index"
ST = "model.safetensors"

#: What each case's error must say (``case(..., phrase="")`` takes it from here).
EXPECT = {
    "tf_data_truncated": "has 2808 bytes, tensor 'model/h0/attn/c_attn/w' needs bytes",
    "tf_data_truncated_generate": "has 2808 bytes, tensor 'model/h0/attn/c_attn/w' needs bytes",
    "tf_data_zero_length": "has 0 bytes, tensor 'model/wte' needs bytes",
    "tf_data_missing": "does not exist (listed by",
    "tf_data_bitflip": "fails its CRC32C check",
    "tf_index_truncated": "not a TensorFlow checkpoint index",
    "tf_index_zero_length": "is empty (0 bytes)",
    "tf_index_bitflip": "fails its CRC32C check",
    "tf_index_missing": "no TensorFlow checkpoint",
    "tf_wrong_dtype": "has dtype int32; GPT-2 weights are floating point",
    "tf_wrong_shape": "tensor model/wte has shape (97, 7) but",
    "tf_missing_tensor": "missing 1 tensors (e.g. 'model/h0/mlp/c_fc/w')",
    "tf_extra_tensor": "unexpected 1 tensors (e.g. 'model/h1/ln_1/g')",
    "hparams_missing_key": "missing n_head",
    "hparams_missing_key_convert": "missing n_head",
    "hparams_extra_key": "unknown keys n_experts",
    "hparams_negative": "n_layer must be a positive integer, got -1",
    "hparams_zero": "n_embd must be a positive integer, got 0",
    "hparams_absurd": "n_ctx=1000000000000 is absurdly large",
    "hparams_huge_int": "not valid JSON (Exceeds the limit (4300 digits)",
    "hparams_not_divisible": "n_embd (6) must be divisible by n_head (4)",
    "hparams_wrong_type": "n_layer must be a positive integer, got '1'",
    "hparams_float": "n_embd must be a positive integer, got 6.0",
    "hparams_not_object": "expected a JSON object, got list",
    "hparams_truncated": "not valid JSON",
    "hparams_zero_length": "not valid JSON",
    "hparams_binary": "not valid JSON",
    "hparams_disagree": "does not match a GPT-2 with n_layer=2: missing 12 tensors",
    "g2j_config_no_format": "not a model directory",
    "g2j_format_version": "format_version 99 is not supported",
    "g2j_config_missing": "expected a JSON object",
    "g2j_config_negative": "n_layer must be a positive integer, got -2",
    "g2j_config_extra": "unknown keys n_experts",
    "g2j_config_mismatch": "parameters do not match config.json",
    "g2j_config_mismatch_generate": "parameters do not match config.json",
    "g2j_config_truncated": "not valid JSON",
    "g2j_params_missing": "missing (the model directory has no params)",
    "hf_missing_tensor": "missing 1 tensors (e.g. 'h.0.mlp.c_fc.weight')",
    "hf_extra_tensor": "unexpected 1 tensors (e.g. 'h.1.ln_1.weight')",
    "hf_wrong_shape": "tensor wte.weight has shape (97, 7) but",
    "hf_wrong_dtype": "has dtype int32; GPT-2 weights are floating point",
    "hf_truncated": "(truncated file)",
    "hf_zero_length": "0 bytes is too short for safetensors",
    "hf_header_bitflip": "needs exactly dtype, shape and data_offsets",
    "hf_no_weights": "no weights (expected model.safetensors",
    "hf_config_missing_key": "missing n_layer",
    "hf_config_negative": "n_embd must be a positive integer, got -6",
    "hf_config_model_type": "model_type is 'llama', only 'gpt2' is supported",
    "hf_config_disagree": "does not match a GPT-2 with n_layer=2: missing 12 tensors",
    "hf_index_missing_shard": "shard model-00001-of-00002.safetensors is missing",
    "tokenizer_disagree": "disagree: the merges do not produce the encoder's ids",
    "tokenizer_disagree_generate": "disagree: the merges do not produce the encoder's ids",
    "tokenizer_too_small": "<|endoftext|> must be id 50256",
    "tokenizer_not_json": "unreadable tokenizer file",
    "tokenizer_only_encoder": "file not found (a tokenizer needs both encoder.json and vocab.bpe)",
    "hf_tokenizer_disagree": "vocab.json + merges.txt do not hold GPT-2's BPE vocabulary",
    "data_binary": "looks like a binary file (NUL bytes)",
    "data_mostly_invalid_utf8": "looks like a binary file (mostly invalid UTF-8)",
    "data_empty": "no text (the data is empty or only whitespace)",
    "data_whitespace": "no text (the data is empty or only whitespace)",
    "data_mixed_encoding": "100 undecodable byte sequence(s) replaced with U+FFFD",
    "data_jsonl_invalid": "corpus.jsonl:2: not valid JSON",
    "data_jsonl_no_field": "corpus.jsonl:1: no 'text' field",
    "data_csv_no_column": "3 columns (a, b, c); choose one with --column",
    "data_huge_line_jsonl": "huge.jsonl:1: not valid JSON",
    "data_huge_header_csv": "columns (column0, column1,",
    "prompt_not_utf8": "not UTF-8 text",
    "prompt_empty": "no prompts in the file",
    "prompt_huge_line": "prompt 0 has 201674 tokens, the model's context is 29",
}


def mini_params() -> dict:
    """Random weights of the mini model (our nested tree, float32)."""
    from gpt2jax.config import GPT2Config
    from gpt2jax.convert import mapping

    rng = np.random.default_rng(SEED)
    flat = {
        path: (0.3 * rng.standard_normal(shape)).astype(np.float32)
        for path, shape in mapping.our_shapes(GPT2Config(**MINI)).items()
    }
    return mapping.unflatten(flat)


def openai_tensors(hparams: dict | None = None, params: dict | None = None) -> dict:
    from gpt2jax.config import GPT2Config
    from gpt2jax.convert import mapping

    config = GPT2Config(**(hparams or MINI))
    return dict(mapping.to_theirs(params or mini_params(), config, "openai"))


def hf_tensors() -> dict:
    from gpt2jax.config import GPT2Config
    from gpt2jax.convert import mapping

    named = mapping.to_theirs(mini_params(), GPT2Config(**MINI), "hf")
    return {"transformer." + name: value for name, value in named}


def bundle_bytes(tensors: dict, tmp: Path) -> dict[str, bytes]:
    """``{index name: bytes, data name: bytes}`` of a bundle holding ``tensors``."""
    from gpt2jax.formats.tf_bundle import write_bundle

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_bundle(tmp / "model.ckpt", tensors)
    return {INDEX: (tmp / INDEX).read_bytes(), DATA: (tmp / DATA).read_bytes()}


def safetensors_bytes(tensors: dict, tmp: Path) -> bytes:
    from gpt2jax.formats.safetensors_io import write_file

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = [(name, value.dtype, value.shape) for name, value in tensors.items()]
    write_file(tmp / ST, specs, tensors.items(), metadata={"format": "pt"})
    return (tmp / ST).read_bytes()


def hf_config(**changes: Any) -> dict:
    from gpt2jax.config import GPT2Config

    config = GPT2Config(**MINI).to_hf_config()
    config["torch_dtype"] = "float32"
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def as_json(data: Any) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[offset] ^= 1 << bit
    return bytes(b)


def small_tokenizer(disagree: bool) -> tuple[bytes, bytes]:
    """``encoder.json`` + ``vocab.bpe`` with OpenAI's 256 byte tokens and first 40 merges; with
    ``disagree`` two merged tokens swap their ids."""
    encoder = json.loads((FIXTURES / "openai_tiny" / "encoder.json").read_text("utf-8"))
    lines = (FIXTURES / "openai_tiny" / "vocab.bpe").read_text("utf-8").split("\n")
    merges = lines[1:41]
    small = {tok: i for tok, i in encoder.items() if i < 256 + len(merges)}
    if disagree:
        a, b = (next(t for t, i in small.items() if i == k) for k in (260, 270))
        small[a], small[b] = small[b], small[a]
    vocab = "\n".join([lines[0], *merges]) + "\n"
    return json.dumps(small, ensure_ascii=False).encode(), vocab.encode()


# ---- the cases ---------------------------------------------------------------------------------


def case(
    name: str,
    group: str,
    what: str,
    args: list[str],
    phrase: str,
    file: str,
    *,
    base: str | None = None,
    files: dict[str, bytes] | None = None,
    remove: tuple[str, ...] = (),
    dir: str | None = None,
    generate: list[dict] | None = None,
    exit: int | None = None,
    dst: bool = True,
    place: bool = True,
    **expect: Any,
) -> dict:
    """One manifest entry (``files``: the case's own bytes, written by :func:`main`; ``expect``:
    more of what must come out, see ``scripts/bad_input_table.py``)."""
    entry = {
        "name": name,
        "group": group,
        "what": what,
        "base": base,
        "dir": dir or name,
        "remove": list(remove),
        "generate": generate,
        "args": args,
        "place": place,  # False: the own files are only referred to ({own}/NAME)
        "destination": "{dst}" if dst else None,
        "expect": {"exit": exit, "phrase": phrase or EXPECT[name], "file": file, **expect},
    }
    entry["_files"] = files or {}
    return entry


def cases(tmp: Path) -> list[dict]:
    base_bundle = bundle_bytes(openai_tensors(), tmp / "bundle")
    data, index = base_bundle[DATA], base_bundle[INDEX]
    hp = as_json(MINI)
    convert = ["convert", "{case}", "{dst}"]
    info = ["info", "{case}"]
    tf, hf, g2j = "openai_mini", "hf_mini", "gpt2jax_mini"
    out: list[dict] = []
    add = out.append

    # -- TF checkpoints ------------------------------------------------------------------------
    T = "TF checkpoint"
    add(case("tf_data_truncated", T, "data file cut to 60%", convert, "", DATA, base=tf,
             files={DATA: data[: len(data) * 6 // 10]}))  # fmt: skip
    add(case("tf_data_truncated_generate", T, "the same, through generate",
             ["generate", "{case}", "--prompt", "Hi", "--out", "{dst}"], "", DATA, base=tf,
             dir="tf_data_truncated"))  # fmt: skip
    add(case("tf_data_zero_length", T, "data file empty", convert, "", DATA, base=tf,
             files={DATA: b""}))  # fmt: skip
    add(case("tf_data_missing", T, "no data file", convert, "", DATA, base=tf, remove=(DATA,)))
    add(case("tf_data_bitflip", T, "one bit flipped in a tensor", convert, "", DATA, base=tf,
             files={DATA: flip(data, len(data) // 2, 3)}))  # fmt: skip
    add(case("tf_index_truncated", T, "index cut in half", convert, "", INDEX, base=tf,
             files={INDEX: index[: len(index) // 2]}))  # fmt: skip
    add(case("tf_index_zero_length", T, "index empty", convert, "", INDEX, base=tf,
             files={INDEX: b""}))  # fmt: skip
    add(case("tf_index_bitflip", T, "one bit flipped in the index", convert, "", INDEX, base=tf,
             files={INDEX: flip(index, 40, 5)}))  # fmt: skip
    add(case("tf_index_missing", T, "no index (only the data file)", convert, "", "{case}",
             base=tf, remove=(INDEX, "checkpoint")))  # fmt: skip
    tensors = openai_tensors()
    wrong_dtype = {k: (v * 1000).astype(np.int32) for k, v in tensors.items()}
    add(case("tf_wrong_dtype", T, "int32 tensors", convert, "", INDEX, base=tf,
             files=bundle_bytes(wrong_dtype, tmp / "b1")))  # fmt: skip
    wrong_shape = dict(tensors, **{"model/wte": np.zeros((97, 7), np.float32)})
    add(case("tf_wrong_shape", T, "wte is (97, 7), hparams say n_embd 6", convert, "", INDEX,
             base=tf, files=bundle_bytes(wrong_shape, tmp / "b2")))  # fmt: skip
    missing = {k: v for k, v in tensors.items() if k != "model/h0/mlp/c_fc/w"}
    add(case("tf_missing_tensor", T, "no model/h0/mlp/c_fc/w", convert, "", INDEX, base=tf,
             files=bundle_bytes(missing, tmp / "b3")))  # fmt: skip
    extra = dict(tensors, **{"model/h1/ln_1/g": np.ones(6, np.float32)})
    add(case("tf_extra_tensor", T, "a tensor of a second layer", convert, "", INDEX, base=tf,
             files=bundle_bytes(extra, tmp / "b4")))  # fmt: skip

    # -- hparams.json --------------------------------------------------------------------------
    H, HP = "hparams.json", "hparams.json"

    def hparams(name: str, what: str, content: Any, args: list[str] = convert) -> None:
        raw = content if isinstance(content, bytes) else as_json(content)
        add(case(name, H, what, args, "", HP, base=tf, files={HP: raw}, dst="{dst}" in args))

    drop = {k: v for k, v in MINI.items() if k != "n_head"}
    hparams("hparams_missing_key", "no n_head", drop, info)
    hparams("hparams_missing_key_convert", "no n_head, through convert", drop)
    hparams("hparams_extra_key", "an unknown key n_experts", dict(MINI, n_experts=8))
    hparams("hparams_negative", "n_layer -1", dict(MINI, n_layer=-1), info)
    hparams("hparams_zero", "n_embd 0", dict(MINI, n_embd=0))
    hparams("hparams_absurd", "n_ctx 10**12", dict(MINI, n_ctx=10**12), info)
    hparams("hparams_huge_int", "a 5000-digit n_vocab", b'{"n_vocab": ' + b"9" * 5000 + b"}")
    hparams("hparams_not_divisible", "n_head 4 does not divide n_embd 6", dict(MINI, n_head=4))
    hparams("hparams_wrong_type", 'n_layer is the string "1"', dict(MINI, n_layer="1"))
    hparams("hparams_float", "n_embd is 6.0", dict(MINI, n_embd=6.0))
    hparams("hparams_not_object", "a JSON list", [MINI], info)
    hparams("hparams_truncated", "JSON cut mid-way", hp[: len(hp) // 2])
    hparams("hparams_zero_length", "empty file", b"", info)
    hparams("hparams_binary", "not UTF-8", b"\xff\xfe\x00\x01" * 8)
    add(case("hparams_disagree", H, "n_layer 2, the checkpoint has 1 layer", convert, "", INDEX,
             base=tf, files={HP: as_json(dict(MINI, n_layer=2))}))  # fmt: skip

    # -- gpt2jax model directories (config.json) -------------------------------------------------
    G, CJ = "gpt2jax config.json", "config.json"
    export = ["export", "{case}", "{dst}"]

    def g2j_config(name: str, what: str, change: dict | bytes | None, args=export, **kw) -> None:
        files = {}
        if isinstance(change, bytes):
            files[CJ] = change
        elif change is not None:
            files["config.json.patch"] = as_json(change)
        add(case(name, G, what, args, "", kw.pop("file", CJ), base=g2j, files=files,
                 dst="{dst}" in args, **kw))  # fmt: skip

    g2j_config("g2j_config_no_format", "no format key", {"format": None})
    g2j_config("g2j_format_version", "format_version 99", {"format_version": 99}, info)
    g2j_config("g2j_config_missing", "the config object is missing", {"config": None})
    g2j_config("g2j_config_negative", "config.n_layer -2", {"config": {"n_layer": -2}})
    g2j_config("g2j_config_extra", "config has n_experts", {"config": {"n_experts": 8}}, info)
    g2j_config("g2j_config_mismatch", "n_embd 12 (the params are 6 wide)",
               {"config": {"n_embd": 12}})  # fmt: skip
    g2j_config("g2j_config_mismatch_generate", "the same, through generate",
               {"config": {"n_embd": 12}},
               ["generate", "{case}", "--prompt", "Hi", "--out", "{dst}"])  # fmt: skip
    g2j_config("g2j_config_truncated", "config.json cut mid-way", b'{"format": "gpt2jax", "con')
    g2j_config("g2j_params_missing", "no params/ directory", None, file="params",
               remove=("params",))  # fmt: skip

    # -- Hugging Face directories --------------------------------------------------------------
    F = "HF directory"
    hft = hf_tensors()
    st = safetensors_bytes(hft, tmp / "st0")

    def hf_case(name: str, what: str, *, tensors: dict | None = None, raw: bytes | None = None,
                config: dict | None = None, args=convert, file=ST, **kw) -> None:  # fmt: skip
        files = {}
        if tensors is not None:
            raw = safetensors_bytes(tensors, tmp / name)
        if raw is not None:
            files[ST] = raw
        if config is not None:
            files[CJ] = as_json(config)
        add(case(name, F, what, args, "", file, base=hf, files=files, dst="{dst}" in args, **kw))

    hf_case("hf_missing_tensor", "no h.0.mlp.c_fc.weight",
            tensors={k: v for k, v in hft.items() if "c_fc.weight" not in k})  # fmt: skip
    hf_case(
        "hf_extra_tensor",
        "a tensor of a second layer",
        tensors=dict(hft, **{"transformer.h.1.ln_1.weight": np.ones(6, np.float32)}),
    )
    hf_case(
        "hf_wrong_shape",
        "wte is (97, 7)",
        tensors=dict(hft, **{"transformer.wte.weight": np.zeros((97, 7), np.float32)}),
    )
    hf_case("hf_wrong_dtype", "int32 tensors",
            tensors={k: (v * 1000).astype(np.int32) for k, v in hft.items()})  # fmt: skip
    hf_case("hf_truncated", "model.safetensors cut to 70%", raw=st[: len(st) * 7 // 10])
    hf_case("hf_zero_length", "model.safetensors empty", raw=b"")
    hf_case("hf_header_bitflip", "one bit flipped in the JSON header", raw=flip(st, 20, 1))
    hf_case("hf_no_weights", "no weights file", remove=(ST,), file="{case}")
    hf_case("hf_config_missing_key", "config.json has no n_layer",
            config=hf_config(n_layer=None), file=CJ)  # fmt: skip
    hf_case("hf_config_negative", "config.json n_embd -6", config=hf_config(n_embd=-6), file=CJ,
            args=info)  # fmt: skip
    hf_case("hf_config_model_type", 'model_type "llama"', config=hf_config(model_type="llama"),
            file=CJ)  # fmt: skip
    hf_case("hf_config_disagree", "config.json says 2 layers, the weights hold 1",
            config=hf_config(n_layer=2), file=ST)  # fmt: skip
    index = {"metadata": {"total_size": 1}, "weight_map": {k: "model-00001-of-00002.safetensors"
                                                            for k in hft}}  # fmt: skip
    add(case("hf_index_missing_shard", F, "an index naming a shard that is not there", convert,
             "", "model.safetensors.index.json", base=hf, remove=(ST,),
             files={"model.safetensors.index.json": as_json(index)}))  # fmt: skip

    # -- tokenizer files -----------------------------------------------------------------------
    K = "tokenizer"
    enc, bpe = small_tokenizer(disagree=True)
    add(
        case(
            "tokenizer_disagree",
            K,
            "encoder.json ids are not vocab.bpe's merges",
            convert,
            "",
            "encoder.json",
            base=tf,
            files={"encoder.json": enc, "vocab.bpe": bpe},
        )
    )
    add(case("tokenizer_disagree_generate", K, "the same, through generate",
             ["generate", "{case}", "--prompt", "Hi", "--out", "{dst}"], "", "encoder.json",
             base=tf, dir="tokenizer_disagree"))  # fmt: skip
    enc, bpe = small_tokenizer(disagree=False)
    add(
        case(
            "tokenizer_too_small",
            K,
            "a consistent vocabulary of 296 tokens",
            convert,
            "",
            "encoder.json",
            base=tf,
            files={"encoder.json": enc, "vocab.bpe": bpe},
        )
    )
    add(case("tokenizer_not_json", K, "encoder.json cut mid-way", convert, "", "encoder.json",
             base=tf, files={"encoder.json": enc[:300], "vocab.bpe": bpe}))  # fmt: skip
    add(case("tokenizer_only_encoder", K, "encoder.json without vocab.bpe", convert, "",
             "vocab.bpe", base=tf, files={"encoder.json": enc}))  # fmt: skip
    enc, bpe = small_tokenizer(disagree=True)
    add(
        case(
            "hf_tokenizer_disagree",
            K,
            "vocab.json ids are not merges.txt's merges",
            convert,
            "",
            "vocab.json",
            base=hf,
            files={"vocab.json": enc, "merges.txt": bpe},
        )
    )

    # -- data files (the real vocabulary: tests/fixtures/openai_tiny) --------------------------
    D = "data file"
    english = (FIXTURES / "english.txt").read_text("utf-8")
    finetune = ["finetune", "{tiny}", "--out", "{dst}", "--seq-len", "8", "--data"]
    evaluate = ["eval", "{tiny}", "--seq-len", "8", "--data"]

    def data(name: str, what: str, filename: str, content: bytes | None, args: list[str],
             **kw) -> None:  # fmt: skip
        files = {filename: content} if content is not None else {}
        add(case(name, D, what, [*args, "{case}/" + filename], "", filename,
                 files=files, dst="{dst}" in args, **kw))  # fmt: skip

    data("data_binary", "NUL bytes (a gzip header)", "corpus.txt",
         b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4, finetune)  # fmt: skip
    data(
        "data_mostly_invalid_utf8",
        "random bytes without NUL",
        "corpus.txt",
        np.random.default_rng(SEED).integers(1, 256, 4096, dtype=np.uint8).tobytes(),
        finetune,
    )
    data("data_empty", "zero bytes", "corpus.txt", b"", finetune)
    data("data_whitespace", "only whitespace", "corpus.txt", b" \n\n\t \r\n" * 50, evaluate)
    mixed = (english[:1500] + "\n").encode() + "Caf\xe9 cr\xe8me br\xfbl\xe9e, na\xefve ".encode(
        "latin-1") * 20 + ("\n" + english[1500:3000]).encode()  # fmt: skip
    data("data_mixed_encoding", "UTF-8 text with latin-1 lines", "corpus.txt", mixed, evaluate,
         exit=0)  # fmt: skip
    data("data_jsonl_invalid", "a line that is not JSON", "corpus.jsonl",
         b'{"text": "fine"}\n{"text": "broken\n', finetune)  # fmt: skip
    data("data_jsonl_no_field", 'no "text" field', "corpus.jsonl", b'{"body": "hello"}\n',
         finetune)  # fmt: skip
    data("data_csv_no_column", "three columns, none called text", "corpus.csv",
         b"a,b,c\n1,2,3\n", finetune)  # fmt: skip
    data(
        "data_huge_line_jsonl",
        "one 3 MB line that is not valid JSON",
        "huge.jsonl",
        None,
        evaluate,
        generate=[{"path": "{case}/huge.jsonl", "kind": "jsonl_unterminated", "bytes": 3 << 20}],
    )
    data(
        "data_huge_header_csv",
        "a 2 MB header line of 200,000 columns",
        "huge.csv",
        None,
        evaluate,
        generate=[{"path": "{case}/huge.csv", "kind": "csv_columns", "bytes": 2 << 20}],
    )
    generate = ["generate", "{tiny}", "--out", "{dst}", "--prompt-file"]
    data("prompt_not_utf8", "a latin-1 prompt file", "prompts.txt", "Caf\xe9\n".encode("latin-1"),
         generate)  # fmt: skip
    data("prompt_empty", "an empty prompt file", "prompts.txt", b"\n\n", generate)
    data(
        "prompt_huge_line",
        "a 1 MB single-line prompt",
        "prompts.txt",
        None,
        generate,
        generate=[{"path": "{case}/prompts.txt", "kind": "words", "bytes": 1 << 20}],
    )
    out += second_pass_cases(tmp)
    return out


def second_pass_cases(tmp: Path) -> list[dict]:
    """Issue 15's kinds: outputs that would destroy inputs, two writers of a run, damaged and
    live runs, GPT-2 variants and vocabularies converted silently, unbounded reads, untidy
    errors, flags that let NaN in."""
    tf, hf, g2j, run = "openai_mini", "hf_mini", "gpt2jax_mini", "run_tiny"
    out: list[dict] = []
    add = out.append
    hi = ["--prompt", "Hi", "--max-new-tokens", "2"]

    def gen(kind: str, path: str, **kw: Any) -> dict:
        return {"kind": kind, "path": path, **kw}

    # -- outputs never destroy inputs (with or without --force) -------------------------------
    O = "output onto input"
    add(case("convert_onto_itself", O, "convert SRC SRC --force", ["convert", "{case}", "{case}",
             "--force"], "is the input", "{case}", base=tf, dst=False))  # fmt: skip
    add(case("convert_into_its_parent", O, "convert SRC PARENT --force (holds SRC and more)",
             ["convert", "{case}", "{home}", "--force"], "contains the input", "{home}", base=tf,
             dst=False))  # fmt: skip
    add(case("convert_inside_source", O, "convert SRC SRC/sub", ["convert", "{case}",
             "{case}/sub"], "is inside the input", "{case}/sub", base=tf, dst=False))  # fmt: skip
    add(case("export_onto_itself", O, "export MODEL MODEL --force", ["export", "{case}", "{case}",
             "--force"], "is the input", "{case}", base=g2j, dst=False))  # fmt: skip
    add(case("export_into_its_parent", O, "export MODEL PARENT --force",
             ["export", "{case}", "{home}", "--force"], "contains the input", "{home}", base=g2j,
             dst=False))  # fmt: skip
    add(case("export_openai_inside_model", O, "export MODEL MODEL/tf --format openai",
             ["export", "{case}", "{case}/tf", "--format", "openai"], "is inside the input",
             "{case}/tf", base=g2j, dst=False))  # fmt: skip
    add(case("export_force_non_model_dir", O, "--force onto a folder of other files",
             ["export", "{case}", "{home}/notes", "--force"],
             "--force replaces only a model directory", "{home}/notes", base=g2j, dst=False,
             generate=[gen("text", "{home}/notes/todo.txt", text="not a model\n")]))  # fmt: skip
    add(case("export_lora_base_inside_out", O, "export a LoRA run into its base's parent",
             ["export", "{case}", "{home}", "--force"], "contains the input", "{home}",
             dst=False, generate=[
                 gen("copy", "{home}/base", **{"from": "{bases}/openai_mini"}),
                 gen("run", "{case}", model="{home}/base", lora_rank=2)]))  # fmt: skip
    add(case("generate_out_is_prompt_file", O, "--out is the --prompt-file (with --force)",
             ["generate", "{tiny}", "--prompt-file", "{case}/p.txt", "--out", "{case}/p.txt",
              "--force", "--max-new-tokens", "2"], "is the input", "{case}/p.txt",
             files={"p.txt": b"Hello\n"}, dst=False))  # fmt: skip
    add(case("generate_out_exists", O, "--out names an existing file", ["generate", "{tiny}",
             *hi, "--out", "{case}/old.jsonl"], "already exists (use --force",
             "{case}/old.jsonl", files={"old.jsonl": b'{"text": "kept"}\n'},
             dst=False))  # fmt: skip
    add(case("generate_out_no_directory", O, "--out in a directory that does not exist",
             ["generate", "{tiny}", *hi, "--out", "{home}/missing/s.jsonl"], "cannot be written",
             "{home}/missing/s.jsonl", dst=False))  # fmt: skip
    add(case("generate_out_is_directory", O, "--out is a directory", ["generate", "{tiny}", *hi,
             "--out", "{case}", "--force"], "is a directory, not a regular file", "{case}",
             dst=False))  # fmt: skip
    add(case("generate_out_inside_model", O, "--out inside the model directory",
             ["generate", "{case}", *hi, "--out", "{case}/samples.jsonl"],
             "is inside the input", "{case}/samples.jsonl", base=g2j, dst=False))  # fmt: skip
    add(case("finetune_out_inside_data_dir", O, "run directory inside the --data folder",
             ["finetune", "{tiny}", "--data", "{case}", "--out", "{case}/run", "--seq-len", "8"],
             "is inside the input", "{case}/run", dst=False,
             generate=[gen("copy", "{case}/a.txt", **{"from": "{english}"})]))  # fmt: skip
    add(case("finetune_out_inside_model", O, "run directory inside the starting model",
             ["finetune", "{case}", "--data", "{english}", "--out", "{case}/run"],
             "is inside the input", "{case}/run", base=tf, dst=False))  # fmt: skip

    # -- one writer per run; damaged and live runs --------------------------------------------
    R = "run directory"
    live = gen("lock", "{home}/.m.lock", pid="live", host="this")
    add(case("run_in_use_resume", R, "--resume while another process holds the run",
             ["finetune", "--resume", "{case}"], "in use by another gpt2jax process (pid 1 on",
             "{case}", base=run, dst=False, generate=[live]))  # fmt: skip
    add(case("run_in_use_new", R, "a new run on a directory another process is creating",
             ["finetune", "{tiny}", "--data", "{english}", "--out", "{case}"],
             "in use by another gpt2jax process (pid 1 on", "{case}", base=run, dst=False,
             generate=[live]))  # fmt: skip
    add(case("run_locked_on_another_host", R, "a lock held on another machine",
             ["finetune", "--resume", "{case}"], "if that process is gone, delete", "{case}",
             base=run, dst=False, generate=[gen("lock", "{home}/.m.lock", pid=4242,
                                                host="another-host")]))  # fmt: skip
    damage = gen("truncate", "{case}/checkpoints/6/params/ocdbt.process_0/d/*")
    add(case("run_newest_damaged_generate", R, "newest checkpoint's data cut in half",
             ["generate", "{case}", *hi], "unreadable (OUT_OF_RANGE", "{case}/checkpoints/6/params",
             base=run, dst=False, generate=[damage]))  # fmt: skip
    add(case("run_newest_damaged_export", R, "the same, through export", ["export", "{case}",
             "{dst}"], "older checkpoints: 4, 2", "{case}/checkpoints/6/params", base=run,
             generate=[damage]))  # fmt: skip
    add(case("run_newest_damaged_resume", R, "the same, --resume (and a stale lock)",
             ["finetune", "--resume", "{case}"], "resuming from checkpoint 4", "", base=run,
             dst=False, exit=0, changes=True, generate=[damage, gen("lock", "{home}/.m.lock",
             pid="dead", host="this")], absent=["{home}/.m.lock"],
             present=["{case}/checkpoints/.damaged/6/params",
                      "{case}/checkpoints/6/params"]))  # fmt: skip
    add(case("run_resume_fewer_steps", R, "--resume --steps 3 of a run at step 6",
             ["finetune", "--resume", "{case}", "--steps", "3"],
             "the run is at step 6 already; --steps 3", "{case}", base=run,
             dst=False))  # fmt: skip
    add(case("lora_base_changed", R, "a LoRA run whose base now holds other weights",
             ["generate", "{case}", *hi], "now holds other weights", "{home}/base", dst=False,
             generate=[gen("copy", "{home}/base", **{"from": "{bases}/openai_mini"}),
                       gen("run", "{case}", model="{home}/base", lora_rank=2),
                       gen("copy", "{home}/base/" + DATA, **{"from": "{own}/" + DATA}),
                       gen("copy", "{home}/base/" + INDEX, **{"from": "{own}/" + INDEX})],
             files=bundle_bytes(openai_tensors(params=other_params()), tmp / "other"),
             place=False))  # fmt: skip

    # -- GPT-2 variants and vocabularies that would convert into another function -------------
    V = "HF variant / vocabulary"

    def variant(name: str, what: str, change: dict, field: str, args: list[str] | None = None):
        phrase = f"{field}=" if field != "n_positions" else "disagree"
        add(case(name, V, what, args or ["convert", "{case}", "{dst}"], phrase, "config.json",
                 base=hf, files={"config.json": as_json(hf_config(**change))},
                 dst="{dst}" in (args or ["{dst}"])))  # fmt: skip

    variant("hf_scale_attn_weights_false", "scale_attn_weights false",
            {"scale_attn_weights": False}, "scale_attn_weights")  # fmt: skip
    variant("hf_scale_by_layer_index", "scale_attn_by_inverse_layer_idx true, through generate",
            {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx",
            ["generate", "{case}", *hi])  # fmt: skip
    variant("hf_reorder_and_upcast", "reorder_and_upcast_attn true, through info",
            {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn",
            ["info", "{case}"])  # fmt: skip
    variant("hf_activation_gelu", 'activation_function "gelu"', {"activation_function": "gelu"},
            "activation_function")  # fmt: skip
    variant("hf_n_inner", "n_inner 10 (GPT-2's MLP is 4 * n_embd = 24)", {"n_inner": 10},
            "n_inner")  # fmt: skip
    variant("hf_cross_attention", "add_cross_attention true", {"add_cross_attention": True},
            "add_cross_attention")  # fmt: skip
    variant("hf_positions_disagree", "n_positions 11, n_ctx 7", {"n_ctx": 7}, "n_positions")
    real_tokenizer = [gen("copy", "{case}/vocab.json", **{"from": "{tiny}/encoder.json"}),
                      gen("copy", "{case}/merges.txt", **{"from": "{tiny}/vocab.bpe"})]  # fmt: skip
    add(case("hf_vocab_smaller_than_tokenizer", V, "vocab_size 97 with GPT-2's 50257-token files",
             ["convert", "{case}", "{dst}"], "vocab_size 97 does not match the tokenizer's 50257",
             "config.json", base=hf, generate=real_tokenizer))  # fmt: skip
    add(case("hf_vocab_mismatch_generate", V, "the same, through generate", ["generate",
             "{case}", *hi], "vocab_size 97 does not match the tokenizer's 50257", "config.json",
             base=hf, dst=False, generate=real_tokenizer))  # fmt: skip
    add(case("openai_vocab_mismatch", V, "n_vocab 97 with GPT-2's encoder.json and vocab.bpe",
             ["convert", "{case}", "{dst}"], "n_vocab 97 does not match the tokenizer's 50257",
             "hparams.json", base=tf, generate=[
                 gen("copy", "{case}/encoder.json", **{"from": "{tiny}/encoder.json"}),
                 gen("copy", "{case}/vocab.bpe", **{"from": "{tiny}/vocab.bpe"})]))  # fmt: skip

    # -- unbounded work from a tiny file ------------------------------------------------------
    B = "bounded reads"
    zero = "/dev/zero"
    add(case("hparams_million_layers", B, "n_layer 10**6 (refused before any allocation)",
             ["info", "{case}"], "n_layer=1000000 is absurdly large", "hparams.json", base=tf,
             files={"hparams.json": as_json(dict(MINI, n_layer=10**6))}, dst=False))  # fmt: skip
    add(case("hparams_too_many_parameters", B, "each field allowed, 13 TB of parameters",
             ["convert", "{case}", "{dst}"], "GB of parameters: absurdly large", "hparams.json",
             base=tf, files={"hparams.json": as_json(
                 dict(MINI, n_embd=8192, n_head=64, n_layer=4096))}))  # fmt: skip
    add(case("hparams_dev_zero", B, "hparams.json is a link to /dev/zero", ["info", "{case}"],
             "is a character device, not a regular file", "hparams.json", base=tf, dst=False,
             remove=("hparams.json",), generate=[gen("symlink", "{case}/hparams.json",
                                                     target=zero)]))  # fmt: skip
    add(case("hparams_fifo", B, "hparams.json is a FIFO", ["convert", "{case}", "{dst}"],
             "is a FIFO (named pipe), not a regular file", "hparams.json", base=tf,
             remove=("hparams.json",), generate=[gen("fifo", "{case}/hparams.json")]))  # fmt: skip
    add(case("hparams_huge_file", B, "hparams.json of 17 MB (valid JSON, then spaces)",
             ["info", "{case}"], "too large for this kind of file", "hparams.json", base=tf,
             dst=False, remove=("hparams.json",), generate=[gen(
                 "json_padded", "{case}/hparams.json", bytes=17 << 20)]))  # fmt: skip
    add(case("encoder_json_dev_zero", B, "encoder.json is a link to /dev/zero",
             ["convert", "{case}", "{dst}"], "is a character device, not a regular file",
             "encoder.json", base=tf, generate=[
                 gen("symlink", "{case}/encoder.json", target=zero),
                 gen("copy", "{case}/vocab.bpe", **{"from": "{tiny}/vocab.bpe"})]))  # fmt: skip
    add(case("config_json_fifo", B, "a gpt2jax config.json that is a FIFO",
             ["export", "{case}", "{dst}"], "is a FIFO (named pipe), not a regular file",
             "config.json", base=g2j, remove=("config.json",),
             generate=[gen("fifo", "{case}/config.json")]))  # fmt: skip
    add(case("safetensors_fifo", B, "model.safetensors is a FIFO", ["convert", "{case}",
             "{dst}"], "is a FIFO (named pipe), not a regular file", "model.safetensors",
             base=hf, remove=(ST,), generate=[gen("fifo", "{case}/" + ST)]))  # fmt: skip
    add(case("tf_data_fifo", B, "the data shard is a FIFO", ["convert", "{case}", "{dst}"],
             "is a FIFO (named pipe), not a regular file", DATA, base=tf, remove=(DATA,),
             generate=[gen("fifo", "{case}/" + DATA)]))  # fmt: skip
    add(case("model_is_dev_zero", B, "the model path is /dev/zero", ["info", zero],
             "is a character device, expected a model directory", zero, dst=False))  # fmt: skip
    prompt = ["generate", "{tiny}", "--max-new-tokens", "2", "--prompt-file"]
    add(case("prompt_file_dev_zero", B, "--prompt-file /dev/zero", [*prompt, zero],
             "is a character device, not a regular file", zero, dst=False))  # fmt: skip
    add(case("prompt_file_fifo", B, "--prompt-file is a FIFO", [*prompt, "{case}/p.txt"],
             "is a FIFO (named pipe), not a regular file", "{case}/p.txt", dst=False,
             generate=[gen("fifo", "{case}/p.txt")]))  # fmt: skip
    evaluate = ["eval", "{tiny}", "--seq-len", "8", "--data"]
    add(case("data_dev_zero", B, "--data /dev/zero", [*evaluate, zero],
             "is a character device, not a regular file", zero, dst=False))  # fmt: skip
    add(case("data_fifo", B, "--data is a FIFO", [*evaluate, "{case}/corpus.txt"],
             "is a FIFO (named pipe), not a regular file", "{case}/corpus.txt", dst=False,
             generate=[gen("fifo", "{case}/corpus.txt")]))  # fmt: skip
    add(case("data_dir_with_fifo", B, "a --data folder holding a FIFO named .txt",
             [*evaluate, "{case}"], "is a FIFO (named pipe), not a regular file",
             "{case}/b.txt", dst=False, generate=[
                 gen("copy", "{case}/a.txt", **{"from": "{english}"}),
                 gen("fifo", "{case}/b.txt")]))  # fmt: skip
    add(case("data_glob_symlink_cycle", B, "--data 'DIR/**/*.txt' through a symlink cycle",
             [*evaluate, "{case}/**/*.txt"], "(+1 more files)", "", exit=0, stream="stdout",
             dst=False, generate=[gen("copy", "{case}/a.txt", **{"from": "{english}"}),
                                  gen("copy", "{case}/sub/b.txt", **{"from": "{english}"}),
                                  gen("symlink", "{case}/sub/loop", target="..")]))  # fmt: skip

    # -- one line, not tracebacks --------------------------------------------------------------
    E = "clean errors"
    add(case("convert_non_utf8_destination", E, "a destination name that is not UTF-8",
             ["convert", "{case}", "{home}/out-\udcff"], "the path is not valid UTF-8",
             "{home}/out-", base=tf, dst=False))  # fmt: skip
    add(case("finetune_non_utf8_out", E, "--out not UTF-8: refused before training",
             ["finetune", "{tiny}", "--data", "{english}", "--out", "{home}/run-\udcff"],
             "the path is not valid UTF-8", "{home}/run-", dst=False))  # fmt: skip

    # -- every numeric flag: finite and in range ----------------------------------------------
    N = "flag values"
    tune = ["finetune", "{tiny}", "--data", "{english}", "--out", "{dst}", "--seq-len", "8"]
    flags = [
        ("generate_temperature_nan", ["generate", "{tiny}", *hi, "--temperature", "nan"],
         "temperature (--temperature) must be a finite number, got nan"),
        ("generate_top_p_inf", ["generate", "{tiny}", *hi, "--top-p", "inf"],
         "top_p (--top-p) must be a finite number, got inf"),
        ("finetune_weight_decay_nan", [*tune, "--weight-decay", "nan"],
         "--weight-decay must be a finite number, got nan"),
        ("finetune_lora_alpha_nan", [*tune, "--lora-rank", "2", "--lora-alpha", "nan"],
         "--lora-alpha must be a finite number, got nan"),
        ("finetune_lr_inf", [*tune, "--lr", "inf"], "--lr must be a finite number, got inf"),
        ("finetune_clip_negative", [*tune, "--clip", "-1"],
         "--clip must be >= 0, got -1.0 (0 turns clipping off)"),
        ("finetune_dropout_nan", [*tune, "--dropout", "nan"],
         "--dropout must be a finite number, got nan"),
        ("finetune_seq_len_zero", [*tune, "--seq-len", "0"], "--seq-len must be >= 1, got 0"),
        ("eval_seq_len_zero", ["eval", "{tiny}", "--data", "{english}", "--seq-len", "0"],
         "--seq-len must be >= 1, got 0"),
        ("eval_batch_size_zero", ["eval", "{tiny}", "--data", "{english}", "--batch-size", "0"],
         "--batch-size must be >= 1, got 0"),
        ("plan_batch_size_zero", ["plan", "{tiny}", "--memory", "1GB", "--batch-size", "0"],
         "--batch-size must be >= 1, got 0"),
        ("plan_lora_alpha_nan", ["plan", "{tiny}", "--memory", "1GB", "--lora-rank", "2",
         "--lora-alpha", "nan"], "--lora-alpha must be a finite number, got nan"),
        ("plan_seq_len_beyond_context", ["plan", "{tiny}", "--memory", "1GB", "--seq-len",
         "1024"], "--seq-len must be in [1, 29], got 1024"),
    ]  # fmt: skip
    for name, args, phrase in flags:
        add(case(name, N, " ".join(args[-2:]), args, phrase, "",
                 dst="{dst}" in args))  # fmt: skip
    add(case("generate_max_new_tokens_huge", N, "--max-new-tokens 100000000, context 29",
             ["generate", "{tiny}", "--prompt", "Hi", "--max-new-tokens", "100000000",
              "--greedy"], "--max-new-tokens 100000000 is more than the model's context of 29 "
             "tokens: each sample ends when the context is full", "", exit=0,
             dst=False))  # fmt: skip
    add(case("plan_short_context", N, "plan a 29-token model, no --seq-len (was 1024)",
             ["plan", "{tiny}", "--memory", "64GiB", "--remat", "none", "--optimizer", "adamw",
              "--opt-state-dtype", "float32", "--loss-chunk", "0", "--grad-accum", "1",
              "--batch-size", "2"], "seq-len 29", "", exit=0, stream="stdout",
             dst=False))  # fmt: skip
    add(case("prompt_file_bom", N, "a prompt file starting with a UTF-8 BOM",
             ["generate", "{tiny}", "--prompt-file", "{case}/p.txt", "--max-new-tokens", "1",
              "--greedy", "--include-prompt"], "Hello there", "", exit=0, stream="stdout",
             lacks=["\ufeff"], files={"p.txt": "\ufeffHello there\n".encode()},
             dst=False))  # fmt: skip

    # -- a killed writer's leftovers are cleaned up -------------------------------------------
    H = "hygiene"
    add(case("convert_removes_stale_temporary", H, "a .out.tmp-PID@HOST dir left by a kill",
             ["convert", "{case}", "{home}/out"], "converted", "", base=tf, exit=0,
             stream="stdout", changes=True, dst=False,
             generate=[gen("stale_temp", "{home}/.out.tmp-", pid="dead")],
             absent=["{home}/.out.tmp-*"], present=["{home}/out/params"]))  # fmt: skip
    return out


def other_params() -> dict:
    """The mini model with other random weights (a base model replaced under a LoRA run)."""
    from gpt2jax.convert import mapping

    flat = mapping.flatten(mini_params())
    return mapping.unflatten({k: (v + 0.5).astype(np.float32) for k, v in flat.items()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(FIXTURES / "bad_inputs"), help="corpus directory")
    args = p.parse_args(argv)
    out = Path(args.out)
    tmp = out.parent / f".{out.name}.build"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        entries = cases(tmp)
        shutil.rmtree(out, ignore_errors=True)
        # the bases
        tf = out / "bases" / "openai_mini"
        tf.mkdir(parents=True)
        (tf / "hparams.json").write_bytes(as_json(MINI))
        (tf / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
        for name, raw in bundle_bytes(openai_tensors(), tmp / "base").items():
            (tf / name).write_bytes(raw)
        hf = out / "bases" / "hf_mini"
        hf.mkdir(parents=True)
        (hf / "config.json").write_bytes(as_json(hf_config()))
        (hf / ST).write_bytes(safetensors_bytes(hf_tensors(), tmp / "hfbase"))
        # the cases' own files
        manifest = []
        owned = {e["dir"]: sorted(e["_files"]) for e in entries if e["name"] == e["dir"]}
        for entry in entries:
            files = entry.pop("_files")
            entry["files"] = sorted(files) or owned.get(entry["dir"], [])
            for name, raw in files.items():
                path = out / "cases" / entry["dir"] / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(raw)
            manifest.append(entry)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{len(manifest)} cases, {total / 1024:.0f} KiB in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
