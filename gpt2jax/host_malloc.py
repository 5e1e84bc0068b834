"""glibc's malloc under XLA's CPU runtime: transparent huge pages, and giving freed memory back.

On the CPU, XLA maps a fresh scratch buffer for every execution of a training step, and the
kernel faults it in 4 KiB at a time. ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc 2.35+)
makes malloc ask for transparent huge pages on its mappings, which removes nearly all of those
faults (``BENCHMARKS.md``). glibc reads tunables only when a process starts, so the command executes
itself again with the variable added, before it has imported JAX or read anything. Nothing is
done where it would not help (not glibc, too old, transparent huge pages off or already on for
every mapping), when Python code calls :func:`gpt2jax.cli.main.main`, or when the user's
``GLIBC_TUNABLES`` already sets ``glibc.malloc.hugetlb`` (``=0`` opts out). The run log's device
line says when the tunable is on. The other setting, :func:`return_freed_memory`, is for runs
held to a memory budget: it trades page faults for a lower peak.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

HUGETLB = "glibc.malloc.hugetlb"
#: How the run log says the tunable is on (``finetune``'s device line, on a CPU).
HUGE_PAGES_NOTE = f"host malloc: transparent huge pages ({HUGETLB}=1)"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def tuned_environment(
    environ: Mapping[str, str], *, libc: str | None, thp_mode: str | None
) -> dict[str, str] | None:
    """The environment to restart with, or None when a restart would change nothing.

    ``libc``: ``os.confstr("CS_GNU_LIBC_VERSION")``, e.g. ``"glibc 2.36"`` (None elsewhere);
    ``thp_mode``: the contents of :data:`THP_MODE`, e.g. ``"always [madvise] never"``.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if HUGETLB in tunables:
        return None  # the user chose
    name, _, version = (libc or "").partition(" ")
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or (major, minor) < (2, 35):  # the tunable is new in glibc 2.35
        return None
    if "[madvise]" not in (thp_mode or ""):  # "[always]": already huge; "[never]": none to get
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{HUGETLB}=1")))}


def host_environment() -> dict[str, str] | None:
    """:func:`tuned_environment` for this process and machine (None: nothing to change)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        libc = None
    try:
        with open(THP_MODE, encoding="ascii") as f:
            thp_mode = f.read()
    except OSError:
        thp_mode = None
    return tuned_environment(os.environ, libc=libc, thp_mode=thp_mode)


def restart_with_huge_pages() -> None:
    """Executes this process's command line again in :func:`host_environment` (it does not
    return then); returns at once where there is nothing to change."""
    env = host_environment()
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def huge_pages_on() -> bool:
    """Whether this process runs with the tunable on (after a restart, or set by the user)."""
    return f"{HUGETLB}=1" in os.environ.get("GLIBC_TUNABLES", "")


def return_freed_memory() -> None:
    """Under glibc, makes every allocation of 1 MiB or more its own mapping, returned to the
    system when freed (by default glibc raises that threshold as big buffers are freed and
    keeps what is freed below it resident). ``finetune --memory`` runs with it
    (``gpt2jax.train.loop.fit_host_malloc``); the cost is a page fault per page of every new
    buffer, each step (both measured in BENCHMARKS.md)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, so it no longer grows
    libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD: give back free heap tops above 1 MiB
