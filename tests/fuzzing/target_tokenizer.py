"""Fuzz target: the tokenizer loader, :meth:`gpt2jax.tokenizer.Tokenizer.from_files`.

OpenAI's ``encoder.json`` + ``vocab.bpe`` (the full 50k merges, or only the first few hundred,
which is much faster to check) with merges repeated, swapped, dropped, rewritten or appended;
``encoder.json`` either rebuilt to agree with the edited merges (what an attacker would craft),
left as it was, or edited (ids set to junk, tokens removed or added, ``<|endoftext|>`` moved,
the whole file replaced); then byte mutations of either file. An accepted tokenizer must
round-trip text exactly.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from fuzzing.harness import Target, fresh_path, write_bytes
from fuzzing.mutations import byte_ops, json_values, mutate
from gpt2jax.tokenizer import EOT_TEXT, Tokenizer, _byte_alphabet

#: OpenAI's own encoder.json + vocab.bpe, beside the tiny TF checkpoint fixture.
TOKENIZER_FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "openai_tiny"


@functools.cache
def _tokenizer_files() -> tuple[list[str], list[str]]:
    """OpenAI's vocab.bpe as (header line, merge lines)."""
    lines = (TOKENIZER_FIXTURE / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    return lines[:1], [line for line in lines[1:] if line]


@functools.cache
def _alphabet() -> list[str]:
    return list(_byte_alphabet())


def _consistent_encoder(merges: list[str]) -> dict[str, Any]:
    """The encoder.json an attacker would write for ``merges``: ids as the reader assigns them
    (single bytes, then one per merge; a repeated merge keeps its key, takes a new id)."""
    encoder = {ch: i for i, ch in enumerate(_alphabet())}
    for line in merges:
        parts = line.split()
        if len(parts) == 2:
            encoder["".join(parts)] = len(encoder)
    encoder[EOT_TEXT] = len(encoder)
    return encoder


merge_ops = st.one_of(
    st.tuples(st.just("dup"), st.integers(0, 60000)),
    st.tuples(st.just("swap"), st.integers(0, 60000), st.integers(0, 60000)),
    st.tuples(st.just("drop"), st.integers(0, 60000)),
    st.tuples(st.just("line"), st.integers(0, 60000), st.text(max_size=12)),
    st.tuples(st.just("append"), st.text(max_size=12)),
)
encoder_ops = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 60000), json_values),
    st.tuples(st.just("del"), st.integers(0, 60000)),
    st.tuples(st.just("add"), st.text(max_size=6), json_values),
    st.tuples(st.just("eot"), json_values),
    st.tuples(st.just("root"), json_values),
)
tokenizer_cases = st.tuples(
    # the full vocabulary (slow to check: 50k merges) or only its first few merges
    st.one_of(st.just(None), st.integers(0, 300)),
    st.lists(merge_ops, max_size=3),
    st.sampled_from(["consistent", "original", "edited"]),
    st.lists(encoder_ops, max_size=3),
    st.lists(byte_ops, max_size=2),  # on encoder.json
    st.lists(byte_ops, max_size=2),  # on vocab.bpe
    st.sampled_from(["\n", "\r\n"]),
)


def prepare_tokenizer(case: tuple, workdir: str) -> tuple[str, str]:
    keep, ops, mode, enc_ops, enc_bytes, bpe_bytes, newline = case
    header, original = _tokenizer_files()
    original = original if keep is None else original[:keep]
    merges = list(original)
    for op in ops:
        i = op[1] % len(merges) if merges and isinstance(op[1], int) else 0
        if op[0] == "dup" and merges:
            merges.insert(i, merges[i])
        elif op[0] == "swap" and merges:
            j = op[2] % len(merges)
            merges[i], merges[j] = merges[j], merges[i]
        elif op[0] == "drop" and merges:
            del merges[i]
        elif op[0] == "line" and merges:
            merges[i] = op[2]
        elif op[0] == "append":
            merges.append(op[1])
    encoder: Any = _consistent_encoder(merges if mode != "original" else original)
    if mode == "edited":
        tokens = list(encoder)
        for op in enc_ops:
            if op[0] == "set":
                encoder[tokens[op[1] % len(tokens)]] = op[2]
            elif op[0] == "del":
                encoder.pop(tokens[op[1] % len(tokens)], None)
            elif op[0] == "add":
                encoder[op[1]] = op[2]
            elif op[0] == "eot":
                encoder[EOT_TEXT] = op[1]
            elif op[0] == "root":
                encoder = op[1]
                break
    stem = fresh_path(workdir, "tok")
    paths = stem + "-encoder.json", stem + "-vocab.bpe"
    enc_text = json.dumps(encoder, allow_nan=True).encode("utf-8", "surrogatepass")
    bpe_text = newline.join([*header, *merges, ""]).encode("utf-8", "surrogatepass")
    write_bytes(paths[0], mutate(enc_text, enc_bytes))
    write_bytes(paths[1], mutate(bpe_text, bpe_bytes))
    return paths


_SAMPLE = "Hello world! <|endoftext|> Ünïcödé, 数字 123 and\ttabs\n\n  spaces 🙂"


def read_tokenizer(paths: tuple[str, str], workdir: str) -> str:
    """Builds the tokenizer; an accepted one must round-trip text exactly."""
    tokenizer = Tokenizer.from_files(*paths)
    ids = tokenizer.encode(_SAMPLE)
    assert all(0 <= i <= tokenizer.eot for i in ids)
    assert tokenizer.decode(ids) == _SAMPLE
    return "accepted"


TARGET = Target("tokenizer", tokenizer_cases, prepare_tokenizer, read_tokenizer, 40)
