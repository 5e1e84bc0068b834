"""``gpt2jax download`` against a local HTTP server on 127.0.0.1 that injects faults.

The server serves the committed tiny OpenAI checkpoint (tests/fixtures/openai_tiny, real files)
under the size name ``124M``, so a downloaded directory also loads with ``gpt2jax.load``. It
logs every request (method, path, Range header, status) and follows a per-file plan of faults:
drop the connection midway, send fewer bytes than its Content-Length, ignore Range, stall past
the client's timeout, answer 500. In ``portal`` mode it answers every URL with the same web page
(a captive portal), as ``text/html`` or disguised as ``application/octet-stream``; in
``no_length`` mode it streams the files it is told to without a Content-Length, endlessly.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import gpt2jax
from conftest import FIXTURES
from gpt2jax.cli.main import main
from gpt2jax.convert.mapping import flatten
from gpt2jax.errors import CheckpointError, ConfigError, Gpt2JaxError
from gpt2jax.store import download as dl
from gpt2jax.store.model_dir import detect
from gpt2jax.store.sizes import resolve_model

TINY_DIR = FIXTURES / "openai_tiny"
DATA = "model.ckpt.data-00000-of-00001"  # the big file (2.4 MB): where faults are injected
SHORT_BY = 1000  # bytes the "short" fault leaves out of every body


class FakeServer:
    """``{url path: bytes}`` over HTTP/1.1 with a request log and a fault plan per path."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.mode: str | None = None  # "portal", "portal_disguised" or "no_length"
        self.endless: set[str] = set()  # no_length: the paths streamed without end
        self.sent = 0  # bytes of endless bodies sent
        self.plans: dict[str, list[str]] = {}  # path -> faults, one per GET, in order
        self.log: list[tuple[str, str, str | None, int]] = []  # method, path, Range, status
        self.stop = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/models"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def fault(self, path: str) -> str | None:
        plan = self.plans.get(path)
        return plan.pop(0) if plan else None

    def requests_for(self, name: str) -> list[tuple[str, str, str | None, int]]:
        return [r for r in self.log if r[1].endswith("/" + name)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # bodies are delimited by Content-Length, as on a real server

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, headers: dict[str, str], body: bytes, send: int) -> None:
        self.server.fake.log.append((self.command, self.path, self.headers.get("Range"), status))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD":
            self.wfile.write(body[:send])  # send < len(body): the connection then just closes

    def _portal(self, disguised: bool) -> None:
        page = b"<!DOCTYPE html><html><body>Sign in to the hotel Wi-Fi</body></html>"
        kind = "application/octet-stream" if disguised else "text/html; charset=utf-8"
        self._reply(200, {"Content-Type": kind}, page, len(page))

    def _endless(self) -> None:
        self.server.fake.log.append((self.command, self.path, self.headers.get("Range"), 200))
        self.send_response(200)
        self.send_header("Connection", "close")  # no Content-Length: the body ends at close
        self.end_headers()
        self.close_connection = True
        chunk = b"\0" * 65536
        try:
            while self.server.fake.sent < 1 << 30 and not self.server.fake.stop.is_set():
                self.wfile.write(chunk)
                self.server.fake.sent += len(chunk)
        except OSError:  # the client hung up
            pass

    def do_GET(self) -> None:
        fake: FakeServer = self.server.fake
        if fake.mode in ("portal", "portal_disguised"):
            return self._portal(fake.mode == "portal_disguised")
        if fake.mode == "no_length" and self.path in fake.endless:
            return self._endless()
        data = fake.files.get(self.path)
        if data is None:
            return self._reply(404, {}, b"not found", 9)
        fault = fake.fault(self.path)
        if fault == "500":
            return self._reply(500, {}, b"oops", 4)
        start, status, headers = 0, 200, {}
        rng = self.headers.get("Range")
        if rng and fault != "ignore_range":
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                return self._reply(416, {"Content-Range": f"bytes */{len(data)}"}, b"", 0)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if fault == "drop":
            self._reply(status, headers, body, len(body) // 2)
        elif fault == "short":
            self._reply(status, headers, body, max(0, len(body) - SHORT_BY))
        elif fault == "stall":
            self._reply(status, headers, body, len(body) // 2)
            self.wfile.flush()
            fake.stop.wait(3.0)  # far past the client's timeout; ends early at teardown
        else:
            self._reply(status, headers, body, len(body))

    do_HEAD = do_GET


def _fixture_files() -> dict[str, bytes]:
    return {f"/models/124M/{name}": (TINY_DIR / name).read_bytes() for name in dl.FILES}


@pytest.fixture
def server():
    fake = FakeServer(_fixture_files())
    fake.thread.start()
    yield fake
    fake.stop.set()
    fake.httpd.shutdown()
    fake.httpd.server_close()


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0.0)
    monkeypatch.delenv("GPT2JAX_BASE_URL", raising=False)


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was just bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/models"


def _assert_same_files(directory: Path) -> None:
    for name in dl.FILES:
        assert (directory / name).read_bytes() == (TINY_DIR / name).read_bytes(), name
    assert not list(directory.glob("*.part"))


# -- download -------------------------------------------------------------------------------


def test_complete_download_then_no_requests(server, tmp_path):
    [directory] = dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    assert directory == str(tmp_path / "124M")
    _assert_same_files(tmp_path / "124M")
    assert sorted(r[1].rsplit("/", 1)[1] for r in server.log) == sorted(dl.FILES)
    assert all(r[0] == "GET" and r[2] is None and r[3] == 200 for r in server.log)
    assert dl.is_complete(directory)

    # An already-complete directory: recognised from the manifest, not a single request.
    server.log.clear()
    server.files.clear()  # even a server that lost everything would not be asked
    assert dl.download(["124M"], dest=tmp_path, base_url=server.base_url, progress=False) == [
        directory
    ]
    assert server.log == []


def test_only_missing_or_changed_files_are_fetched(server, tmp_path):
    dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    (tmp_path / "124M" / "vocab.bpe").unlink()
    (tmp_path / "124M" / "hparams.json").write_text("{}")  # not the length the manifest holds
    server.log.clear()
    dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    # Both fetched whole: a file changed since it was complete is not trusted for a resume.
    assert [(r[1].rsplit("/", 1)[1], r[2]) for r in server.log] == [
        ("hparams.json", None),
        ("vocab.bpe", None),
    ]
    _assert_same_files(tmp_path / "124M")
    assert dl.is_complete(tmp_path / "124M")


def test_resume_after_the_connection_drops_midway(server, tmp_path, capsys):
    server.plans[f"/models/124M/{DATA}"] = ["drop"]
    dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=True)
    _assert_same_files(tmp_path / "124M")
    first, second = server.requests_for(DATA)
    size = len((TINY_DIR / DATA).read_bytes())
    assert first[2:] == (None, 200)
    assert second[2:] == (f"bytes={size // 2}-", 206)  # only the missing half is fetched again
    assert f"124M/{DATA}" in capsys.readouterr().err  # the progress bar names the file


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    server.plans[f"/models/124M/{DATA}"] = ["drop", "ignore_range"]
    dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    _assert_same_files(tmp_path / "124M")
    first, second = server.requests_for(DATA)
    assert second[2] is not None and second[3] == 200  # asked for a range, got the whole file


