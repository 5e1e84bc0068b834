"""The data pipeline: reading every input kind, exact tokenizing, the cache, batches."""

from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, TOKENIZER_DIR
from gpt2jax.errors import DataError
from gpt2jax.tokenizer import Tokenizer
from gpt2jax.train import data as data_mod
from gpt2jax.train.batches import Prefetcher, WindowSampler, eval_windows, spread
from gpt2jax.train.data import load_tokens, safe_split, split_tail

ENGLISH = FIXTURES / "english.txt"
TRICKY = (
    "Hello  world!\n\nIt's   a 'test' — they'll've\tgone.\r\n  \n"
    "café 你好 12345 6.02e23 <|endoftext|>next doc\n\n\n   trailing   "
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TOKENIZER_DIR)


@pytest.fixture
def load(tmp_path, tok):
    def load(*paths, **kw):
        return load_tokens([str(p) for p in paths], tok, cache_dir=tmp_path / "cache", **kw)

    return load


def write(path, content, mode="w"):
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
        f.write(content)
    return path


# -- exact tokenizing -------------------------------------------------------------------------


@pytest.mark.parametrize("max_chars", [1, 7, 50, 400])
def test_safe_split_keeps_the_tokens(tok, max_chars):
    text = TRICKY + ENGLISH.read_text()
    pieces = safe_split(text, max_chars)
    assert "".join(pieces) == text
    assert len(pieces) > 1
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


# ASCII whitespace, control and Unicode spaces the two regex engines may disagree on, letters,
# digits, punctuation, a contraction's pieces, CJK and an emoji.
TRICKY_CHARS = list(" \t\n\r\x0b\x1c\x85\u00a0\u3000aZé1.'s-你😀")


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(TRICKY_CHARS), max_size=80))
def test_safe_split_keeps_the_tokens_of_any_text(tok, text):
    pieces = safe_split(text, 3)
    assert "".join(pieces) == text
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_text_file_is_one_document_ending_in_eot(load, tok, tmp_path):
    out = load(ENGLISH)
    text = ENGLISH.read_text(encoding="utf-8")
    assert out.tokens.dtype == np.uint16
    assert out.tokens.tolist() == tok.encode(text) + [tok.eot]
    assert out.n_documents == 1 and out.replaced == 0 and not out.cached


