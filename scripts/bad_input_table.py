"""Run the bad-input corpus through the real CLI and print the table of cases and outcomes.

    python scripts/bad_input_table.py                       # every case; the table on stdout
    python scripts/bad_input_table.py --command convert info --json results.json

The corpus is ``tests/fixtures/bad_inputs`` (``scripts/make_bad_inputs.py`` writes it). Each
case is assembled in a temporary directory, its *home* (``{home}``, which also holds an unrelated
file, ``unrelated.txt``): the case directory ``{case}`` = ``{home}/m`` is its base directory, then
its own files over it (a ``NAME.patch`` file is a JSON merge patch of the base's ``NAME``;
``remove`` lists base files to delete); then ``generate`` makes what cannot be committed (files
too big, FIFOs, symbolic links to ``/dev/zero`` or in a cycle, lock files naming a live or a
dead process, training runs, a path that is not UTF-8). Its command is run by
``gpt2jax.cli.main.main`` in this process, with file descriptors 1 and 2 redirected so that all
output is captured, from C libraries too. An exception escaping ``main`` is printed as Python would
print it (a traceback) and counts as exit code 1.

A case passes when: the exit code is non-zero (or 0 where ``expect.exit`` is 0: then stderr, or
stdout with ``expect.stream``, must hold ``expect.phrase``, and lack each of ``expect.lacks``);
stderr holds no traceback and exactly one error line, its last line, ``gpt2jax CMD: error: ...``,
at most 500 characters plus the paths it names, naming ``expect.file`` and saying
``expect.phrase``; the destination (``{dst}``) does not exist and its parent directory holds
nothing new; and nothing was lost: every file under the case's home, the tiny model and the
bases is byte-identical afterwards (unless ``expect.changes``: then the paths in
``expect.absent`` must be gone and those in ``expect.present`` exist). Exit status 1 if any case
fails.
"""

from __future__ import annotations

import argparse
import glob
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
ENGLISH = ROOT / "tests" / "fixtures" / "english.txt"
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
    words = ENGLISH.read_text("utf-8").split()
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
    if kind == "json_padded":  # a valid JSON object with megabytes of spaces after it
        return b'{"n_vocab": 97}' + b" " * n
    raise ValueError(kind)


def make_run(path: Path, model: str, data: str, *, steps: int = 6, lora_rank: int = 0) -> None:
    """A training run directory as ``gpt2jax finetune`` leaves it (``run.json``, tokenizer files,
    checkpoints every 2 steps up to ``steps``), made without training: every checkpoint holds
    the starting state, which is all the cases need (they are about files, not numbers)."""
    import numpy as np

    from gpt2jax.loader import base_record, describe, load
    from gpt2jax.store import runs
    from gpt2jax.train.data import load_tokens
    from gpt2jax.train.memory.build import build
    from gpt2jax.train.optim import learning_rate_schedule
    from gpt2jax.train.settings import TrainConfig
    from gpt2jax.train.step import TrainState

    train = TrainConfig(
        model=model, data=[data], steps=steps, schedule_steps=steps, save_every=2, keep=3,
        seq_len=8, batch_size=2, eval_every=0, sample_every=0, lora_rank=lora_rank,
    )  # fmt: skip
    source = describe(model)
    pretrained = load(source)
    base = base_record(model, pretrained.params) if lora_rank else None
    has_files = source.tokenizer is not None and source.tokenizer[0] == "encoder.json"
    runs.create_run(str(path), pretrained.config, train, model if has_files else None, base=base)
    schedule = learning_rate_schedule(train.update.lr, train.schedule.warmup, steps,
                                      train.schedule.schedule)  # fmt: skip
    recipe = build(pretrained.config, train.memory_settings, schedule)
    trained, frozen = recipe.split(pretrained.params, train.run.seed)
    state = TrainState.create(trained, recipe.tx, train.run.seed, frozen=frozen)
    key = load_tokens([data], pretrained.tokenizer, show_progress=False).key
    ckpts = runs.Checkpoints(str(path), train.logging.keep)
    for step in range(2, steps + 1, 2):
        meta = {"step": step, "rng": np.asarray(state.rng).tolist(), "data": {"step": step},
                "data_key": key, "loss": None, "val_loss": None}  # fmt: skip
        ckpts.save(step, state.params, state.opt_state, meta)
        ckpts.wait()
    ckpts.close()


