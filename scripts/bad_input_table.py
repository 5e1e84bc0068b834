"""Run the bad-input corpus through the real CLI and print the table of cases and outcomes.

    python scripts/bad_input_table.py                       # every case; the table on stdout
    python scripts/bad_input_table.py --command convert info --json results.json

The corpus is ``tests/fixtures/bad_inputs`` (``scripts/make_bad_inputs.py`` writes it). Each
case is assembled in a temporary directory (its base directory, then its own files over it: a
``NAME.patch`` file is a JSON merge patch of the base's ``NAME``; ``remove`` lists base files to
delete; ``generate`` describes files too big to commit) and its command is run by
``gpt2jax.cli.main.main`` in this process, with file descriptors 1 and 2 redirected so that all
output is captured, from C libraries too. An exception escaping ``main`` is printed as Python would
print it (a traceback) and counts as exit code 1.

A case passes when: the exit code is non-zero (or 0 where ``expect.exit`` is 0: then stderr must
hold ``expect.phrase`` as a warning); stderr holds no traceback and exactly one error line, its
last line, ``gpt2jax CMD: error: ...``, at most 500 characters plus the paths it names, naming
``expect.file`` and saying ``expect.phrase``; and the destination (``{dst}``) does not exist and
its parent directory holds nothing new. Exit status 1 if any case fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fixtures" / "bad_inputs"
TINY = ROOT / "tests" / "fixtures" / "openai_tiny"
MAX_LINE = 500  # characters of an error line, besides the paths it names
PROGRESS = re.compile(r"^\S[^:]*: +\d+%\|")  # a tqdm bar: "converting:  50%|███ ..."


def load_manifest(corpus: Path = CORPUS) -> list[dict[str, Any]]:
    return json.loads((corpus / "manifest.json").read_text())


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, ``null`` deletes."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def generated_bytes(spec: dict[str, Any]) -> bytes:
    """The files too big to commit, made to size: deterministic, mostly English words."""
    n, kind = spec["bytes"], spec["kind"]
    words = (ROOT / "tests" / "fixtures" / "english.txt").read_text("utf-8").split()
    line = " ".join(words * (n // (6 * len(words)) + 1))[:n]
    if kind == "words":  # one line, no newline anywhere
        return line.encode() + b"\n"
    if kind == "jsonl_unterminated":  # one JSON record whose string never ends
        return b'{"text": "' + line.encode()
    if kind == "csv_columns":  # one header line of many columns, none called "text"
        columns, size = [], 0
        while size < n:
            columns.append(f"column{len(columns)}")
            size += len(columns[-1]) + 1
        return (",".join(columns) + "\n" + ",".join("x" * len(columns)) + "\n").encode()
    raise ValueError(kind)


class Runner:
    """Assembles cases under ``work`` and runs them."""

    def __init__(self, work: Path, corpus: Path = CORPUS) -> None:
        self.work, self.corpus = work, corpus
        self._bases: dict[str, Path] = {}

    def base(self, name: str) -> Path:
        if name not in self._bases:
            if name == "gpt2jax_mini":  # orbax files hold timestamps: made here, not stored
                from gpt2jax.convert.openai_tf import convert_openai_dir

                path = self.work / "bases" / name
                convert_openai_dir(self.corpus / "bases" / "openai_mini", path)
            else:
                path = self.corpus / "bases" / name
            self._bases[name] = path
        return self._bases[name]

    def assemble(self, entry: dict[str, Any]) -> Path:
        case = self.work / "cases" / entry["name"]
        if entry["base"]:
            shutil.copytree(self.base(entry["base"]), case)
        else:
            case.mkdir(parents=True)
        own = self.corpus / "cases" / entry["dir"]
        for name in entry["files"]:
            if name.endswith(".patch"):
                target = case / name[: -len(".patch")]
                patched = merge_patch(
                    json.loads(target.read_text()), json.loads((own / name).read_text())
                )
                target.write_text(json.dumps(patched, indent=2) + "\n")
            else:
                shutil.copyfile(own / name, case / name)
        for name in entry["remove"]:
            path = case / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if entry["generate"]:
            (case / entry["generate"]["file"]).write_bytes(generated_bytes(entry["generate"]))
        return case

    def run(self, entry: dict[str, Any]) -> dict[str, Any]:
        case = self.assemble(entry)
        dst_parent = self.work / "dst" / entry["name"]
        dst_parent.mkdir(parents=True)
        subs = {"{case}": str(case), "{dst}": str(dst_parent / "out"), "{tiny}": str(TINY)}
        args = [_substitute(a, subs) for a in entry["args"]]
        start = time.perf_counter()
        code, out, err = run_cli(args)
        result = {
            "name": entry["name"],
            "group": entry["group"],
            "what": entry["what"],
            "command": entry["args"][0],
            "args": args,
            "paths": {"CASE": str(case), "DST": subs["{dst}"], "TINY": str(TINY)},
            "exit": code,
            "stderr": err,
            "seconds": round(time.perf_counter() - start, 2),
            "left_behind": sorted(os.listdir(dst_parent)),
        }
        result["problems"] = check(entry, result, subs)
        return result


def _substitute(text: str, subs: dict[str, str]) -> str:
    for key, value in subs.items():
        text = text.replace(key, value)
    return text


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``gpt2jax.cli.main.main(args)`` with fds 1 and 2 captured: ``(exit code, stdout,
    stderr)``."""
    from gpt2jax.cli import main as cli

    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            try:
                code = cli.main(args)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 1
            except Exception:  # what the interpreter would print for the real command
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
        out.seek(0)
        err.seek(0)
        return code, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def error_lines(result: dict[str, Any]) -> list[str]:
    prefix = f"gpt2jax {result['command']}: error: "
    return [line for line in result["stderr"].splitlines() if line.startswith(prefix)]