def test_long_document_is_streamed_in_blocks_exactly(load, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_BLOCK", 64)
    monkeypatch.setattr(data_mod, "_BATCH_CHARS", 300)
    text = (TRICKY + ENGLISH.read_text()) * 2
    path = write(tmp_path / "long.txt", text)
    assert load(path).tokens.tolist() == tok.encode(text) + [tok.eot]


def test_cache_is_reused_and_keyed_by_content(load, tmp_path):
    path = write(tmp_path / "a.txt", "one two three")
    first = load(path)
    again = load(path)
    assert again.cached and again.key == first.key
    assert np.array_equal(again.tokens, first.tokens)
    write(path, "one two four")
    changed = load(path)
    assert not changed.cached and changed.key != first.key
    # The options are part of the key too.
    assert load(path, field="body").key != changed.key


def test_incomplete_cache_entry_is_rebuilt(load, tmp_path):
    path = write(tmp_path / "a.txt", "some words here")
    first = load(path)
    want = first.tokens.tolist()
    with open(first.path, "r+b") as f:  # a cache file cut short, as by a crash
        f.truncate(2)
    again = load(path)
    assert not again.cached
    assert again.tokens.tolist() == want


def test_cache_dir_defaults_to_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2JAX_CACHE", str(tmp_path))
    assert data_mod.default_cache_dir() == str(tmp_path / "tokens")
    monkeypatch.delenv("GPT2JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_mod.default_cache_dir() == str(tmp_path / "xdg" / "gpt2jax" / "tokens")


# -- input kinds ------------------------------------------------------------------------------


def test_directory_glob_and_several_files(load, tok, tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    write(d / "b.txt", "Second.")
    write(d / "a.txt", "First.")
    write(d / "sub" / "c.txt", "Third.")
    write(d / "skip.md", "not a txt")
    want = tok.encode("First.") + [tok.eot] + tok.encode("Second.") + [tok.eot]
    want += tok.encode("Third.") + [tok.eot]
    assert load(d).tokens.tolist() == want
    assert load(f"{d}/**/*.txt").tokens.tolist() == want
    both = load(d / "b.txt", d / "a.txt")
    assert both.tokens.tolist() == tok.encode("Second.") + [tok.eot] + tok.encode("First.") + [
        tok.eot
    ]
    assert both.n_documents == 2


def test_csv_rows_are_documents(load, tok, tmp_path):
    path = write(tmp_path / "d.csv", 'id,text\n1,"Hello, world"\n2,""\n3,"two\nlines"\n')
    out = load(path)
    assert out.tokens.tolist() == (
        tok.encode("Hello, world") + [tok.eot] + tok.encode("two\nlines") + [tok.eot]
    )
    assert load(path, column="id").tokens.tolist() == sum(
        (tok.encode(s) + [tok.eot] for s in "123"), []
    )
    with pytest.raises(DataError, match=r"d\.csv: no column 'body' \(columns: id, text\)"):
        load(path, column="body")
    two = write(tmp_path / "two.csv", "a,b\nx,y\n")
    with pytest.raises(DataError, match="2 columns .*--column"):
        load(two)


def test_jsonl_lines_are_documents(load, tok, tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "alpha"}\n\n{"text": "beta", "x": 1}\n')
    assert load(path).tokens.tolist() == tok.encode("alpha") + [tok.eot] + tok.encode("beta") + [
        tok.eot
    ]
    body = write(tmp_path / "b.jsonl", '{"body": "gamma"}\n')
    assert load(body, field="body").tokens.tolist() == tok.encode("gamma") + [tok.eot]
    with pytest.raises(DataError, match=r"b\.jsonl:1: no 'text' field"):
        load(body)
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load(bad)
    num = write(tmp_path / "num.jsonl", '{"text": 3}\n')
    with pytest.raises(DataError, match=r"num\.jsonl:1: field 'text' is int, not text"):
        load(num)


def test_literal_endoftext_separates_documents(load, tok, tmp_path):
    path = write(tmp_path / "a.txt", "one<|endoftext|>two")
    assert load(path).tokens.tolist() == tok.encode("one") + [tok.eot] + tok.encode("two") + [
        tok.eot
    ]


def test_byte_order_mark_is_dropped(load, tok, tmp_path):
    path = write(tmp_path / "bom.txt", b"\xef\xbb\xbfHi there", "wb")
    assert load(path).tokens.tolist() == tok.encode("Hi there") + [tok.eot]


# -- bad input --------------------------------------------------------------------------------


def test_undecodable_bytes_are_replaced_counted_and_reported(load, tok, tmp_path, caplog):
    raw = "caf\u00e9 ok \ufffd legit ".encode() + b"bad \xff\xfe end \xe2\x82"
    path = write(tmp_path / "latin.txt", raw, "wb")
    with caplog.at_level(logging.WARNING, logger="gpt2jax"):
        out = load(path)
    # \xff and \xfe are one bad byte each, the truncated \xe2\x82 one sequence; the file's own
    # U+FFFD is not counted.
    assert out.replaced == 3
    assert out.tokens.tolist() == tok.encode(raw.decode("utf-8", "replace")) + [tok.eot]
    assert "latin.txt: 3 undecodable byte sequence(s) replaced" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpt2jax"):
        assert load(path).cached  # reported again from the cache
    assert "3 undecodable" in caplog.text


def test_missing_path(load, tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: no such file or directory"):
        load(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="no files match"):
        load(tmp_path / "*.nothing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="directory has no .txt files"):
        load(tmp_path / "empty_dir")


@pytest.mark.parametrize("content", [b"", b"   \n\t \n"])
def test_empty_data(load, tmp_path, content):
    path = write(tmp_path / "empty.txt", content, "wb")
    with pytest.raises(DataError, match=r"empty\.txt: no text \(the data is empty"):
        load(path)


def test_binary_file_is_refused(load, tmp_path):
    path = write(tmp_path / "model.txt", bytes(range(256)) * 4, "wb")
    with pytest.raises(DataError, match=r"model\.txt: looks like a binary file"):
        load(path)
    noise = write(
        tmp_path / "noise.txt", np.random.default_rng(0).bytes(4096).replace(b"\0", b"x"), "wb"
    )
    with pytest.raises(DataError, match="binary"):
        load(noise)


def test_vocabulary_check():
    data_mod.check_vocab(np.array([1, 96], np.uint16), 97, "x")
    with pytest.raises(DataError, match="x: token id 97 is outside the model's vocabulary of 97"):
        data_mod.check_vocab(np.array([1, 97], np.uint16), 97, "x")


# -- batches ----------------------------------------------------------------------------------


def test_window_order_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    a = WindowSampler(tokens, seq_len=16, batch_size=5, seed=3)
    b = WindowSampler(tokens, seq_len=16, batch_size=5, seed=3)
    for step in (0, 7, 40, 3):  # any order, fresh or not
        assert np.array_equal(a.batch(step), b.batch(step))
    assert not np.array_equal(a.batch(1), WindowSampler(tokens, 16, 5, seed=4).batch(1))
    batch = a.batch(2)
    assert batch.shape == (5, 17) and batch.dtype == np.int32
    # Windows are contiguous slices of the stream.
    assert (np.diff(batch, axis=1) == 1).all()
    assert a.state(4) == {
        "seed": 3, "step": 4, "sample": 20, "epoch": 20 / 62, "windows_per_epoch": 62,
    }  # fmt: skip


def test_an_epoch_visits_every_window_once():
    tokens = np.arange(200, dtype=np.uint16)
    s = WindowSampler(tokens, seq_len=10, batch_size=19, seed=0)
    assert s.windows_per_epoch == 19
    starts = s.starts(0)
    offset = starts.min()
    assert sorted(starts - offset) == list(range(0, 190, 10))
    assert (starts + 11 <= 200).all()
    # The next epoch moves the windows' edges or their order.
    assert not np.array_equal(s.starts(1), starts)
    rows = s.batch(0, slice(5, 10))
    assert np.array_equal(rows, s.batch(0)[5:10])


def test_data_shorter_than_one_window():
    with pytest.raises(DataError, match=r"10 training tokens .* seq_len \+ 1 = 17 .*--seq-len 9"):
        WindowSampler(np.arange(10, dtype=np.uint16), seq_len=16, batch_size=1, seed=0)


def test_eval_windows_predict_every_token_once():
    tokens = np.arange(1, 24, dtype=np.uint16)  # 23 tokens, 22 predictions
    windows, weights = eval_windows(tokens, seq_len=5)
    assert windows.shape == (5, 6) and weights.sum() == 22
    targets = windows[:, 1:][weights > 0]
    assert sorted(targets.tolist()) == list(range(2, 24))
    few_w, few_m = spread(windows, weights, 2)
    assert np.array_equal(few_w, windows[[0, 4]]) and np.array_equal(few_m, weights[[0, 4]])
    assert eval_windows(tokens[:1], 5)[0].shape == (0, 6)


def test_split_tail():
    tokens = np.arange(100)
    train, val = split_tail(tokens, 0.1)
    assert np.array_equal(train, np.arange(90)) and np.array_equal(val, np.arange(90, 100))
    assert len(split_tail(tokens, 0.0)[1]) == 0
    with pytest.raises(DataError, match="--val-fraction"):
        split_tail(tokens, 1.0)


def test_prefetcher_keeps_order_and_reraises():
    seen_threads = set()

    def make(step):
        seen_threads.add(threading.current_thread().name)
        if step == 5:
            raise ValueError("bad batch 5")
        return step * 10

    p = Prefetcher(make, start=2, stop=9)
    assert [p.next() for _ in range(3)] == [20, 30, 40]
    with pytest.raises(ValueError, match="bad batch 5"):
        p.next()
    p.close()
    assert threading.current_thread().name not in seen_threads


def test_cache_files_are_complete_and_described(load, tmp_path):
    out = load(ENGLISH)
    meta = json.loads(open(os.path.splitext(out.path)[0] + ".json").read())
    assert meta["n_tokens"] == len(out.tokens) and meta["files"][0]["path"] == str(ENGLISH)
    leftovers = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".tmp")]
    assert not leftovers
