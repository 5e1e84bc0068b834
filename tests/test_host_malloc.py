"""``gpt2jax finetune`` restarts itself with glibc's transparent-huge-page tunable where that
changes something (:mod:`gpt2jax.host_malloc`); the whole-run test checks the real command
(``tests/test_whole_run.py``)."""

from __future__ import annotations

import sys

import pytest

from gpt2jax import host_malloc
from gpt2jax.cli import main as cli_main

GLIBC = "glibc 2.36"
MADVISE = "always [madvise] never\n"


def test_the_tunable_is_added_where_glibc_and_the_kernel_take_it():
    env = host_malloc.tuned_environment({"PATH": "/bin"}, libc=GLIBC, thp_mode=MADVISE)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_the_users_other_tunables_are_kept():
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    env = host_malloc.tuned_environment(environ, libc="glibc 2.35", thp_mode=MADVISE)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert environ == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}  # not changed in place


@pytest.mark.parametrize(
    "environ, libc, thp_mode",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, MADVISE),  # the user opted out
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, GLIBC, MADVISE),  # already on: no loop
        ({}, "glibc 2.34", MADVISE),  # no such tunable before 2.35
        ({}, None, MADVISE),  # not glibc (musl, macOS)
        ({}, "glibc weird", MADVISE),
        ({}, GLIBC, "[always] madvise never"),  # every mapping gets huge pages already
        ({}, GLIBC, "always madvise [never]"),  # none to get
        ({}, GLIBC, None),  # no transparent huge pages in this kernel
    ],
)
def test_nothing_changes_where_the_tunable_would_not(environ, libc, thp_mode):
    assert host_malloc.tuned_environment(environ, libc=libc, thp_mode=thp_mode) is None


def test_the_restart_runs_the_same_command_line(monkeypatch):
    calls = []
    monkeypatch.setattr(host_malloc, "host_environment", lambda: {"GLIBC_TUNABLES": "x"})
    monkeypatch.setattr(host_malloc.os, "execve", lambda *a: calls.append(a))
    host_malloc.restart_with_huge_pages()
    assert calls == [(sys.executable, sys.orig_argv, {"GLIBC_TUNABLES": "x"})]


def test_main_called_from_python_never_restarts(monkeypatch):
    monkeypatch.setattr(host_malloc, "host_environment", lambda: {"GLIBC_TUNABLES": "x"})
    monkeypatch.setattr(host_malloc.os, "execve", lambda *a: pytest.fail("restarted"))
    # A finetune that fails at once on its arguments: the restart would come before.
    assert cli_main.main(["finetune", "missing-model", "--data", "missing.txt"]) == 1


FAULTS = """
import resource, sys
import numpy as np
if sys.argv[1] == "return":
    from gpt2jax.host_malloc import return_freed_memory
    return_freed_memory()
np.ones(1 << 20).sum()  # 8 MiB: glibc's adaptive threshold rises past it once it is freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(1 << 20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_always() -> bool:
    try:
        with open(host_malloc.THP_MODE, encoding="ascii") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_returning_freed_memory_costs_page_faults_that_the_default_spares():
    import os
    import subprocess

    if _thp_always():
        pytest.skip("every mapping takes huge pages here: a new buffer costs a few faults")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    run = lambda mode: subprocess.run(  # noqa: E731
        [sys.executable, "-c", FAULTS, mode], env=env, check=True, capture_output=True, text=True
    )
    faults = {mode: int(run(mode).stdout) for mode in ("return", "default")}
    # returned: every new 8 MiB buffer is a fresh mapping, faulted in again (10,320 vs 504 here)
    assert faults["default"] * 5 < faults["return"], faults


@pytest.mark.parametrize("memory", [None, "8GB"])
def test_only_runs_held_to_a_memory_budget_give_freed_memory_back(monkeypatch, memory):
    import jax

    from gpt2jax.train import loop

    if jax.default_backend() != "cpu":
        pytest.skip("host memory is tuned for CPU runs only")
    from gpt2jax.train.settings import TrainConfig

    calls = []
    monkeypatch.setattr(loop, "return_freed_memory", lambda: calls.append(1))
    loop.fit_host_malloc(TrainConfig(memory=memory))
    assert calls == ([1] if memory else [])
