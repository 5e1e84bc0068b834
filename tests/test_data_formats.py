"""``--data`` from parquet files and from ``datasets.save_to_disk`` directories (optional
extras): the same token stream as the same documents in a JSONL file, ``--field``, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FIXTURES, TOKENIZER_DIR
from gpt2jax.cli import main as cli
from gpt2jax.errors import DataError
from gpt2jax.tokenizer import Tokenizer
from gpt2jax.train.data import load_tokens

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

STORIES = (FIXTURES / "english.txt").read_text(encoding="utf-8").split("\n\n")
DOCS = [s for s in STORIES if s.strip()] + ["café 你好 <|endoftext|> 🤖", "  "]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TOKENIZER_DIR)


def _jsonl_tokens(tmp_path, tok, docs) -> np.ndarray:
    path = tmp_path / "ref.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return np.asarray(
        load_tokens([path], tok, cache_dir=tmp_path / "c", show_progress=False).tokens
    )


def test_parquet_rows_are_documents_like_jsonl_lines(tmp_path, tok):
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS, "other": ["x"] * len(DOCS)})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=3)  # several row groups
    assert pq.ParquetFile(tmp_path / "d.parquet").num_row_groups > 2
    got = load_tokens([tmp_path / "d.parquet"], tok, cache_dir=tmp_path / "c", show_progress=False)
    np.testing.assert_array_equal(got.tokens, _jsonl_tokens(tmp_path, tok, DOCS))
    assert got.n_documents == len(DOCS) - 1  # the whitespace-only row is no document


def test_parquet_field_and_errors(tmp_path, tok):
    pq.write_table(pa.table({"body": DOCS[:3], "n": [1, 2, 3]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match="2 columns .*choose with --field"):
        load_tokens([tmp_path / "b.parquet"], tok, cache_dir=tmp_path / "c", show_progress=False)
    got = load_tokens(
        [tmp_path / "b.parquet"], tok, field="body", cache_dir=tmp_path / "c", show_progress=False
    )
    np.testing.assert_array_equal(got.tokens, _jsonl_tokens(tmp_path, tok, DOCS[:3]))
    with pytest.raises(DataError, match="column 'n' holds int64, not text"):
        load_tokens([tmp_path / "b.parquet"], tok, field="n", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="no column 'nope'"):
        load_tokens([tmp_path / "b.parquet"], tok, field="nope", cache_dir=tmp_path / "c")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_tokens([tmp_path / "bad.parquet"], tok, cache_dir=tmp_path / "c")


def test_parquet_cache_follows_the_content(tmp_path, tok):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": DOCS[:2]}), path)
    a = load_tokens([path], tok, cache_dir=tmp_path / "c", show_progress=False)
    pq.write_table(pa.table({"text": DOCS[1:3]}), path)
    b = load_tokens([path], tok, cache_dir=tmp_path / "c", show_progress=False)
    assert a.key != b.key and not b.cached
    np.testing.assert_array_equal(b.tokens, _jsonl_tokens(tmp_path, tok, DOCS[1:3]))


@pytest.mark.parametrize("as_dict", [False, True])
def test_saved_datasets_directory(tmp_path, tok, as_dict):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": DOCS, "n": list(range(len(DOCS)))})
    if as_dict:
        ds = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    ds.save_to_disk(str(tmp_path / "saved"))
    got = load_tokens(
        [tmp_path / "saved"], tok, field="content", cache_dir=tmp_path / "c", show_progress=False
    )
    np.testing.assert_array_equal(got.tokens, _jsonl_tokens(tmp_path, tok, DOCS))
    with pytest.raises(DataError, match="choose with --field"):
        load_tokens([tmp_path / "saved"], tok, cache_dir=tmp_path / "c2")


def test_eval_command_reads_parquet(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPT2JAX_CACHE", str(tmp_path / "cache"))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "d.parquet")
    argv = ["eval", str(FIXTURES / "openai_tiny"), "--json", "--seq-len", "16", "--data"]
    assert cli.main([*argv, str(tmp_path / "d.parquet")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 1000 and np.isfinite(result["loss"])
