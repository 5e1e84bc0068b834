"""``gpt2jax download``: OpenAI's GPT-2 checkpoints from their published location, resumably.

The seven files per size that OpenAI's ``download_model.py`` (github.com/openai/gpt-2) fetches,
with the standard library only, plus what a multi-gigabyte download over a flaky link needs:
resuming, retrying, and never leaving a truncated file that looks whole (see :func:`download`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable

import numpy as np
from tqdm.auto import tqdm

from gpt2jax.config import PRESETS, GPT2Config, read_json
from gpt2jax.errors import ConfigError, Gpt2JaxError
from gpt2jax.files import open_regular, read_bytes
from gpt2jax.progress import progress_bar

#: OpenAI's published location; ``<base>/<size>/<file>`` is one file. Overridden by ``base_url``
#: or ``$GPT2JAX_BASE_URL`` (a mirror laid out the same way, e.g. a served ``models/`` folder).
OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"

#: The seven files of every size (OpenAI's download_model.py lists them), in the order they are
#: fetched: the small ones first, so that ``hparams.json`` and the index tell the data file's
#: exact size before it is downloaded.
FILES = (
    "checkpoint",
    "hparams.json",
    "encoder.json",
    "vocab.bpe",
    "model.ckpt.meta",
    "model.ckpt.index",
    "model.ckpt.data-00000-of-00001",
)
DATA, INDEX = "model.ckpt.data-00000-of-00001", "model.ckpt.index"

#: The tokenizer files, byte-identical in every size: (bytes, SHA-256), as tiktoken checks them.
PUBLISHED = {
    "encoder.json": (1042301, "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": (456318, "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
#: The most bytes any other small file may have (OpenAI's: under 2 MB).
MAX_BYTES = {
    "checkpoint": 1 << 16,
    "hparams.json": 1 << 16,
    "model.ckpt.meta": 64 << 20,
    "model.ckpt.index": 16 << 20,
}

MANIFEST = ".complete"  # JSON: {"base_url": ..., "files": {name: length in bytes}}
TIMEOUT_S = 30.0  # per socket operation (connect, each read), not per file
MAX_STALLS = 5  # tries in a row that add no byte before a file is given up
RETRY_DELAY_S = 1.0  # times the number of stalls so far: 1 s, 2 s, 3 s, ...
CHUNK = 1 << 20


def models_root() -> str:
    """``$GPT2JAX_CACHE/models``, else ``$XDG_CACHE_HOME/gpt2jax/models`` (``~/.cache/...``)."""
    root = os.environ.get("GPT2JAX_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "gpt2jax")
    return os.path.join(os.path.expanduser(root), "models")


def check_size(size: str) -> str:
    """``size`` if it is one of OpenAI's sizes, else a :class:`ConfigError` listing them."""
    if size not in PRESETS:
        raise ConfigError(f"unknown model size {size!r}: choose one of {', '.join(PRESETS)}")
    return size


