"""Fuzz every reader of untrusted files with N generated inputs each, and print the table.

Runs the targets of ``tests/fuzzing/`` (the ones ``tests/test_fuzz.py`` runs a few hundred
inputs of) outside pytest, counting instead of stopping at the first crash:

    target  inputs  clean errors  accepted  crashes  hangs  slowest  max RSS growth

A crash is any exception other than a one-line ``Gpt2JaxError`` naming the file (or a reader
handing back something malformed); a hang is an input that ran past the per-input deadline;
each input also runs under an address-space limit, so a reader that trusts a hostile size field
crashes with ``MemoryError`` instead of allocating it. Exits 1 if there was any crash or hang,
after printing the first few tracebacks.

    python scripts/fuzz_readers.py                       # 5000 inputs per target
    python scripts/fuzz_readers.py -n 300 --only tf_bundle safetensors
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from fuzzing.harness import DEADLINE_S, Stats, fuzz  # noqa: E402
from fuzzing.targets import TARGETS  # noqa: E402

COLUMNS = (
    "target",
    "inputs",
    "clean errors",
    "accepted",
    "crashes",
    "hangs",
    "slowest",
    "max RSS growth",
)


def row(s: Stats) -> tuple[str, ...]:
    return (
        s.target,
        str(s.tried),
        str(s.clean),
        str(s.accepted),
        str(s.crashes),
        str(s.hangs),
        f"{s.slowest_s:.2f} s",
        f"{s.rss_growth_mib:.0f} MiB",
    )


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--examples", type=int, default=5000, help="inputs per target")
    parser.add_argument("--only", nargs="+", choices=sorted(TARGETS), help="targets to run")
    args = parser.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="fuzz-readers-") as workdir:
        for name in args.only or list(TARGETS):
            start = time.perf_counter()
            # last resort if a reader hangs inside C code, where SIGALRM cannot interrupt it
            faulthandler.dump_traceback_later(args.examples * DEADLINE_S + 600, exit=True)
            stats = fuzz(TARGETS[name], args.examples, workdir, fail_fast=False)
            faulthandler.cancel_dump_traceback_later()
            results.append(stats)
            print(
                f"{name}: {stats.tried} inputs in {time.perf_counter() - start:.0f} s", flush=True
            )
    print()
    print(table([row(s) for s in results]))
    for s in results:
        for kind, count in s.kinds.most_common():
            print(f"{s.target}: {count} x {kind}")
    failures = [r for s in results for r in s.reports]
    for report in failures:
        print("\n" + report)
    return 1 if any(s.crashes or s.hangs for s in results) else 0


if __name__ == "__main__":
    sys.exit(main())