def write_lock(path: Path, pid: Any, host: str) -> None:
    """A writer lock (:class:`gpt2jax.files.WriterLock`) held by ``pid`` on ``host``: ``"live"``
    is process 1 (always running), ``"dead"`` a process that has ended."""
    import subprocess

    from gpt2jax import files

    if pid == "dead":
        child = subprocess.Popen(["true"])  # its pid is free once it has ended
        child.wait()
        pid = child.pid
    elif pid == "live":
        pid = 1  # init: always running
    record = {
        "pid": pid,
        "host": files.host() if host == "this" else host,
        "since": "2026-01-01T00:00:00+0000",
        "command": "gpt2jax finetune (the case's other writer)",
    }
    path.write_text(json.dumps(record))


class Runner:
    """Assembles cases under ``work`` and runs them."""

    def __init__(self, work: Path, corpus: Path = CORPUS) -> None:
        self.work, self.corpus = work, corpus
        self._bases: dict[str, Path] = {}

    def base(self, name: str) -> Path:
        if name not in self._bases:
            path = self.work / "bases" / name
            if name == "gpt2jax_mini":  # orbax files hold timestamps: made here, not stored
                from gpt2jax.convert.openai_tf import convert_openai_dir

                convert_openai_dir(self.corpus / "bases" / "openai_mini", path)
            elif name == "run_tiny":  # a run of tests/fixtures/openai_tiny at step 6
                make_run(path, str(TINY), str(ENGLISH))
            else:
                path = self.corpus / "bases" / name
            self._bases[name] = path
        return self._bases[name]

    def paths(self, entry: dict[str, Any]) -> dict[str, str]:
        """What the placeholders of ``entry`` stand for."""
        home = self.work / "cases" / entry["name"]
        return {
            "{case}": str(home / "m"),
            "{home}": str(home),
            "{dst}": str(self.work / "dst" / entry["name"] / "out"),
            "{tiny}": str(TINY),
            "{english}": str(ENGLISH),
            "{own}": str(self.corpus / "cases" / entry["dir"]),
            "{bases}": str(self.corpus / "bases"),
        }

    def assemble(self, entry: dict[str, Any]) -> Path:
        subs = self.paths(entry)
        home, case = Path(subs["{home}"]), Path(subs["{case}"])
        home.mkdir(parents=True)
        (home / "unrelated.txt").write_text("a file of the user's, beside the case\n")
        if entry["base"]:
            shutil.copytree(self.base(entry["base"]), case, symlinks=True)
        else:
            case.mkdir()
        own = self.corpus / "cases" / entry["dir"]
        for name in entry["files"] if entry.get("place", True) else []:
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
        for spec in entry["generate"] or []:
            self.make(spec, subs)
        return case

    def make(self, spec: dict[str, Any], subs: dict[str, str]) -> None:
        """One ``generate`` item: a file, FIFO, link, lock or run at ``spec["path"]``."""
        path = Path(_substitute(spec["path"], subs))
        kind = spec["kind"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "symlink":
            os.symlink(_substitute(spec["target"], subs), path)
        elif kind == "copy":
            source = Path(_substitute(spec["from"], subs))
            if source.is_dir():
                shutil.copytree(source, path, dirs_exist_ok=True)
            else:
                shutil.copyfile(source, path)
        elif kind == "text":
            path.write_text(spec["text"], encoding="utf-8")
        elif kind == "lock":
            write_lock(path, spec["pid"], spec["host"])
        elif kind == "run":
            make_run(path, _substitute(spec["model"], subs), str(ENGLISH),
                     lora_rank=spec.get("lora_rank", 0))  # fmt: skip
        elif kind == "stale_temp":  # what a killed convert left: its pid is no longer running
            from gpt2jax import files

            write_lock(path.parent / ".probe", "dead", "this")
            pid = json.loads((path.parent / ".probe").read_text())["pid"]
            (path.parent / ".probe").unlink()
            (path.parent / f"{path.name}{pid}@{files.host()}-k1ll3d00").mkdir()
            (path.parent / f"{path.name}{pid}@{files.host()}-k1ll3d00" / "part").write_text("x")
        elif kind == "truncate":  # the largest file the glob matches, cut in half
            target = max(path.parent.glob(path.name), key=lambda p: p.stat().st_size)
            os.truncate(target, target.stat().st_size // 2)
        else:
            path.write_bytes(generated_bytes(spec))

    def run(self, entry: dict[str, Any]) -> dict[str, Any]:
        case = self.assemble(entry)
        subs = self.paths(entry)
        dst_parent = Path(subs["{dst}"]).parent
        dst_parent.mkdir(parents=True)
        watched = [Path(subs["{home}"]), TINY, self.corpus / "bases"]
        before = snapshot(watched)
        args = [_substitute(a, subs) for a in entry["args"]]
        start = time.perf_counter()
        code, out, err = run_cli(args)
        result = {
            "name": entry["name"],
            "group": entry["group"],
            "what": entry["what"],
            "command": entry["args"][0],
            "args": args,
            "paths": {"CASE": str(case), "HOME": subs["{home}"], "DST": subs["{dst}"],
                      "TINY": str(TINY), "ENGLISH": str(ENGLISH)},  # fmt: skip
            "exit": code,
            "stdout": out,
            "stderr": err,
            "seconds": round(time.perf_counter() - start, 2),
            "left_behind": sorted(os.listdir(dst_parent)),
            "changed": changes(before, snapshot(watched)),
            "exists": {p: bool(glob.glob(glob.escape(_substitute(p, subs)).replace("[*]", "*")))
                       for p in entry["expect"].get("absent", []) + entry["expect"].get("present",
                                                                                        [])},
        }  # fmt: skip
        stream = result.get(entry["expect"].get("stream", "stderr"), "")
        phrase = entry["expect"]["phrase"]
        result["said"] = next((x.strip() for x in stream.splitlines() if phrase in x), "")
        result["problems"] = check(entry, result, subs)
        return result


def snapshot(roots: list[Path]) -> dict[str, str]:
    """``{path: what it is}`` of everything under ``roots``: a hash of each regular file's
    bytes, a link's target, or the kind of anything else (a FIFO is never opened)."""
    import hashlib
    import stat as st

    found = {}
    for root in roots:
        for folder, dirs, names in os.walk(root):
            for name in dirs + names:
                path = os.path.join(folder, name)
                mode = os.lstat(path).st_mode
                if st.S_ISLNK(mode):
                    found[path] = "link to " + os.readlink(path)
                elif st.S_ISREG(mode):
                    with open(path, "rb") as f:
                        found[path] = hashlib.sha256(f.read()).hexdigest()
                else:
                    found[path] = "dir" if st.S_ISDIR(mode) else "special"
    return found


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What changed between two snapshots: ``"- path"`` gone, ``"+ path"`` new,
    ``"~ path"`` different."""
    out = [f"- {p}" for p in sorted(set(before) - set(after))]
    out += [f"+ {p}" for p in sorted(set(after) - set(before))]
    out += [f"~ {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return out


def _substitute(text: str, subs: dict[str, str]) -> str:
    for key, value in subs.items():
        text = text.replace(key, value)
    return text


def _substitute_back(text: str, subs: dict[str, str]) -> str:
    for key, value in sorted(subs.items(), key=lambda kv: -len(kv[1])):
        text = text.replace(value, key.strip("{}").upper())
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
    if expect.get("changes"):
        for path in expect.get("absent", []):
            if result.get("exists", {}).get(path, True):
                problems.append(f"{path} still exists")
        for path in expect.get("present", []):
            if not result.get("exists", {}).get(path, False):
                problems.append(f"{path} does not exist")
    elif result.get("changed"):
        shown = [_substitute_back(c, subs) for c in result["changed"][:3]]
        problems.append("changed what it read or what lay beside it: " + ", ".join(shown))
    if expect["exit"] == 0:
        stream = result.get(expect.get("stream", "stderr"), "")
        if result["exit"] != 0:
            problems.append(f"exit code {result['exit']}, expected 0")
        if expect["phrase"] not in stream:
            problems.append(f"no {expect.get('stream', 'stderr')} saying {expect['phrase']!r}")
        for text in expect.get("lacks", []):
            if text in stream:
                problems.append(f"{expect.get('stream', 'stderr')} holds {text!r}")
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
        lines = result["stderr"].splitlines()
        warnings = [x.split("warning: ", 1)[1] for x in lines if "warning:" in x]
        said = [x for x in lines if x.startswith("gpt2jax: ") and "warning:" not in x]
        text = "(exit 0) " + "; ".join(warnings + said[:1] or [result.get("said", "")])
    else:
        text = (result["stderr"].strip().splitlines() or ["(no output)"])[-1]
    for name, path in sorted(result["paths"].items(), key=lambda kv: -len(kv[1])):
        text = re.sub(re.escape(path) + r"(?![\w.-])", name, text)
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
