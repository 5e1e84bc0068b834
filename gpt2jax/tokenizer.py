"""GPT-2's byte-level BPE tokenizer on tiktoken.

Built from a checkpoint's own ``encoder.json`` + ``vocab.bpe`` when the directory has them (fully
offline), else from ``tiktoken.get_encoding("gpt2")`` (which downloads once, or reads
``TIKTOKEN_CACHE_DIR``). Both give the same encoding; the tests check it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import tiktoken

from gpt2jax.config import EOT_TOKEN
from gpt2jax.errors import CheckpointError, ConfigError
from gpt2jax.files import read_bytes

EOT_TEXT = "<|endoftext|>"
ENCODER_JSON = "encoder.json"
VOCAB_BPE = "vocab.bpe"
MAX_FILE_BYTES = 64 * 1024 * 1024  # each tokenizer file (GPT-2's: 1.0 MB and 0.5 MB)

# GPT-2's pre-tokenisation regex, as tiktoken's ``gpt2`` encoding writes it (equivalent to the
# pattern in OpenAI's encoder.py, with possessive quantifiers for speed).
_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _byte_alphabet() -> dict[str, int]:
    """OpenAI's ``bytes_to_unicode`` inverted: stand-in character -> byte value."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + n)] = b
            n += 1
    return table


def _ranks_from_files(encoder_json: str, vocab_bpe: str) -> dict[bytes, int]:
    """tiktoken's ``{token bytes: rank}`` from OpenAI's two tokenizer files.

    The files are read the way OpenAI's ``encoder.py`` defines them: ``vocab.bpe`` lists merges
    in priority order over a printable stand-in alphabet for the 256 bytes, and ``encoder.json``
    maps each token, in that alphabet, to its id. tiktoken needs each token's bytes and rank,
    and GPT-2's ids are exactly those ranks, which is checked here.
    """
    alphabet = _byte_alphabet()

    def to_bytes(token: str, path: str) -> bytes:
        try:
            return bytes(alphabet[ch] for ch in token)
        except KeyError:
            raise CheckpointError(
                f"{path}: token {token!r} is not in GPT-2's byte alphabet"
            ) from None

    try:
        encoder = json.loads(read_bytes(encoder_json, MAX_FILE_BYTES, CheckpointError))
        text = read_bytes(vocab_bpe, MAX_FILE_BYTES, CheckpointError).decode("utf-8")
        merges = [line.split() for line in text.split("\n")[1:] if line.strip()]
    except FileNotFoundError as e:
        raise CheckpointError(f"{e.filename}: file not found") from None
    except OSError as e:  # a directory, no permission...
        raise CheckpointError(f"{e.filename}: cannot read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, ints past 4300 digits, nesting
        raise CheckpointError(
            f"{encoder_json} / {vocab_bpe}: unreadable tokenizer file ({e})"
        ) from None
    if not isinstance(encoder, dict):
        raise CheckpointError(f"{encoder_json}: expected a JSON object of token -> id")

    # Single bytes first, in OpenAI's order, then one token per merge in priority order.
    ranks = {bytes([b]): i for i, b in enumerate(alphabet.values())}
    for i, merge in enumerate(merges):
        if len(merge) != 2:
            raise CheckpointError(f"{vocab_bpe}: line {i + 2} is not a merge of two tokens")
        token = to_bytes(merge[0], vocab_bpe) + to_bytes(merge[1], vocab_bpe)
        if token in ranks:
            # ids would skip a number and collide with <|endoftext|>: tiktoken panics on that
            raise CheckpointError(f"{vocab_bpe}: line {i + 2} repeats the merge making {token!r}")
        ranks[token] = len(ranks)

    ids = {to_bytes(t, encoder_json): i for t, i in encoder.items() if t != EOT_TEXT}
    if ids != ranks:
        raise CheckpointError(
            f"{encoder_json} and {vocab_bpe} disagree: the merges do not produce the encoder's ids"
        )
    if encoder.get(EOT_TEXT, EOT_TOKEN) != EOT_TOKEN or len(ranks) != EOT_TOKEN:
        raise CheckpointError(f"{encoder_json}: {EOT_TEXT} must be id {EOT_TOKEN}")
    return ranks


class Tokenizer:
    """GPT-2's tokenizer. ``<|endoftext|>`` in text encodes to its id, 50256."""

    def __init__(self, encoding: tiktoken.Encoding, source: str) -> None:
        self.encoding = encoding
        self.source = source  # where the vocabulary came from, for `gpt2jax info`
        self.eot = EOT_TOKEN
        self.n_vocab = encoding.n_vocab

    @classmethod
    def from_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> Tokenizer:
        """Builds the tokenizer from OpenAI's ``encoder.json`` and ``vocab.bpe`` (no network)."""
        encoder_json, vocab_bpe = os.fspath(encoder_json), os.fspath(vocab_bpe)
        encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=_PAT_STR,
            mergeable_ranks=_ranks_from_files(encoder_json, vocab_bpe),
            special_tokens={EOT_TEXT: EOT_TOKEN},
            explicit_n_vocab=EOT_TOKEN + 1,
        )
        return cls(encoding, source=os.path.dirname(os.path.abspath(encoder_json)))

    @classmethod
    def default(cls) -> Tokenizer:
        """``tiktoken.get_encoding("gpt2")``: downloads once, or reads ``TIKTOKEN_CACHE_DIR``."""
        try:
            return cls(tiktoken.get_encoding("gpt2"), source="tiktoken:gpt2")
        except Exception as e:  # tiktoken raises requests/OS errors when offline with no cache
            raise CheckpointError(
                "cannot load tiktoken's gpt2 encoding (offline with no cache?): "
                f"{type(e).__name__}: {e}. Put encoder.json and vocab.bpe in the model directory "
                "or set TIKTOKEN_CACHE_DIR to a tiktoken cache."
            ) from None

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """The directory's own ``encoder.json`` + ``vocab.bpe`` if present, else the default.

        Only one of the two is an error: the directory's vocabulary is then unknown."""
        enc, bpe = os.path.join(path, ENCODER_JSON), os.path.join(path, VOCAB_BPE)
        found = [os.path.exists(enc), os.path.exists(bpe)]
        if all(found):
            return cls.from_files(enc, bpe)
        if any(found):
            missing = bpe if found[0] else enc
            raise CheckpointError(
                f"{missing}: file not found (a tokenizer needs both {ENCODER_JSON} and {VOCAB_BPE})"
            )
        return cls.default()

    def check_model_vocab(self, n_vocab: int, source: str, field: str = "n_vocab") -> None:
        """Refuses a model whose vocabulary does not fit this tokenizer: more ids than it can
        decode, or, when its files came with the model, any other number (the model was made
        for another vocabulary). ``source`` and ``field`` name where the size is stated."""
        own_files = not self.source.startswith("tiktoken:")
        if n_vocab > self.n_vocab or (own_files and n_vocab != self.n_vocab):
            raise ConfigError(
                f"{source}: {field} {n_vocab} does not match the tokenizer's {self.n_vocab} tokens "
                f"({self.source}); the model and its tokenizer must agree"
            )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; the literal ``<|endoftext|>`` becomes token 50256."""
        return self.encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """:meth:`encode` of each text, on ``num_threads`` threads."""
        return self.encoding.encode_batch(
            list(texts), num_threads=num_threads, allowed_special="all"
        )

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids``, also when they end inside a UTF-8 character (for streaming)."""
        return self.encoding.decode_bytes([int(i) for i in ids])
