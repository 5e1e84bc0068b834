"""The bad-input corpus (``tests/fixtures/bad_inputs``) through the real command line.

Every case (damaged TF checkpoints, configs, Hugging Face directories, tokenizer files, data and
prompt files; outputs onto their inputs, runs in use or damaged, GPT-2 variants, FIFOs, devices
and symlink cycles, flags set to NaN; see ``scripts/make_bad_inputs.py``) must end with a
non-zero exit code and exactly one error line, the last, naming the file and what is wrong, with
no traceback, nothing written to the destination, and every file it read or that lay beside it
byte-identical afterwards; or, for the few meant to succeed, with the right result
(``scripts/bad_input_table.py`` defines the checks). The cases run in one subprocess that calls
``gpt2jax.cli.main.main`` for each, capturing file descriptors 1 and 2 (about 5 minutes on the
shared 2-core machine, most of it one resumed training run); a few also run as real
``python -m gpt2jax`` processes, and ``--debug`` must show the traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import FIXTURES, ROOT, SHARED
from gpt2jax.cli import main as cli

CORPUS = FIXTURES / "bad_inputs"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


table = _script("bad_input_table")
MANIFEST = table.load_manifest(CORPUS)
ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "TIKTOKEN_CACHE_DIR": os.environ.get("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache")),
}


def test_corpus_is_small_and_exactly_what_the_script_writes(tmp_path):
    _script("make_bad_inputs").main(["--out", str(tmp_path / "corpus")])
    made = {p.relative_to(tmp_path / "corpus"): p.read_bytes() for p in
            (tmp_path / "corpus").rglob("*") if p.is_file()}  # fmt: skip
    committed = {p.relative_to(CORPUS): p.read_bytes() for p in CORPUS.rglob("*") if p.is_file()}
    assert sorted(made) == sorted(committed)
    assert all(made[k] == committed[k] for k in made), "regenerate: scripts/make_bad_inputs.py"
    assert sum(map(len, committed.values())) < 2 << 20
    assert len(MANIFEST) >= 130 and len({e["name"] for e in MANIFEST}) == len(MANIFEST)
    groups = {e["group"] for e in MANIFEST}
    assert groups >= {"TF checkpoint", "hparams.json", "HF directory", "tokenizer", "data file",
                      "output onto input", "run directory", "HF variant / vocabulary",
                      "bounded reads", "clean errors", "flag values", "hygiene"}  # fmt: skip
    for command in ("convert", "info", "export", "finetune", "eval", "generate", "plan"):
        assert any(e["args"][0] == command for e in MANIFEST), command


def test_the_bases_are_valid(tmp_path, capsys):
    """The damage, not the base, is what each case's error is about."""
    for base in ("openai_mini", "hf_mini"):
        assert cli.main(["convert", str(CORPUS / "bases" / base), str(tmp_path / base)]) == 0
    assert "converted" in capsys.readouterr().out


def test_the_checks_can_fail():
    """A case that wrote its destination, printed a traceback, two errors, or nothing clear."""
    entry = next(e for e in MANIFEST if e["name"] == "tf_data_bitflip")
    subs = {"{case}": "/c", "{dst}": "/d/out", "{tiny}": "/t"}
    good = (
        "gpt2jax convert: error: corrupt: /c/model.ckpt.data-00000-of-00001 fails its CRC32C check"
    )
    base = {"command": "convert", "exit": 1, "stderr": good + "\n", "left_behind": [],
            "changed": []}  # fmt: skip
    assert table.check(entry, base, subs) == []
    bad = [
        dict(base, exit=0),
        dict(base, left_behind=["out"]),
        dict(base, changed=["- /c/model.ckpt.index"]),  # an input was lost
        dict(base, changed=["~ /c/../unrelated.txt"]),  # a file beside it changed
        dict(base, stderr="Traceback (most recent call last):\n" + good),
        dict(base, stderr=good + "\n" + good),
        dict(base, stderr=good + "\nmore output"),
        dict(base, stderr=good.replace("CRC32C", "checksum")),
        dict(base, stderr=good.replace("/c/model.ckpt.data-00000-of-00001", "the data")),
        dict(base, stderr=good + " " + "x" * 600),
    ]
    for result in bad:
        assert table.check(entry, result, subs), result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-inputs") / "results.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bad_input_table.py"), "--json", str(out)],
        env=ENV, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert out.exists(), done.stderr[-3000:]
    print(done.stdout)  # the table, shown with -s
    return {r["name"]: r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("name", [e["name"] for e in MANIFEST])
def test_case(results, name):
    r = results[name]
    assert not r["problems"], f"{r['problems']}\n$ gpt2jax {' '.join(r['args'])}\n{r['stderr']}"


def _assembled(tmp_path, name: str):
    entry = next(e for e in MANIFEST if e["name"] == name)
    runner = table.Runner(tmp_path, CORPUS)
    return runner.assemble(entry)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        # (the --debug test below runs a convert case as a real process too)
        ("data_binary", ["finetune", str(FIXTURES / "openai_tiny"), "--data",
                         "{case}/corpus.txt", "--out", "{dst}"]),
        # a FIFO: refused at once, no hang waiting for a writer
        ("hparams_fifo", ["convert", "{case}", "{dst}"]),
        ("prompt_file_fifo", ["generate", str(FIXTURES / "openai_tiny"), "--prompt-file",
                              "{case}/p.txt"]),
        ("convert_into_its_parent", ["convert", "{case}", "{home}", "--force"]),
    ],
)  # fmt: skip
def test_real_process_prints_one_line(tmp_path, name, args):
    case, dst = _assembled(tmp_path, name), tmp_path / "dst" / "out"
    home = case.parent
    args = [a.replace("{case}", str(case)).replace("{dst}", str(dst)).replace("{home}", str(home))
            for a in args]  # fmt: skip
    before = table.snapshot([home])
    done = subprocess.run(
        [sys.executable, "-m", "gpt2jax", *args], env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 1
    # progress bars may come first (a bar the error interrupted); then the one error line
    lines = [x for x in done.stderr.strip().splitlines() if not table.PROGRESS.match(x)]
    assert len(lines) == 1 and lines[0].startswith(f"gpt2jax {args[0]}: error: "), done.stderr
    assert str(case) in lines[0] and not dst.parent.exists()
    assert table.changes(before, table.snapshot([home])) == []  # nothing read or beside it lost


def test_debug_shows_the_traceback_and_still_writes_nothing(tmp_path):
    case, dst = _assembled(tmp_path, "tf_data_bitflip"), tmp_path / "dst"
    done = subprocess.run(
        [sys.executable, "-m", "gpt2jax", "--debug", "convert", str(case), str(dst)],
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback (most recent call last)" in done.stderr
    assert "CheckpointError: corrupt: tensor 'model/wpe'" in done.stderr
    assert not dst.exists() and sorted(os.listdir(tmp_path)) == ["cases"]
    assert sorted(os.listdir(case.parent)) == ["m", "unrelated.txt"]