def is_complete(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds all seven files at the lengths its manifest recorded, each
    passing :func:`check_file`.

    Reads only the local disk: this is what lets a complete download make no request at all.
    """
    directory = os.fspath(directory)
    recorded = _read_manifest(directory)["files"]
    return all(
        recorded.get(name) is not None
        and recorded[name] == _length(os.path.join(directory, name))
        and check_file(directory, name) is None
        for name in FILES
    )


def download(
    sizes: str | Iterable[str],
    dest: str | os.PathLike | None = None,
    base_url: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Downloads OpenAI's checkpoint of each size into ``<dest>/<size>``; returns those paths.

    Args:
        sizes: ``"124M"``, ``"355M"``, ``"774M"``, ``"1558M"``, or several of them.
        dest: the folder the size directories go in (default :func:`models_root`).
        base_url: where ``<base_url>/<size>/<file>`` is fetched from (default
            ``$GPT2JAX_BASE_URL``, else :data:`OPENAI_BASE_URL`).
        progress: a bar with bytes and speed per file, on stderr.

    Files already complete are skipped; a partial file is resumed. Raises
    :class:`~gpt2jax.errors.Gpt2JaxError` with one line naming the URL or host on failure.

    Each file comes from ``<base_url>/<size>/<file>``, as OpenAI's ``download_model.py`` fetches
    it from ``https://openaipublic.blob.core.windows.net/gpt-2/models``, and:

    - is written to ``<file>.part`` and renamed into place only once its length matches the
      server's ``Content-Length``, so a killed download never leaves a truncated file that looks
      whole;
    - when interrupted, is resumed with an HTTP ``Range`` request; a server that ignores
      ``Range`` (answers 200) or cannot satisfy it (416) makes the file start over;
    - after a dropped connection, a socket timeout, a short body or a 5xx answer, is retried,
      resuming, until :data:`MAX_STALLS` tries in a row have added no byte; then the error names
      the file;
    - once finished, is recorded with its length in ``<dir>/.complete``, so a complete directory
      is recognised without any network request. A file already present but not recorded
      (copied by hand, say) is checked by resuming it: one request, no bytes when it is whole;
    - is recorded only once validated (:func:`check_file`): ``encoder.json`` and ``vocab.bpe``
      are the published files (size and SHA-256, the same in every size), ``hparams.json`` a
      GPT-2 config, ``checkpoint`` TF's text format, the index and data pair a valid tensor
      bundle of exactly the model ``hparams.json`` describes, and no file a web page (a captive
      portal answers 200 with HTML for every URL). A ``text/html`` answer, a ``Content-Length``
      other than the known size, and a body without one that runs past it are refused at once.
      A recorded file that fails these checks is fetched again.

    The first request that cannot reach the host fails at once with a one-line hint (offline?
    set ``GPT2JAX_BASE_URL`` to a mirror). File names are fixed and the size must be one of
    :data:`gpt2jax.config.PRESETS`, so nothing the server sends chooses where a file is written.
    """
    sizes = [sizes] if isinstance(sizes, str) else list(sizes)
    for size in sizes:
        check_size(size)  # every size before the first request
    root = os.path.expanduser(os.fspath(dest)) if dest is not None else models_root()
    base = (base_url or os.environ.get("GPT2JAX_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"base URL {base!r}: expected http(s)://host/path")
    directories = []
    for size in sizes:
        directory = os.path.join(root, size)
        os.makedirs(directory, exist_ok=True)
        manifest = _read_manifest(directory)
        for name in FILES:
            path = os.path.join(directory, name)
            recorded = manifest["files"].get(name)
            if (
                recorded is not None
                and recorded == _length(path)
                and check_file(directory, name) is None
            ):
                continue
            if recorded is not None:  # changed since it was complete: fetched afresh, not resumed
                _discard(path)
                del manifest["files"][name]
                _write_manifest(directory, manifest)
            url = f"{base}/{urllib.parse.quote(size)}/{name}"
            length = _fetch(url, path, size, progress, _expected_size(directory, name, size))
            problem = check_file(directory, name)
            if problem is not None:
                _discard(path)
                if name == DATA:  # the pair is invalid: the index goes too
                    _discard(os.path.join(directory, INDEX))
                    manifest["files"].pop(INDEX, None)
                    _write_manifest(directory, manifest)
                raise Gpt2JaxError(
                    f"{url}: {problem}; the file was not kept (is {base} a GPT-2 mirror? a "
                    "captive portal or proxy can answer with a web page)"
                )
            manifest["files"][name] = length
            manifest["base_url"] = base
            _write_manifest(directory, manifest)  # after every file: a rerun skips it
        directories.append(directory)
    return directories


# -- what is downloaded is checked before it is recorded ------------------------------------


def _looks_like_html(head: bytes) -> bool:
    text = head[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")) or (
        b"<html" in text
    )


def _expected_size(directory: str, name: str, size: str) -> tuple[int, bool]:
    """``(bytes, exact)``: the size ``name`` must have (exact) or not exceed. The data file's is
    what ``hparams.json`` (already fetched) implies, at most the size name's own."""
    if name in PUBLISHED:
        return PUBLISHED[name][0], True
    if name in MAX_BYTES:
        return MAX_BYTES[name], False
    preset = PRESETS[size].num_params() * 4
    try:
        config = GPT2Config.from_hparams(read_json(os.path.join(directory, "hparams.json")))
    except Gpt2JaxError:
        return preset, False
    return min(config.num_params() * 4, preset), config.num_params() * 4 <= preset


def check_file(directory: str, name: str) -> str | None:
    """What is wrong with the downloaded ``directory/name`` (None: nothing). Reads only small
    files and the index; of the data file its size and a CRC of its small tensors."""
    import hashlib

    path = os.path.join(directory, name)
    try:
        with open_regular(path) as f:
            head = f.read(1024)
    except (OSError, Gpt2JaxError) as e:
        return f"unreadable ({getattr(e, 'strerror', None) or e})"
    if _looks_like_html(head):
        return "a web page (HTML), not the file"
    if name in PUBLISHED:
        length, digest = PUBLISHED[name]
        if _length(path) != length:
            return f"{_length(path):,} bytes, the published file has {length:,}"
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
        return None if sha.hexdigest() == digest else "not the published file (SHA-256 differs)"
    if name in MAX_BYTES and (_length(path) or 0) > MAX_BYTES[name]:
        return f"{_length(path):,} bytes, too large for {name}"
    try:
        if name == "hparams.json":
            GPT2Config.from_hparams(read_json(path), source=path)
        elif name == "checkpoint":
            text = read_bytes(path, MAX_BYTES[name]).decode("utf-8")
            if not re.search(r'^model_checkpoint_path: "[^"\n]+"$', text, re.MULTILINE):
                return "not a TensorFlow checkpoint state (no model_checkpoint_path line)"
        elif name == "model.ckpt.meta":
            if head[:1] != b"\x0a":
                return "not a TensorFlow MetaGraphDef"
        elif name == DATA:
            return _check_bundle(directory)
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except Gpt2JaxError as e:
        return str(e).replace(path, name)
    return None


def _check_bundle(directory: str) -> str | None:
    """The index and data pair: a tensor bundle of exactly the tensors ``hparams.json``
    describes, whose data file is exactly as long as the tensors need, with every small
    tensor's CRC32C right."""
    from gpt2jax.convert import mapping
    from gpt2jax.formats.tf_bundle import BundleReader

    config = GPT2Config.from_hparams(read_json(os.path.join(directory, "hparams.json")))
    with BundleReader(os.path.join(directory, "model.ckpt")) as reader:
        source = os.path.join(directory, INDEX)
        names = set(reader.names())
        mapping.check_names(names, config, "openai", source)
        shapes = {n: reader.shape(n) for n in names}
        mapping.check_shapes(shapes, config, "openai", source, "hparams.json")
        needed = sum(int(np.prod(s)) * reader.dtype(n).itemsize for n, s in shapes.items())
        have = _length(os.path.join(directory, DATA))
        if have != needed:
            return f"{have:,} bytes, but its index lists tensors of {needed:,}"
        for n, s in shapes.items():
            if len(s) == 1:
                reader.read(n)  # checks its CRC32C
    return None


# -- one file ---------------------------------------------------------------------------------


class _Retry(Exception):
    """A failure worth another try (dropped connection, timeout, short body, 5xx)."""


class _Unreachable(Exception):
    """The connection itself failed (DNS, refused, no route, connect timeout)."""


def _fetch(url: str, path: str, size: str, progress: bool, expected: tuple[int, bool]) -> int:
    """Downloads ``url`` to ``path`` via ``path.part``; returns the file's length.

    ``expected`` is ``(bytes, exact)``: an answer whose length differs from an exact size, or
    exceeds a limit, is refused before its body is read, and a body without a length is cut off
    past it; so is a web page (``Content-Type: text/html``)."""
    part = path + ".part"
    if os.path.exists(path) and not os.path.exists(part):
        os.replace(path, part)  # present but not recorded: resuming it checks it (module doc)
    host = urllib.parse.urlsplit(url).netloc
    stalls, reached, last_error = 0, False, ""
    with contextlib.ExitStack() as stack:
        bar = None  # opened at the first answer, so a failed connection prints no empty bar
        while True:
            before = _length(part) or 0
            try:
                response, total, have = _request(url, part, size)
                reached = True
                if response is not None:
                    _check_answer(response, total, expected, url, part)
                    if bar is None:
                        desc = f"{size}/{os.path.basename(path)}"
                        bar = stack.enter_context(
                            progress_bar(total, desc, unit="B", enabled=progress)
                        )
                    _restart_bar(bar, total, have)
                    _receive(response, part, have, bar, expected[0], url)
                have = _length(part) or 0
                if total is None or have == total:
                    os.replace(part, path)
                    return have
                last_error = f"got {have:,} of {total:,} bytes"
                if have > total:  # the server's answers disagree: start the file over
                    _discard(part)
            except _Unreachable as e:
                if not reached:
                    raise Gpt2JaxError(
                        f"cannot reach {host} ({e}): are you offline? "
                        "set GPT2JAX_BASE_URL (or --base-url) to a mirror"
                    ) from None
                last_error = str(e)
            except _Retry as e:
                reached = True
                last_error = str(e)
            stalls = 0 if (_length(part) or 0) > before else stalls + 1
            if stalls >= MAX_STALLS:
                raise Gpt2JaxError(
                    f"{url}: download failed after {MAX_STALLS} tries in a row without progress "
                    f"({last_error}); rerun to resume from {_length(part) or 0:,} bytes"
                )
            time.sleep(RETRY_DELAY_S * stalls)


def _request(
    url: str, part: str, size: str
) -> tuple[http.client.HTTPResponse | None, int | None, int]:
    """One GET that resumes ``part``: ``(response, file length, offset it starts at)``.

    The length is None when the server does not say; the response is None when ``part`` turns
    out to be whole already (a 416 whose length equals it).
    """
    have = _length(part) or 0
    headers = {"Accept-Encoding": "identity", "User-Agent": "gpt2jax"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S
        )
    except urllib.error.HTTPError as e:
        with e:
            return None, _http_error(e, url, part, have, size), have
    except urllib.error.URLError as e:  # raised while connecting: the host was not reached
        raise _Unreachable(_reason(e.reason)) from None
    except (OSError, http.client.HTTPException) as e:  # connected, then no proper answer
        raise _Retry(f"no answer: {_reason(e)}") from None
    if response.status == 206:
        start, total = _content_range(response.headers.get("Content-Range", ""))
        if start != have:  # not the part we asked for: start the file over
            response.close()
            _discard(part)
            raise _Retry(f"server resumed at byte {start}, not {have}")
        return response, total, have
    # 200: the whole file; a server that ignored Range sends it all again.
    length = response.headers.get("Content-Length")
    return response, int(length) if length and length.isdigit() else None, 0


def _check_answer(
    response: http.client.HTTPResponse,
    total: int | None,
    expected: tuple[int, bool],
    url: str,
    part: str,
) -> None:
    """Refuses, before reading the body, an answer that cannot be the file (module doc)."""
    limit, exact = expected
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    problem = None
    if kind == "text/html":
        problem = "the server answered with a web page (Content-Type: text/html), not the file"
    elif total is not None and exact and total != limit:
        problem = f"the server says {total:,} bytes, the file has {limit:,}"
    elif total is not None and total > limit:
        problem = f"the server says {total:,} bytes, more than this file can have ({limit:,})"
    if problem:
        response.close()
        _discard(part)
        raise Gpt2JaxError(f"{url}: {problem}; nothing was kept")


def _receive(
    response: http.client.HTTPResponse,
    part: str,
    have: int,
    bar: tqdm,
    limit: int,
    url: str,
) -> None:
    """Writes the body to ``part`` from byte ``have`` on; what arrives is kept on failure. A
    body that runs past ``limit`` bytes (a server sending no length) is cut off and refused."""
    with response, open(part, "ab" if have else "wb") as f:
        try:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
                if f.tell() > limit:
                    f.close()
                    _discard(part)
                    raise Gpt2JaxError(
                        f"{url}: the server sent more than the {limit:,} bytes this file can "
                        "have; nothing was kept"
                    )
        except (OSError, http.client.HTTPException) as e:  # dropped, reset or timed out
            raise _Retry(f"connection lost: {_reason(e)}") from None


def _http_error(e: urllib.error.HTTPError, url: str, part: str, have: int, size: str) -> int:
    if e.code == 416:  # Range not satisfiable: .part is as long as the file, or longer
        total = _unsatisfied_length(e.headers.get("Content-Range", ""))
        if total is not None and total == have:
            return total  # already whole (e.g. killed between the last byte and the rename)
        _discard(part)
        raise _Retry(f"HTTP 416 for bytes {have}- (file is {total} bytes): starting over")
    if e.code == 404:
        raise Gpt2JaxError(f"{url}: not found (404); is {size} a valid size on this server?")
    if e.code in (408, 429) or e.code >= 500:
        raise _Retry(f"HTTP {e.code} {e.reason}")
    raise Gpt2JaxError(f"{url}: HTTP {e.code} {e.reason}")


def _content_range(value: str) -> tuple[int | None, int | None]:
    """``(start, total)`` of ``bytes START-END/TOTAL`` (RFC 9110 14.4); None where absent."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not m:
        return None, None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _unsatisfied_length(value: str) -> int | None:
    """TOTAL of a 416's ``bytes */TOTAL``, or None."""
    m = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", value)
    return int(m.group(1)) if m else None


def _reason(e: object) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _restart_bar(bar: tqdm, total: int | None, have: int) -> None:
    """Points the bar at a (re)started transfer so its speed counts only new bytes."""
    bar.reset(total=total)
    bar.n = bar.last_print_n = bar.initial = have


def _discard(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _length(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


# -- the manifest -----------------------------------------------------------------------------


def _read_manifest(directory: str) -> dict:
    """The manifest of ``directory``; an empty one if it is missing or unreadable."""
    try:
        data = json.loads(read_bytes(os.path.join(directory, MANIFEST), 1 << 20))
        files = data["files"]
        if isinstance(files, dict) and all(isinstance(v, int) for v in files.values()):
            return {"base_url": data.get("base_url"), "files": files}
    except (OSError, ValueError, KeyError, TypeError, Gpt2JaxError):
        pass  # not there or damaged: every file is then checked against the server
    return {"base_url": None, "files": {}}


def _write_manifest(directory: str, manifest: dict) -> None:
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(directory, MANIFEST))