def test_partial_file_left_by_a_killed_run_is_resumed(server, tmp_path):
    directory = tmp_path / "124M"
    directory.mkdir()
    data = (TINY_DIR / DATA).read_bytes()
    (directory / (DATA + ".part")).write_bytes(data[:12345])
    dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    _assert_same_files(directory)
    [(_, _, rng, status)] = server.requests_for(DATA)
    assert (rng, status) == ("bytes=12345-", 206)


def test_stalled_connection_times_out_and_resumes(server, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "TIMEOUT_S", 0.3)
    server.plans[f"/models/124M/{DATA}"] = ["stall"]
    dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    _assert_same_files(tmp_path / "124M")
    assert [r[3] for r in server.requests_for(DATA)] == [200, 206]


def test_server_error_is_retried(server, tmp_path):
    server.plans["/models/124M/hparams.json"] = ["500", "500"]
    dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    _assert_same_files(tmp_path / "124M")
    assert [r[3] for r in server.requests_for("hparams.json")] == [500, 500, 200]


def test_short_file_fails_clearly_after_bounded_retries_then_resumes(server, tmp_path):
    server.plans[f"/models/124M/{DATA}"] = ["short"] * 100
    with pytest.raises(Gpt2JaxError, match=r"after 5 tries in a row without progress") as e:
        dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    message = str(e.value)
    assert "\n" not in message and DATA in message
    size = len((TINY_DIR / DATA).read_bytes())
    assert f"got {size - SHORT_BY:,} of {size:,} bytes" in message
    # The first try got all but SHORT_BY bytes; then MAX_STALLS tries added nothing.
    assert len(server.requests_for(DATA)) == 1 + dl.MAX_STALLS
    assert not (tmp_path / "124M" / DATA).exists()  # never renamed into place while short
    assert not dl.is_complete(tmp_path / "124M")

    server.plans.clear()
    server.log.clear()
    dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    _assert_same_files(tmp_path / "124M")
    # The data file's missing tail, nothing more; then the files after it, never fetched so far.
    assert [r[2] for r in server.requests_for(DATA)] == [f"bytes={size - SHORT_BY}-"]
    assert len(server.log) == 1 + len(dl.FILES) - 1 - dl.FILES.index(DATA)


