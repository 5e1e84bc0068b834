"""Run one fuzz target over generated inputs and classify every outcome.

Shared by ``tests/test_fuzz.py`` (a few hundred inputs per target, fails on the first crash and
lets Hypothesis shrink it) and ``scripts/fuzz_readers.py`` (thousands of inputs, counts
everything and prints a table). An input ends in exactly one of:

* ``accepted``: the reader read everything and handed back well-formed arrays/configs;
* ``clean``: the reader refused it with a :class:`~gpt2jax.errors.Gpt2JaxError` whose message is
  one line naming the file (the only failure the project allows);
* ``crash``: any other exception -- ``IndexError``, ``struct.error``, ``MemoryError``, a numpy
  error -- or a project error with a multi-line message or one that does not name the file;
* ``hang``: the input ran past the per-input deadline.

Each input runs under a SIGALRM deadline (which interrupts a Python-level infinite loop, unlike
Hypothesis's own ``deadline`` that only measures afterwards) and, on Linux, under a soft
``RLIMIT_AS`` of the current address space plus a budget: a reader that believes a hostile size
field and allocates terabytes (or just gigabytes, lazily) gets a ``MemoryError`` there, which
is a crash, instead of taking the machine down.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gpt2jax.errors import Gpt2JaxError

#: Address space one input may add, on top of what the process already maps.
MEMORY_BUDGET = 1 << 30
#: Seconds one input may run before it counts as a hang (the readers take milliseconds).
DEADLINE_S = 10.0


class Hang(BaseException):
    """Raised by SIGALRM when an input runs past its deadline.

    A BaseException, so a reader's ``except Exception`` cannot swallow it.
    """


class BadMessage(AssertionError):
    """A project error whose message is not one line naming the file."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A reader under fuzz.

    ``prepare(case, workdir)`` writes the generated ``case``'s files into ``workdir`` (a fresh
    directory per input) and returns what to read; it runs unguarded, so an exception there is
    a bug of the fuzzer, not of the reader. ``read(prepared, workdir)`` runs the reader and
    checks what it hands back; it returns ``"accepted"``, or ``"clean"`` when it refused some
    part with an error it checked with :func:`check_clean`. A ``Gpt2JaxError`` it lets through
    is checked by the harness; any other exception is a crash.
    """

    name: str
    strategy: st.SearchStrategy
    prepare: Callable[[Any, str], Any]
    read: Callable[[Any, str], str]
    #: Inputs per target in the default (quick) test run.
    quick_examples: int
    #: What every error message must contain; None: the input's directory (its file paths).
    describes: str | None = None


_counter = itertools.count()


def fresh_path(workdir: str, stem: str) -> str:
    """A new path in ``workdir`` (a fresh file per input: rewriting one in place is slow)."""
    return os.path.join(workdir, f"{stem}{next(_counter)}")


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def check_clean(error: Gpt2JaxError, names: str) -> None:
    """A project error is clean if its message is one line that mentions ``names``."""
    message = str(error)
    if "\n" in message or "\r" in message:
        raise BadMessage(f"multi-line message: {message[:500]!r}") from error
    if names not in message:
        raise BadMessage(f"message does not name the file ({names}): {message[:500]!r}") from error


def _address_space() -> int:
    """The process's current virtual size in bytes (Linux), or 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


@contextlib.contextmanager
def guarded(deadline_s: float = DEADLINE_S, budget: int = MEMORY_BUDGET) -> Iterator[None]:
    """Runs the block under a SIGALRM deadline and, on Linux, a soft address-space limit."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"ran past the {deadline_s:g} s deadline")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_limit = None
    base = _address_space() if sys.platform.startswith("linux") else 0
    if base:
        old_limit = resource.getrlimit(resource.RLIMIT_AS)
        hard = old_limit[1]
        soft = base + budget if hard == resource.RLIM_INFINITY else min(base + budget, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    signal.setitimer(signal.ITIMER_REAL, deadline_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)


@dataclasses.dataclass
class Stats:
    """What happened to a target's inputs (the script's table row)."""

    target: str
    tried: int = 0
    clean: int = 0
    accepted: int = 0
    crashes: int = 0
    hangs: int = 0
    slowest_s: float = 0.0
    rss_growth_mib: float = 0.0
    #: The first few crash/hang reports: the case's repr and the traceback.
    reports: list[str] = dataclasses.field(default_factory=list)
    #: Crashes by kind: the exception type and the line that raised it.
    kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def run_one(
    target: Target, case: Any, workdir: str, deadline_s: float = DEADLINE_S
) -> tuple[str, BaseException | None, float]:
    """``(outcome, exception or None, seconds)`` of feeding ``case`` to ``target``."""
    exdir = tempfile.mkdtemp(dir=workdir)
    try:
        prepared = target.prepare(case, exdir)
        start = time.perf_counter()
        try:
            with guarded(deadline_s):
                outcome = target.read(prepared, exdir)
        except Hang as e:
            return "hang", e, time.perf_counter() - start
        except Gpt2JaxError as e:
            try:
                check_clean(e, target.describes or exdir)
            except BadMessage as bad:
                return "crash", bad, time.perf_counter() - start
            return "clean", None, time.perf_counter() - start
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - every other exception is what we hunt
            return "crash", e, time.perf_counter() - start
        return outcome, None, time.perf_counter() - start
    finally:
        shutil.rmtree(exdir, ignore_errors=True)


def _kind(error: BaseException) -> str:
    """``ExceptionType at file:line`` of the innermost frame: one entry per distinct bug."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{where}"


def _max_rss_mib() -> float:
    """Peak resident set of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def fuzz(
    target: Target,
    examples: int,
    workdir: str,
    *,
    fail_fast: bool,
    max_reports: int = 3,
) -> Stats:
    """Feeds ``examples`` generated inputs to ``target``.

    With ``fail_fast`` (the tests) the first crash or hang is raised, so Hypothesis shrinks it
    and prints the smallest failing case; otherwise (the script) every input runs and the
    crashes are counted, with the first ``max_reports`` kept.
    """
    stats = Stats(target.name)
    rss_before = _max_rss_mib()

    @settings(
        max_examples=examples,
        database=None,
        deadline=None,  # guarded() enforces a real, interrupting deadline instead
        print_blob=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink] if fail_fast else [Phase.generate],
    )
    @given(case=target.strategy)
    def feed(case: Any) -> None:
        outcome, error, seconds = run_one(target, case, workdir)
        stats.tried += 1
        stats.slowest_s = max(stats.slowest_s, seconds)
        if outcome in ("crash", "hang"):
            if fail_fast:
                raise AssertionError(
                    f"{target.name}: {outcome} on this input: {type(error).__name__}: {error}"
                ) from error
            if outcome == "crash":
                stats.crashes += 1
            else:
                stats.hangs += 1
            stats.kinds[_kind(error)] += 1
            if len(stats.reports) < max_reports:
                tb = "".join(traceback.format_exception(error))
                stats.reports.append(f"{outcome}: case={case!r:.2000}\n{tb}")
        elif outcome == "clean":
            stats.clean += 1
        else:
            stats.accepted += 1

    feed()
    stats.rss_growth_mib = max(0.0, _max_rss_mib() - rss_before)
    return stats
