"""GPT-2's tokenizer files in OpenAI's and Hugging Face's naming, and between the two.

OpenAI's ``encoder.json`` + ``vocab.bpe`` are byte for byte Hugging Face's ``vocab.json`` +
``merges.txt`` (transformers 5 also folds them into one ``tokenizer.json``). This module copies
whichever a directory has into the names a destination needs (:func:`copy_tokenizer_files`), and
rebuilds both from tiktoken's ``gpt2`` encoding for a directory that has none
(:func:`bpe_files_from_ranks`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from gpt2jax.config import EOT_TOKEN, read_json
from gpt2jax.errors import CheckpointError
from gpt2jax.tokenizer import EOT_TEXT, Tokenizer

OPENAI_NAMES = ("encoder.json", "vocab.bpe")
HF_NAMES = ("vocab.json", "merges.txt")
TOKENIZER_JSON = "tokenizer.json"
BPE_HEADER = "#version: 0.2"


def copy_tokenizer_files(
    src_dir: str | os.PathLike, dst_dir: str, names: tuple[str, str]
) -> tuple[str, ...]:
    """Writes the vocabulary and merges from ``src_dir`` into ``dst_dir`` as ``names``.

    ``src_dir`` may hold them in OpenAI's naming, Hugging Face's, or only a ``tokenizer.json``
    (``model.vocab`` and ``model.merges``, as transformers 5 saves them; Hugging Face's
    ``GPT2Tokenizer`` reads OpenAI's two files as ``vocab.json`` and ``merges.txt``,
    ``transformers/models/gpt2/tokenization_gpt2.py``).
    Returns the names of the files used, empty when it has none of these.
    """
    src_dir = os.fspath(src_dir)
    for pair in (OPENAI_NAMES, HF_NAMES):
        paths = [os.path.join(src_dir, n) for n in pair]
        if all(os.path.isfile(p) for p in paths):
            for p, name in zip(paths, names, strict=True):
                shutil.copyfile(p, os.path.join(dst_dir, name))
            return pair
    tokenizer_json = os.path.join(src_dir, TOKENIZER_JSON)
    if os.path.isfile(tokenizer_json):
        vocab, merges = _from_tokenizer_json(tokenizer_json)
        _write_pair(dst_dir, names, vocab, merges)
        return (TOKENIZER_JSON,)
    return ()


def write_default_tokenizer_files(dst_dir: str, names: tuple[str, str]) -> None:
    """Writes GPT-2's two files, rebuilt from tiktoken's ``gpt2`` encoding, into ``dst_dir``."""
    encoding = Tokenizer.default().encoding
    # Public tiktoken API: every mergeable token's bytes, and each one's id (= its BPE rank).
    ranks = {t: encoding.encode_single_token(t) for t in encoding.token_byte_values()}
    vocab, merges = bpe_files_from_ranks(ranks)
    _write_pair(dst_dir, names, vocab, merges)


@contextmanager
def openai_tokenizer_dir(src_dir: str | os.PathLike) -> Iterator[str | None]:
    """A directory holding ``encoder.json`` + ``vocab.bpe`` for ``src_dir``'s tokenizer (checked
    to be a valid GPT-2 BPE), or None when ``src_dir`` has no tokenizer files."""
    with tempfile.TemporaryDirectory(prefix="gpt2jax-tokenizer-") as tmp:
        used = copy_tokenizer_files(src_dir, tmp, OPENAI_NAMES)
        if not used:
            yield None
            return
        try:
            Tokenizer.from_files(*(os.path.join(tmp, n) for n in OPENAI_NAMES))
        except CheckpointError as e:
            detail = str(e).replace(tmp + os.sep, "")  # not the paths of our temporary copies
            raise CheckpointError(
                f"{os.fspath(src_dir)}: {' + '.join(used)} do not hold GPT-2's BPE vocabulary "
                f"(read as OpenAI's files: {detail})"
            ) from None
        yield tmp


def load_tokenizer(src_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face directory (tiktoken's gpt2 when it has no files)."""
    with openai_tokenizer_dir(src_dir) as tmp:
        if tmp is None:
            return Tokenizer.default()
        tokenizer = Tokenizer.from_files(*(os.path.join(tmp, n) for n in OPENAI_NAMES))
    tokenizer.source = os.path.abspath(os.fspath(src_dir))
    return tokenizer


def tokenizer_config(n_ctx: int) -> dict:
    """``tokenizer_config.json`` for ``AutoTokenizer``: ``GPT2Tokenizer``'s own defaults
    (``<|endoftext|>``, id 50256, as bos, eos and unk; no prefix space), stated explicitly."""
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        "unk_token": EOT_TEXT,
        "errors": "replace",
        "model_max_length": n_ctx,
        "added_tokens_decoder": {
            str(EOT_TOKEN): {
                "content": EOT_TEXT,
                "lstrip": False,
                "normalized": True,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
    }


def bpe_files_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``encoder.json`` contents and the merge list of a byte-level BPE given its ranks.

    The token of rank ``r`` was made by one merge; which one is found by running BPE on its
    bytes with only the merges of rank < ``r``: it must stop at exactly two parts (the
    relation between merges and ranks that tiktoken's ``load.py`` / ``_educational.py``
    describe).
    """
    char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(char[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe(token, ranks, rank)
        if len(parts) != 2:
            raise CheckpointError(f"BPE rank {rank} ({token!r}) is not the merge of two tokens")
        merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])}
    vocab[EOT_TEXT] = EOT_TOKEN
    return vocab, merges


def _bpe(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's ``encoder.py`` ``bytes_to_unicode``: a printable stand-in for every byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _from_tokenizer_json(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = read_json(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise CheckpointError(f"{path}: not a BPE tokenizer (model.type is not 'BPE')")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise CheckpointError(f"{path}: model.vocab / model.merges missing")
    pairs = []
    for m in merges:  # "a b" in older files, ["a", "b"] in newer ones
        pair = m.split(" ") if isinstance(m, str) else m
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        ):
            raise CheckpointError(f"{path}: merge {m!r} is not a pair of tokens")
        pairs.append((pair[0], pair[1]))
    return vocab, pairs


def _write_pair(
    dst_dir: str, names: tuple[str, str], vocab: dict[str, int], merges: list[tuple[str, str]]
) -> None:
    # Byte-for-byte OpenAI's layout: json.dumps defaults, then one merge per line.
    with open(os.path.join(dst_dir, names[0]), "w", encoding="utf-8") as f:
        f.write(json.dumps(vocab))
    with open(os.path.join(dst_dir, names[1]), "w", encoding="utf-8") as f:
        f.write(BPE_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in merges))