def test_unrecorded_complete_files_cost_no_bytes(server, tmp_path):
    directory = tmp_path / "124M"
    directory.mkdir()
    for name in dl.FILES:  # e.g. fetched by OpenAI's own download_model.py
        (directory / name).write_bytes((TINY_DIR / name).read_bytes())
    dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    _assert_same_files(directory)
    assert len(server.log) == len(dl.FILES)
    assert all(r[2] is not None and r[3] == 416 for r in server.log)
    assert dl.is_complete(directory)


def test_404_names_the_url_and_size(server, tmp_path):
    with pytest.raises(Gpt2JaxError) as e:
        dl.download("355M", dest=tmp_path, base_url=server.base_url, progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert f"{server.base_url}/355M/checkpoint: not found (404)" in message
    assert "355M" in message.split("404")[1]
    assert len(server.log) == 1  # a 404 is not retried


def test_offline_is_one_clear_line(closed_port_url, tmp_path):
    with pytest.raises(Gpt2JaxError) as e:
        dl.download("124M", dest=tmp_path, base_url=closed_port_url, progress=False)
    message = str(e.value)
    assert "\n" not in message
    host = urllib.parse.urlsplit(closed_port_url).netloc
    assert message.startswith(f"cannot reach {host} (")
    assert "are you offline? set GPT2JAX_BASE_URL" in message


@pytest.mark.parametrize("size", ["13B", "../124M", "124m", ""])
def test_invalid_size_is_refused_before_any_request(server, tmp_path, size):
    with pytest.raises(ConfigError, match="unknown model size"):
        dl.download(["124M", size], dest=tmp_path, base_url=server.base_url, progress=False)
    assert server.log == [] and list(tmp_path.iterdir()) == []


def test_base_url_and_cache_from_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2JAX_BASE_URL", server.base_url + "/")
    monkeypatch.setenv("GPT2JAX_CACHE", str(tmp_path / "cache"))
    assert dl.models_root() == str(tmp_path / "cache" / "models")
    [directory] = dl.download("124M", progress=False)
    assert directory == str(tmp_path / "cache" / "models" / "124M")
    _assert_same_files(Path(directory))
    assert server.log[0][1] == "/models/124M/checkpoint"  # the trailing "/" is not doubled


def _nothing_recorded(directory: Path) -> None:
    manifest = directory / dl.MANIFEST
    assert not manifest.exists() or json.loads(manifest.read_text())["files"] == {}
    assert not dl.is_complete(directory)
    assert sorted(p.name for p in directory.iterdir() if p.name != dl.MANIFEST) == []


@pytest.mark.parametrize("mode", ["portal", "portal_disguised"])
def test_captive_portal_is_refused_and_a_good_mirror_then_completes(server, tmp_path, mode):
    """A server answering every URL with a web page: refused at the first file (from its
    Content-Type, or from its bytes when it claims to be a binary file), nothing recorded; the
    next download from a real mirror fetches everything."""
    portal = FakeServer({})
    portal.mode = mode
    portal.thread.start()
    try:
        with pytest.raises(Gpt2JaxError) as e:
            dl.download("124M", dest=tmp_path, base_url=portal.base_url, progress=False)
    finally:
        portal.stop.set()
        portal.httpd.shutdown()
        portal.httpd.server_close()
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{portal.base_url}/124M/checkpoint: ")
    assert ("web page (Content-Type: text/html)" if mode == "portal" else "web page (HTML)") in (
        message
    )
    assert len(portal.log) == 1  # not retried, nothing more asked
    _nothing_recorded(tmp_path / "124M")
    dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    _assert_same_files(tmp_path / "124M")
    assert dl.is_complete(tmp_path / "124M")


def test_a_recorded_web_page_is_fetched_again(server, tmp_path):
    """A directory an older gpt2jax recorded as complete although it held a portal's pages:
    not complete, and the next download replaces every page."""
    directory = tmp_path / "124M"
    directory.mkdir()
    page = b"<html><body>portal</body></html>"
    for name in dl.FILES:
        (directory / name).write_bytes(page)
    manifest = {"base_url": "http://portal", "files": {n: len(page) for n in dl.FILES}}
    (directory / dl.MANIFEST).write_text(json.dumps(manifest))
    assert not dl.is_complete(directory)
    dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    _assert_same_files(directory)
    assert sorted(r[1].rsplit("/", 1)[1] for r in server.log) == sorted(dl.FILES)


@pytest.mark.parametrize("endless", ["checkpoint", DATA])
def test_a_body_without_content_length_is_cut_off_at_the_files_size(server, tmp_path, endless):
    """Without a Content-Length the body ends when the server closes: one that never does is
    cut off just past the most the file can have (the data file: exactly what hparams.json and
    the index imply), refused, nothing recorded for it; a good mirror then completes it."""
    server.mode = "no_length"
    server.endless = {f"/models/124M/{endless}"}
    with pytest.raises(Gpt2JaxError) as e:
        dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    message = str(e.value)
    limit = len((TINY_DIR / DATA).read_bytes()) if endless == DATA else dl.MAX_BYTES[endless]
    assert "\n" not in message and f"/124M/{endless}: the server sent more than the" in message
    assert f"{limit:,} bytes this file can have" in message
    assert server.sent < limit + (64 << 20)  # soon after the limit (socket buffers hold MBs)
    assert not (tmp_path / "124M" / endless).exists()
    manifest = tmp_path / "124M" / dl.MANIFEST
    assert not manifest.exists() or endless not in json.loads(manifest.read_text())["files"]
    assert not dl.is_complete(tmp_path / "124M")
    server.mode = None
    dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    _assert_same_files(tmp_path / "124M")


def test_a_content_length_other_than_the_files_is_refused_before_the_body(server, tmp_path):
    served = _fixture_files()
    served["/models/124M/vocab.bpe"] = b"#version: 0.2\na b\n"  # 17 bytes, not OpenAI's file
    server.files.update(served)
    with pytest.raises(Gpt2JaxError, match=r"vocab.bpe: the server says 18 bytes, the file has "
                                           r"456,318; nothing was kept"):  # fmt: skip
        dl.download("124M", dest=tmp_path, base_url=server.base_url, progress=False)
    assert not (tmp_path / "124M" / "vocab.bpe").exists()


def test_an_index_and_data_pair_that_is_not_the_model_is_refused(server, tmp_path):
    """A data file of the right length whose index lists other tensors: the pair is checked
    against hparams.json before either is recorded, and both are removed."""
    from gpt2jax.formats.tf_bundle import write_bundle

    size = len(server.files[f"/models/124M/{DATA}"])
    other = tmp_path / "other"
    other.mkdir()
    write_bundle(other / "model.ckpt", {"a": np.zeros(size // 4, np.float32)})
    server.files["/models/124M/model.ckpt.index"] = (other / "model.ckpt.index").read_bytes()
    server.files[f"/models/124M/{DATA}"] = (other / DATA).read_bytes()
    with pytest.raises(Gpt2JaxError, match=r"does not match a GPT-2") as e:
        dl.download("124M", dest=tmp_path / "m", base_url=server.base_url, progress=False)
    directory = tmp_path / "m" / "124M"
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{server.base_url}/124M/{DATA}")
    recorded = json.loads((directory / dl.MANIFEST).read_text())["files"]
    assert "model.ckpt.index" not in recorded and DATA not in recorded
    assert not (directory / DATA).exists() and not (directory / "model.ckpt.index").exists()


def test_bad_base_url(tmp_path):
    with pytest.raises(ConfigError, match="expected http"):
        dl.download("124M", dest=tmp_path, base_url="ftp://example/x", progress=False)


# -- size names work wherever a model path does ----------------------------------------------


@pytest.fixture
def cache(server, tmp_path, monkeypatch):
    """An empty download cache and a mirror serving the tiny checkpoint as "124M"."""
    monkeypatch.setenv("GPT2JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPT2JAX_BASE_URL", server.base_url)
    monkeypatch.chdir(tmp_path)  # no ./124M here
    return tmp_path / "cache" / "models"


def test_load_by_size_downloads_once(server, cache, capsys):
    model = gpt2jax.load("124M")
    assert model.path == str(cache / "124M") and model.kind == "openai"
    assert "downloading 124M" in capsys.readouterr().err
    assert len(server.log) == len(dl.FILES)
    # Honest: it is the served files that were loaded (tiny, not the 124M preset's shape).
    reference = gpt2jax.load(TINY_DIR)
    assert model.config == reference.config != gpt2jax.get_preset("124M")
    for (name, a), (_, b) in zip(
        sorted(flatten(model.params).items()),
        sorted(flatten(reference.params).items()),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b, err_msg=name)

    server.log.clear()
    assert resolve_model("124M") == str(cache / "124M")
    assert server.log == []  # cached: no request


def test_existing_path_wins_and_unknown_names_fail(server, cache, tmp_path):
    local = tmp_path / "124M"
    local.mkdir()
    assert resolve_model("124M") == "124M"  # a folder of that name in the cwd
    assert resolve_model(TINY_DIR) == str(TINY_DIR)
    with pytest.raises(CheckpointError, match=r"no-such-model: no such file .*124M, 355M"):
        resolve_model("no-such-model")
    assert server.log == []


def test_cli_download_convert_then_size_name_offline(server, cache, capsys):
    args = ["download", "124M", "--dir", str(cache), "--base-url", server.base_url, "--convert"]
    assert main(args) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(cache / "124M"), str(cache / "124M-gpt2jax")]
    assert detect(cache / "124M-gpt2jax") == "gpt2jax"

    # The converted directory is preferred, and nothing needs the network any more.
    server.log.clear()
    assert resolve_model("124M") == str(cache / "124M-gpt2jax")
    assert main(["info", "124M", "--json"]) == 0
    assert str(cache / "124M-gpt2jax") in capsys.readouterr().out
    assert server.log == []


def test_cli_offline_error(closed_port_url, tmp_path, capsys):
    assert main(["download", "124M", "--dir", str(tmp_path), "--base-url", closed_port_url]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("gpt2jax download: error: cannot reach 127.0.0.1")
