"""Files a user hands us and files we write, handled so that nothing a user owns is lost.

Reading: small files (JSON, prompts, tokenizer files) are read only when they are regular
files, up to a size cap, opened without blocking, so that a FIFO, ``/dev/zero`` or a huge file
is one clear error at once instead of a hang or a ``MemoryError``. Writing: an output must not
be, contain or lie inside an input (:func:`check_destination`); what we create gets the modes
the user's umask gives (``mkdtemp``/``mkstemp`` make 0700/0600); temporary directories carry
their owner's pid and host, so a later run removes those whose owner is gone
(:func:`remove_stale_temps`); and :class:`WriterLock` keeps one writer per run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterable

from gpt2jax.errors import Gpt2JaxError

#: Top-level files that make a directory a model (or run) directory ``--force`` may replace.
MODEL_MARKERS = ("config.json", "hparams.json", "run.json", "model.ckpt.index")

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


def kind_of(mode: int) -> str:
    """``"a regular file"``, ``"a FIFO (named pipe)"``, ``"a character device"``, ..."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file")


def check_regular(path: str, error: type[Gpt2JaxError] = Gpt2JaxError) -> os.stat_result:
    """The stat of ``path`` when it is a regular file (symlinks followed); ``error`` naming what
    it is otherwise. A missing or unreadable path raises the ``OSError``."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is {kind_of(st.st_mode)}, not a regular file")
    return st


def open_regular(path: str, error: type[Gpt2JaxError] = Gpt2JaxError):
    """``open(path, "rb")`` for a regular file only: opened without blocking (a FIFO with no
    writer would block forever) and checked on the open descriptor, so nothing swapped in
    between the check and the open gets through. ``OSError`` for a missing or unreadable path."""
    check_regular(path, error)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: is {kind_of(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str, limit: int, error: type[Gpt2JaxError] = Gpt2JaxError) -> bytes:
    """The bytes of the regular file ``path``, refused (``error``) above ``limit`` bytes."""
    with open_regular(path, error) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{path}: larger than {limit:,} bytes, too large for this kind of file")
    return data


# -- outputs ------------------------------------------------------------------------------------


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _within(inner: str, outer: str) -> bool:
    return inner != outer and os.path.commonpath([inner, outer]) == outer


def check_not_overlapping(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None],
    reads: Iterable[str | os.PathLike | None] = (),
) -> None:
    """Refuses an output that is an input, contains one or lies inside one (symlinks resolved):
    writing it, with or without ``--force``, would destroy or change what is read. ``reads``
    are directories only a few named files are read from (a tokenizer's): an output may lie
    inside one, but not be or contain it."""
    out = os.fspath(out)
    real = _real(out)
    given_inputs = [(p, True) for p in inputs] + [(p, False) for p in reads]
    for given, whole in given_inputs:
        if given is None:
            continue
        source = _real(given)
        if real == source:
            relation = "is the input"
        elif _within(source, real):
            relation = "contains the input"
        elif whole and _within(real, source):
            relation = "is inside the input"
        else:
            continue
        raise Gpt2JaxError(
            f"{out}: {relation} {os.fspath(given)}; writing there would change or destroy it "
            "(choose an output outside every input)"
        )


def check_utf8_path(path: str | os.PathLike) -> None:
    """orbax and TensorStore take paths as UTF-8 strings: refuse another name before any work
    (it would otherwise fail at the first save, with a pybind11 error)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise Gpt2JaxError(
            f"{shown}: the path is not valid UTF-8, which the checkpoint writer (orbax) cannot "
            "use; choose a UTF-8 name"
        ) from None


def holds_model(path: str) -> bool:
    """Whether the directory ``path`` holds a model or run (one of :data:`MODEL_MARKERS`)."""
    return any(os.path.isfile(os.path.join(path, m)) for m in MODEL_MARKERS)


def check_destination(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    reads: Iterable[str | os.PathLike | None] = (),
    utf8: bool = False,
) -> None:
    """Whether a directory may be written at ``path``, before any work: not overlapping an
    input (:func:`check_not_overlapping`); new, empty, or (with ``overwrite``) a model
    directory, never anything else; with ``utf8``, a name orbax can use."""
    path = os.path.abspath(os.fspath(path))
    check_not_overlapping(path, inputs, reads)
    if utf8:
        check_utf8_path(path)
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        if not os.listdir(path):
            return
        if not overwrite:
            raise Gpt2JaxError(
                f"{path}: already exists and is not empty (use --force to replace it)"
            )
        if holds_model(path):
            return
        raise Gpt2JaxError(
            f"{path}: is not a model directory (no {', '.join(MODEL_MARKERS)}); --force "
            "replaces only a model directory: move its contents away or choose another output"
        )
    what = kind_of(os.lstat(path).st_mode)
    raise Gpt2JaxError(
        f"{path}: already exists and is {what}, not a directory"
        + ("; --force replaces only a model directory" if overwrite else "")
    )


def check_output_file(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> None:
    """Whether a file may be written at ``path`` (``--out``), before any work: not an input nor
    inside one; a new file, or an existing regular file with ``overwrite``; in a directory that
    exists and takes a new file (checked by creating one)."""
    path = os.path.abspath(os.fspath(path))
    check_not_overlapping(path, inputs)
    if os.path.lexists(path):
        st = os.stat(path) if os.path.exists(path) else os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise Gpt2JaxError(f"{path}: is {kind_of(st.st_mode)}, not a regular file")
        if not overwrite:
            raise Gpt2JaxError(f"{path}: already exists (use --force to replace it)")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise Gpt2JaxError(f"{path}: cannot be written (no directory {parent})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".gpt2jax-write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise Gpt2JaxError(f"{path}: cannot be written ({parent}: {e.strerror})") from None


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) under a temporary name beside ``path`` and renames it into place,
    with the user's umask's mode: ``path`` is never seen half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def umask() -> int:
    """This process's umask (read from ``/proc`` where possible: setting it to read it back
    would change it for every thread for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str) -> None:
    """Gives ``path`` (a file, or a directory and everything in it) the modes a plain
    ``open``/``mkdir`` would have given under the user's umask: 0666 / 0777 minus the umask."""
    mask = umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if not os.path.isdir(path) or os.path.islink(path):
        os.chmod(path, file_mode)
        return
    for root, _, names in os.walk(path):
        os.chmod(root, dir_mode)
        for name in names:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, file_mode)


# -- temporary directories and locks: owned by a pid on a host ----------------------------------


def host() -> str:
    """This machine's name, as stored in temporary names and lock files."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def is_alive(pid: int, ticks: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs (and, given ``ticks``, is the one that started
    then, not a later process that reused the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return False
    return ticks is None or _start_ticks(pid) in (None, ticks)


def temp_dir(parent: str, prefix: str) -> str:
    """A new directory ``parent/<prefix><pid>@<host>-<random>``, with the user's umask's mode."""
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}@{host()}-", dir=parent)
    os.chmod(path, 0o777 & ~umask())
    return path


def remove_stale_temps(parent: str, prefix: str) -> list[str]:
    """Removes ``parent/<prefix>*`` directories (made by :func:`temp_dir`) whose process, on
    this host, is gone: what a killed run left. Returns their paths."""
    import shutil

    pattern = re.compile(re.escape(prefix) + r"(\d+)@([A-Za-z0-9._-]+)-[A-Za-z0-9_]+$")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if not m or m.group(2) != host() or is_alive(int(m.group(1))):
            continue
        path = os.path.join(parent, name)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class WriterLock:
    """One writer at a time for ``target`` (a run directory): the lock file ``lock_path`` holds
    the writer's pid, host, start time and command. A lock whose process is gone (same host; a
    reused pid is told apart by its start time) is stale and taken over; a live one, or one from
    another host, refuses at once, naming its holder."""

    def __init__(self, target: str, lock_path: str) -> None:
        self.target, self.path = target, lock_path
        self.held = False
        self.took_over: dict | None = None  # the stale lock replaced, if any

    def _record(self) -> dict:
        import sys

        return {
            "pid": os.getpid(),
            "host": host(),
            "ticks": _start_ticks(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(["gpt2jax", *sys.argv[1:]])[:300],
        }

    def read(self) -> dict | None:
        """The holder's record, or None when there is no lock (or it is unreadable)."""
        try:
            data = json.loads(read_bytes(self.path, 1 << 16))
        except (OSError, ValueError, Gpt2JaxError):
            return None
        return data if isinstance(data, dict) else None

    def acquire(self) -> WriterLock:
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            holder = self.read()
            if holder is None and os.path.exists(self.path):
                # being written this instant (or torn): give its writer a moment
                time.sleep(0.2)
                holder = self.read() or {"pid": None, "host": host()}
            if holder is None:
                continue  # released meanwhile
            if self._stale(holder):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                self.took_over = holder
                continue
            raise Gpt2JaxError(self._busy(holder))
        raise Gpt2JaxError(f"{self.target}: cannot take the lock {self.path}")

    def _create(self) -> bool:
        """Writes the lock file only if none exists: the record goes into a private file that is
        then hard-linked into place (atomic, and never seen half-written)."""
        parent = os.path.dirname(self.path)
        fd, tmp = tempfile.mkstemp(prefix=".lock-", dir=parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
            os.chmod(tmp, 0o666 & ~umask())
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links
                try:
                    with open(self.path, "x") as f, open(tmp) as g:
                        f.write(g.read())
                    return True
                except FileExistsError:
                    return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _stale(self, holder: dict) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != host():
            return False  # another machine: cannot tell
        if not isinstance(pid, int) or pid <= 0:
            return True
        if pid == os.getpid():  # this process: stale only if an earlier one had the pid
            return holder.get("ticks") != _start_ticks(pid)
        return not is_alive(pid, holder.get("ticks"))

    def _busy(self, holder: dict) -> str:
        who = f"pid {holder.get('pid')} on {holder.get('host')}"
        since = f", since {holder['since']}" if holder.get("since") else ""
        command = f": {holder['command']}" if holder.get("command") else ""
        gone = (
            f"if that process is gone, delete {self.path}"
            if holder.get("host") != host()
            else "wait for it to end or stop it"
        )
        return f"{self.target}: in use by another gpt2jax process ({who}{since}{command}); {gone}"

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        mine = self.read()
        if mine and mine.get("pid") == os.getpid() and mine.get("host") == host():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
