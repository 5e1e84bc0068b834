"""Training text -> one cached, memory-mapped array of GPT-2 token ids.

:func:`load_tokens` reads files (plain text, ``.csv``, ``.jsonl``), directories and globs, and
joins the documents as nanoGPT's ``openwebtext/prepare.py`` does (each followed by
``<|endoftext|>``). It tokenizes once: the ids are cached under a hash of the inputs, the reader
options and the tokenizer, so a changed file is re-tokenized and an unchanged one never is.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import glob
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from gpt2jax.errors import DataError
from gpt2jax.files import apply_umask, check_regular, open_regular
from gpt2jax.progress import progress_bar
from gpt2jax.store.runs import write_json_atomic
from gpt2jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_VERSION = 1
TOKEN_DTYPE = np.dtype("<u2")  # GPT-2's 50257 ids fit in 16 bits
_BLOCK = 1 << 20  # characters of plain text read (and encoded) at a time
_BATCH_CHARS = 8 << 20  # characters handed to one encode_batch call
_SNIFF = 8192  # bytes checked for NUL, as git decides that a file is binary
_LEGIT_FFFD = "\ufffd".encode()  # U+FFFD present in the file itself, not a replacement
# A pre-token boundary: a non-space, then one ASCII whitespace character (whitespace for both
# Python's and tiktoken's regex engines, which disagree on a few control characters) followed by
# a non-space.
_SAFE_SPLIT = re.compile(r"(?<=\S)(?=[ \t\n\r\f\v]\S)")


@dataclasses.dataclass
class TokenData:
    """A tokenized corpus: ``tokens`` is a read-only ``(N,)`` uint16 memmap of the cache file."""

    tokens: np.ndarray
    key: str
    path: str
    n_documents: int
    files: list[dict[str, Any]]  # {"path", "bytes", "replaced"} per input file
    cached: bool  # True when this call reused an existing cache entry

    @property
    def name(self) -> str:
        """The inputs, for messages: one path, or the first and a count."""
        paths = [f["path"] for f in self.files]
        return paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more files)"

    @property
    def replaced(self) -> int:
        return sum(f["replaced"] for f in self.files)


def cache_root() -> str:
    """``$GPT2JAX_CACHE``, else ``$XDG_CACHE_HOME/gpt2jax`` (``~/.cache/gpt2jax``)."""
    root = os.environ.get("GPT2JAX_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "gpt2jax")
    return root


def default_cache_dir() -> str:
    """Where tokenized data is cached: ``<cache_root()>/tokens``."""
    return os.path.join(cache_root(), "tokens")


def resolve_paths(specs: Sequence[str | os.PathLike]) -> list[str]:
    """Expands files, directories (their ``.txt`` files) and globs into a list of files.

    Only regular files are read: a FIFO or a device given by name is refused at once, saying
    what it is (one found by a directory or a glob too). Directories and ``**`` are walked
    without following symbolic links to directories, so a link cycle cannot make it loop.
    """
    if not specs:
        raise DataError("no data given")
    files: dict[str, None] = {}  # ordered, without repeats
    for spec in map(os.fspath, specs):
        if os.path.isdir(spec) and is_saved_dataset(spec):
            files[spec] = None  # a directory `datasets` reads itself: not checked as a file
            continue
        if os.path.isdir(spec):
            found = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(spec)
                for f in names
                if f.endswith(".txt")
            )
            if not found:
                raise DataError(f"{spec}: directory has no .txt files")
        elif os.path.lexists(spec) or not glob.has_magic(spec):
            found = [spec]
        else:
            found = sorted(p for p in safe_glob(spec) if os.path.isfile(p))
            if not found:
                raise DataError(f"{spec}: no files match this pattern")
        for path in found:
            try:
                check_regular(path, DataError)
            except FileNotFoundError:
                raise DataError(f"{path}: no such file or directory") from None
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror})") from None
        files.update(dict.fromkeys(found))
    return list(files)


def safe_glob(pattern: str) -> list[str]:
    """The paths matching a glob ``pattern`` as :func:`glob.glob` (``recursive=True``) finds
    them (``**`` is any number of directories; ``*`` skips names starting with a dot unless
    the pattern's part does too), except that ``**`` never enters a symbolic link to a
    directory: a link cycle would make :func:`glob.glob` list the same files dozens of times
    over, or run for hours."""
    parts = pattern.split(os.sep)
    fixed = 0
    while fixed < len(parts) - 1 and not glob.has_magic(parts[fixed]):
        fixed += 1
    root = os.sep.join(parts[:fixed]) or (os.sep if pattern.startswith(os.sep) else "")
    found: list[str] = []

    def entries(folder: str) -> list[os.DirEntry]:
        try:
            with os.scandir(folder or os.curdir) as it:
                return list(it)
        except OSError:
            return []

    def walk(folder: str, rest: list[str]) -> None:
        head, tail = rest[0], rest[1:]
        if head == "**":
            if tail:
                walk(folder, tail)  # zero directories
            for e in entries(folder):
                if not e.name.startswith(".") and e.is_dir(follow_symlinks=False):
                    if not tail:
                        found.append(os.path.join(folder, e.name))
                    walk(os.path.join(folder, e.name), rest)
            if not tail:
                found.extend(
                    os.path.join(folder, e.name)
                    for e in entries(folder)
                    if not e.name.startswith(".") and not e.is_dir(follow_symlinks=False)
                )
            return
        if not glob.has_magic(head):
            names = [head] if os.path.lexists(os.path.join(folder, head)) else []
        else:
            names = [e.name for e in entries(folder) if fnmatch.fnmatch(e.name, head)
                     and (head.startswith(".") or not e.name.startswith("."))]  # fmt: skip
        for name in names:
            path = os.path.join(folder, name)
            if not tail:
                found.append(path)
            elif os.path.isdir(path):
                walk(path, tail)

    walk(root, parts[fixed:])
    return found


def file_kind(path: str) -> str:
    """``csv``, ``jsonl``, ``parquet``, ``datasets`` (a saved dataset directory) or ``text``."""
    if os.path.isdir(path):
        return "datasets"
    ext = os.path.splitext(path)[1].lower()
    kinds = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
    return kinds.get(ext, "text")


def is_saved_dataset(path: str) -> bool:
    """A directory ``datasets.Dataset(Dict).save_to_disk`` wrote (its ``state.json`` or
    ``dataset_dict.json``)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def safe_split(text: str, max_chars: int) -> list[str]:
    """Cuts ``text`` into pieces of about ``max_chars`` whose encodings concatenate to its own.

    GPT-2's pre-tokenizer regex never puts a single whitespace character that follows a
    non-space and precedes a non-space into the same pre-token as what comes before it (its
    alternatives either start with an optional space or are whitespace runs), and BPE merges
    only inside pre-tokens; so cutting just before such a character changes no token. Text with
    no such place in a stretch stays whole there.
    """
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = _last_boundary(text, start + max_chars // 2, start + max_chars)
        if cut is None:  # none in the window: the first one after it
            m = _SAFE_SPLIT.search(text, start + max_chars)
            if m is None:
                break
            cut = m.start()
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _last_boundary(text: str, lo: int, hi: int) -> int | None:
    """The last :data:`_SAFE_SPLIT` position in ``[lo, hi)``, looking at the end first."""
    for width in (256, 65536, hi - lo):
        last = None
        for m in _SAFE_SPLIT.finditer(text, max(lo, hi - width), hi):
            last = m.start()
        if last is not None and last > lo:
            return last
    return None


def load_tokens(
    specs: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    *,
    column: str | None = None,
    field: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> TokenData:
    """Tokenizes ``specs`` (files, directories, globs) once, reusing the cache when it can.

    What is read:

    * a file: ``.csv`` is one document per row (the ``column`` given, or the only column, or one
      named ``text``; Python's ``csv`` module, header row required), ``.jsonl`` / ``.ndjson`` one
      document per line (the string ``field``, default ``text``), anything else is one
      plain-text document per file (``.txt``);
    * a directory: every ``.txt`` file under it, recursively, in sorted order;
    * a glob pattern (``data/*.txt``, ``**`` allowed), in sorted order; several of these together.

    Text is UTF-8 (a leading byte-order mark is dropped). Undecodable bytes are replaced with
    U+FFFD as Python's ``errors="replace"`` does; how many were replaced is counted per file and
    logged. A file with a NUL byte in its first 8 KiB, or mostly undecodable, is refused as
    binary.

    The token stream follows nanoGPT's ``openwebtext/prepare.py``: every non-empty document's
    tokens followed by ``<|endoftext|>`` (50256). A literal ``<|endoftext|>`` in the text is that
    token too, as gpt-2-simple users write it to separate documents inside one file. Long
    documents are encoded in pieces of about a megabyte, cut only where GPT-2's pre-tokenizer
    splits anyway (:func:`safe_split`), so the ids are exactly those of encoding the whole
    document at once; tiktoken releases the GIL, so the pieces are encoded on several threads.

    The ids are written as raw little-endian uint16 (GPT-2's 50257 ids fit) to
    ``<cache>/<key>.tokens`` plus ``<key>.json``, both under temporary names renamed into place,
    so a killed run never leaves a truncated cache that looks complete. ``key`` is a SHA-256 of
    every input file's bytes (in order), the reader options and the tokenizer. The cache
    directory is ``cache_dir`` if given, else :func:`default_cache_dir`.
    """
    files = resolve_paths(specs)
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    infos = [_inspect(path) for path in files]
    digest = hashlib.sha256(
        json.dumps(
            {
                "version": CACHE_VERSION,
                "tokenizer": _tokenizer_fingerprint(tokenizer),
                "column": column,
                "field": field,
                "files": [(file_kind(i["path"]), i["sha256"]) for i in infos],
            }
        ).encode()
    )
    key = digest.hexdigest()[:32]
    tokens_path = os.path.join(cache_dir, f"{key}.tokens")
    meta_path = os.path.join(cache_dir, f"{key}.json")

    meta = _read_cache_meta(meta_path, tokens_path)
    cached = meta is not None
    if meta is None:
        meta = _tokenize_to_cache(infos, tokenizer, column, field, cache_dir, key, show_progress)
    # the files as given this time: a cache entry made from the same bytes under another name
    # (a copy) is reused, but reported with the names the user passed now
    files_meta = [dict(f, path=i["path"]) for f, i in zip(meta["files"], infos, strict=True)]
    for f in files_meta:
        if f["replaced"]:
            log.warning(
                "%s: %d undecodable byte sequence(s) replaced with U+FFFD (not valid UTF-8)",
                f["path"],
                f["replaced"],
            )
    if meta["n_tokens"] == 0:
        raise DataError(f"{_names(files)}: no text (the data is empty or only whitespace)")
    tokens = np.memmap(tokens_path, dtype=TOKEN_DTYPE, mode="r", shape=(meta["n_tokens"],))
    return TokenData(tokens, key, tokens_path, meta["n_documents"], files_meta, cached)


def split_tail(tokens: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)``: the last ``fraction`` of the token stream is held out for validation.

    A tail, not a random set of documents, so that a single long text still gets a validation
    set and no window straddles training and validation data.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {fraction}")
    n_val = int(len(tokens) * fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def check_vocab(tokens: np.ndarray, n_vocab: int, name: str) -> None:
    """A clear error when the data holds ids the model has no embedding for."""
    if n_vocab <= np.iinfo(tokens.dtype).max and len(tokens):
        top = int(tokens.max())
        if top >= n_vocab:
            raise DataError(
                f"{name}: token id {top} is outside the model's vocabulary of {n_vocab}"
            )


# -- reading -------------------------------------------------------------------------------------


def _names(files: Sequence[str]) -> str:
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"


def _inspect(path: str) -> dict[str, Any]:
    """Hashes a file and counts the U+FFFD characters its bytes legitimately encode."""
    if file_kind(path) in ("parquet", "datasets"):
        return _inspect_binary(path)
    sha, legit, size, tail = hashlib.sha256(), 0, 0, b""
    try:
        with open_regular(path, DataError) as f:
            head = f.read(_SNIFF)
            block = head
            while block:
                sha.update(block)
                size += len(block)
                # The 2 bytes kept from the last block catch a U+FFFD split across blocks.
                legit += (tail + block).count(_LEGIT_FFFD)
                tail = block[-2:]
                block = f.read(1 << 22)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if b"\0" in head:
        raise DataError(f"{path}: looks like a binary file (NUL bytes), expected UTF-8 text")
    head_text = head.decode("utf-8", "replace")
    if len(head) >= 64 and head_text.count("\ufffd") > 0.3 * len(head_text):
        raise DataError(f"{path}: looks like a binary file (mostly invalid UTF-8), expected text")
    return {"path": path, "sha256": sha.hexdigest(), "bytes": size, "legit_fffd": legit}


def _inspect_binary(path: str) -> dict[str, Any]:
    """Hashes a parquet file, or every file of a saved dataset directory (names and bytes)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    else:
        files = [path]
    sha, size = hashlib.sha256(), 0
    try:
        for name in files:
            sha.update(os.path.relpath(name, path).encode() + b"\0")
            with open(name, "rb") as f:
                while block := f.read(1 << 22):
                    sha.update(block)
                    size += len(block)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return {"path": path, "sha256": sha.hexdigest(), "bytes": size, "legit_fffd": 0}


def _open_text(path: str) -> io.TextIOWrapper:
    # utf-8-sig drops a byte-order mark; newline="" leaves line endings to csv/our own code.
    raw = open_regular(path, DataError)
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")


def _text_document(path: str, counter: dict[str, int]) -> Iterator[str]:
    """The pieces of one plain-text document, cut at :func:`safe_split` points."""
    carry = ""
    seen_text = False  # a whitespace-only file is no document at all
    with _open_text(path) as f:
        while block := f.read(_BLOCK):
            counter["fffd"] += block.count("\ufffd")
            counter["bytes"] += len(block)
            carry += block
            seen_text = seen_text or not carry.isspace()
            if not seen_text or len(carry) < 2 * _BLOCK:
                continue
            *ready, carry = safe_split(carry, _BLOCK)
            yield from ready
    if seen_text:
        yield from safe_split(carry, _BLOCK)


def _jsonl_documents(path: str, field: str, counter: dict[str, int]) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            counter["fffd"] += line.count("\ufffd")
            counter["bytes"] += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{lineno}: no {field!r} field (choose one with --field)")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not text"
                )
            yield text


def _csv_documents(path: str, column: str | None, counter: dict[str, int]) -> Iterator[str]:
    csv.field_size_limit(2**31 - 1)  # a document per cell can be long

    def counted_lines(f: Iterable[str]) -> Iterator[str]:
        for line in f:
            counter["fffd"] += line.count("\ufffd")
            counter["bytes"] += len(line)
            yield line

    with _open_text(path) as f:
        reader = csv.reader(counted_lines(f))
        try:
            header = next(reader, None)
            if header is None:
                return
            # the first few names: a header can be megabytes long, an error stays one short line
            names = (", ".join(header[:10]) + (", ..." if len(header) > 10 else ""))[:300]
            if column is not None:
                if column not in header:
                    raise DataError(f"{path}: no column {column[:100]!r} (columns: {names})")
                index = header.index(column)
            elif len(header) == 1:
                index = 0
            elif "text" in header:
                index = header.index("text")
            else:
                raise DataError(
                    f"{path}: {len(header)} columns ({names}); choose one with --column"
                )
            for row in reader:
                if index < len(row):
                    yield row[index]
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _text_column(path: str, names: list[str], field: str | None) -> str:
    """The column of a table holding the documents: ``field``, else ``text``, else the only
    column."""
    if field is not None:
        if field not in names:
            raise DataError(f"{path}: no column {field!r} (columns: {', '.join(names[:10])})")
        return field
    if "text" in names:
        return "text"
    if len(names) == 1:
        return names[0]
    raise DataError(f"{path}: {len(names)} columns ({', '.join(names[:10])}); choose with --field")


def _arrow_batches(path: str, column: str, batches: Iterator[Any]) -> Iterator[list]:
    """The values of ``column`` batch by batch (Arrow record batches), checked to be text."""
    import pyarrow as pa

    for batch in batches:
        array = batch.column(column)
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            raise DataError(f"{path}: column {column!r} holds {array.type}, not text")
        yield array.to_pylist()


def _parquet_documents(path: str, field: str | None, counter: dict[str, int]) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise DataError(
            f'{path}: reading parquet needs pyarrow: pip install "gpt2jax[parquet]"'
        ) from None
    try:
        table = pq.ParquetFile(path)
        column = _text_column(path, table.schema_arrow.names, field)
        per_group = [table.metadata.row_group(i) for i in range(table.num_row_groups)]
        size = os.path.getsize(path)
        rows = max(1, table.metadata.num_rows)
        # one row group at a time: memory stays one group's text, whatever the file's size
        for i, group in enumerate(per_group):
            batch = table.read_row_group(i, columns=[column])
            for values in _arrow_batches(path, column, iter(batch.to_batches())):
                yield from (v for v in values if v is not None)
            counter["bytes"] += size * group.num_rows // rows
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def _dataset_documents(path: str, field: str | None, counter: dict[str, int]) -> Iterator[str]:
    try:
        import datasets
    except ModuleNotFoundError:
        raise DataError(
            f'{path}: reading a saved dataset needs datasets: pip install "gpt2jax[datasets]"'
        ) from None
    try:
        ds = datasets.load_from_disk(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable saved dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
        ds = ds["train"]
    column = _text_column(path, list(ds.column_names), field)
    total, size = max(1, len(ds)), _dir_bytes(path)
    # the dataset is memory-mapped Arrow: a thousand rows at a time stay in memory
    table = ds.with_format("arrow")
    for start in range(0, len(ds), 1000):
        batch = table[start : start + 1000]
        for values in _arrow_batches(path, column, iter(batch.select([column]).to_batches())):
            yield from (v for v in values if v is not None)
        counter["bytes"] = size * min(len(ds), start + 1000) // total


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, names in os.walk(path) for f in names)


def _documents(
    info: dict[str, Any], column: str | None, field: str | None, counter: dict[str, int]
) -> Iterator[tuple[str, bool]]:
    """``(piece, ends_document)`` for every non-empty document of one file."""
    path, kind = info["path"], file_kind(info["path"])
    if kind == "text":
        previous = None  # one piece of lookahead tells which is the last
        for piece in _text_document(path, counter):
            if previous is not None:
                yield previous, False
            previous = piece
        if previous is not None:
            yield previous, True
        return
    if kind == "csv":
        docs = _csv_documents(path, column, counter)
    elif kind == "parquet":
        docs = _parquet_documents(path, field, counter)
    elif kind == "datasets":
        docs = _dataset_documents(path, field, counter)
    else:
        docs = _jsonl_documents(path, field or "text", counter)
    for doc in docs:
        if doc.strip():
            for i, piece in enumerate(pieces := safe_split(doc, _BLOCK)):
                yield piece, i == len(pieces) - 1


# -- tokenizing and caching ----------------------------------------------------------------------


def _tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Identifies the vocabulary by what it does to a probe of varied text."""
    probe = "Hello world! ' 's  \n\n\tcafé 你好 1234 <|endoftext|> ∑ 🤖 ABCabc"
    ids = tokenizer.encode(probe)
    return hashlib.sha256(f"{tokenizer.n_vocab}:{ids}".encode()).hexdigest()[:16]


def _read_cache_meta(meta_path: str, tokens_path: str) -> dict[str, Any] | None:
    """The cache entry's metadata if the entry is complete and consistent, else None."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if os.path.getsize(tokens_path) == meta["n_tokens"] * TOKEN_DTYPE.itemsize:
            return meta
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


class _TokenWriter:
    """Encodes pieces in batches on several threads and appends their ids to a file."""

    def __init__(self, out: io.BufferedWriter, tokenizer: Tokenizer) -> None:
        self.out, self.tokenizer = out, tokenizer
        self.threads = max(1, min(8, os.cpu_count() or 1))
        self.pieces: list[str] = []
        self.ends: list[bool] = []
        self.chars = 0
        self.n_tokens = 0
        self.n_documents = 0

    def add(self, piece: str, ends_document: bool) -> None:
        self.pieces.append(piece)
        self.ends.append(ends_document)
        self.chars += len(piece)
        if self.chars >= _BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        encoded = self.tokenizer.encode_batch(self.pieces, num_threads=self.threads)
        for ids, end in zip(encoded, self.ends, strict=True):
            if end:
                ids.append(self.tokenizer.eot)
                self.n_documents += 1
            self.out.write(np.asarray(ids, TOKEN_DTYPE).tobytes())
            self.n_tokens += len(ids)
        self.pieces, self.ends, self.chars = [], [], 0


def _tokenize_to_cache(
    infos: list[dict[str, Any]],
    tokenizer: Tokenizer,
    column: str | None,
    field: str | None,
    cache_dir: str,
    key: str,
    show_progress: bool,
) -> dict[str, Any]:
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=cache_dir)
    except OSError as e:
        raise DataError(f"{cache_dir}: cannot write the token cache ({e.strerror})") from None
    files_meta = []
    total = sum(i["bytes"] for i in infos)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            progress_bar(total, "tokenizing", unit="B", enabled=show_progress) as bar,
        ):
            writer = _TokenWriter(out, tokenizer)
            for info in infos:
                counter = {"fffd": 0, "bytes": 0}
                start = bar.n
                for piece, end in _documents(info, column, field, counter):
                    writer.add(piece, end)
                    # Characters read stand in for bytes (exact for ASCII text).
                    bar.update(max(0, min(counter["bytes"], info["bytes"]) - (bar.n - start)))
                bar.update(info["bytes"] - (bar.n - start))
                replaced = max(0, counter["fffd"] - info["legit_fffd"])
                files_meta.append(
                    {"path": info["path"], "bytes": info["bytes"], "replaced": replaced}
                )
            writer.flush()
        meta = {
            "version": CACHE_VERSION,
            "key": key,
            "n_tokens": writer.n_tokens,
            "n_documents": writer.n_documents,
            "dtype": TOKEN_DTYPE.str,
            "files": files_meta,
        }
        apply_umask(tmp)
        os.replace(tmp, os.path.join(cache_dir, f"{key}.tokens"))
        write_json_atomic(os.path.join(cache_dir, f"{key}.json"), meta)
        return meta
    except OSError as e:
        raise DataError(f"{cache_dir}: writing the token cache failed ({e.strerror})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