def check(entry: dict[str, Any], result: dict[str, Any], subs: dict[str, str]) -> list[str]:
    """What is wrong with the outcome of a case (empty: it passed)."""
    expect, err = entry["expect"], result["stderr"]
    problems = []
    if "Traceback (most recent call last)" in err:
        problems.append("a traceback")
    if expect["exit"] == 0:
        if result["exit"] != 0:
            problems.append(f"exit code {result['exit']}, expected 0")
        if expect["phrase"] not in err:
            problems.append(f"no warning saying {expect['phrase']!r}")
        return problems
    if result["exit"] == 0:
        problems.append("exit code 0")
    errors = error_lines(result)
    lines = [line for line in err.splitlines() if line.strip()]
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines")
    elif lines[-1] != errors[0]:
        problems.append("the error is not the last line")
    if errors:
        line = errors[0]
        file = _substitute(expect["file"], subs)
        if file not in line:
            problems.append(f"the error does not name {file}")
        if expect["phrase"] not in line:
            problems.append(f"the error does not say {expect['phrase']!r}")
        paths = sum(len(v) * line.count(v) for v in subs.values())
        if len(line) - paths > MAX_LINE:
            problems.append(f"the error line is {len(line)} characters long")
    if result["left_behind"]:
        problems.append(f"wrote {', '.join(result['left_behind'])}")
    return problems


def outcome(result: dict[str, Any], width: int = 130) -> str:
    """The error line without its prefix, the case's paths shortened to ``CASE/`` etc."""
    errors = error_lines(result)
    if errors:
        text = errors[0].split(": error: ", 1)[1]
    elif result["exit"] == 0:
        warnings = [x for x in result["stderr"].splitlines() if "warning:" in x]
        text = "(exit 0) " + (warnings[0].split("warning: ", 1)[1] if warnings else "")
    else:
        text = (result["stderr"].strip().splitlines() or ["(no output)"])[-1]
    for name, path in result["paths"].items():
        text = text.replace(path, name)
    return text if len(text) <= width else text[: width - 1] + "…"


def table(results: list[dict[str, Any]]) -> str:
    """A Markdown table: case, what was damaged, command, exit code, as expected, the message."""
    rows = [("case", "damage", "command", "exit", "ok", "what it said")]
    for r in results:
        ok = "yes" if not r["problems"] else "NO: " + "; ".join(r["problems"])
        rows.append((r["name"], r["what"], r["command"], str(r["exit"]), ok, outcome(r)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row[:5], widths, strict=True)] + [
            f"`{row[5]}`" if i else row[5]
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in [*widths, 14]) + "|")
    return "\n".join(lines)


def run_all(
    work: Path, commands: list[str] | None = None, names: list[str] | None = None
) -> list[dict[str, Any]]:
    """Runs the selected cases (all by default) in ``work``; their results in manifest order."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["GPT2JAX_CACHE"] = str(work / "cache")  # the token cache: not the user's
    runner = Runner(work)
    results = []
    for entry in load_manifest():
        if commands and entry["args"][0] not in commands:
            continue
        if names and entry["name"] not in names:
            continue
        results.append(runner.run(entry))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--command", nargs="+", help="only the cases of these commands")
    p.add_argument("--case", nargs="+", help="only these cases")
    p.add_argument("--json", help="write the results (with each case's stderr) here")
    p.add_argument("--quiet", action="store_true", help="no table")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpt2jax-bad-inputs-") as tmp:
        results = run_all(Path(tmp), args.command, args.case)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    failed = [r["name"] for r in results if r["problems"]]
    if not args.quiet:
        print(table(results))
        print(f"\n{len(results)} cases, {len(results) - len(failed)} as expected", end="")
        print(f", FAILED: {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
