"""The tokenizer, built from OpenAI's files and from tiktoken's gpt2 encoding, agrees exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import tiktoken

from conftest import TOKENIZER_DIR
from gpt2jax.errors import CheckpointError
from gpt2jax.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "The meaning of life is 42, isn't it? We'll see; they're sure.",
    "  leading and   runs of   spaces\t\ttabs\n\n\nnewlines \r\n crlf   ",
    "héllo wörld — naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🤗🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 and ZWJ",
    "text<|endoftext|>next document<|endoftext|>",
    "code: def f(x):\n    return x**2  # comment\n",
    "numbers 1234567890 3.14159 1e-5 0xdeadbeef",
    "",
    " ",
    "\u0000\u0001 control \u00ad soft hyphen \ufeff bom",
]


@pytest.fixture(scope="module")
def both():
    return Tokenizer.from_files(TOKENIZER_DIR / "encoder.json", TOKENIZER_DIR / "vocab.bpe"), (
        tiktoken.get_encoding("gpt2")
    )


@pytest.mark.parametrize("text", TEXTS)
def test_files_equal_tiktoken_gpt2(both, text):
    ours, ref = both
    expected = ref.encode(text, allowed_special="all")
    assert ours.encode(text) == expected
    assert Tokenizer.default().encode(text) == expected
    assert ours.decode(expected) == text


def test_endoftext_is_50256(both):
    ours, _ = both
    assert ours.encode("<|endoftext|>") == [50256]
    assert ours.eot == 50256 and ours.n_vocab == 50257


def test_from_dir_prefers_the_directory_files(tmp_path):
    shutil.copy(TOKENIZER_DIR / "encoder.json", tmp_path)
    shutil.copy(TOKENIZER_DIR / "vocab.bpe", tmp_path)
    assert Tokenizer.from_dir(tmp_path).source == str(tmp_path)
    assert Tokenizer.from_dir(tmp_path / "missing-dir-falls-back").source == "tiktoken:gpt2"


def test_files_that_disagree_are_refused(tmp_path):
    enc = json.loads((TOKENIZER_DIR / "encoder.json").read_text())
    a, b = "Ġthe", "Ġand"
    enc[a], enc[b] = enc[b], enc[a]
    (tmp_path / "encoder.json").write_text(json.dumps(enc))
    shutil.copy(TOKENIZER_DIR / "vocab.bpe", tmp_path)
    with pytest.raises(CheckpointError, match="disagree"):
        Tokenizer.from_dir(tmp_path)


def test_broken_files_are_clear_errors(tmp_path):
    (tmp_path / "encoder.json").write_bytes(b"\xff\xfe not json")
    shutil.copy(TOKENIZER_DIR / "vocab.bpe", tmp_path)
    with pytest.raises(CheckpointError, match="encoder.json"):
        Tokenizer.from_dir(tmp_path)
