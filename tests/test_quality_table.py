"""``scripts/quality_table.py``: the fine-tuning quality table of issue #11.

Fast: the verdicts and the markdown table from given losses. Slow (``-m slow``; three fine-tuning
processes take about two minutes of CPU, most of it compiling): ``--quick`` end to end, a few
steps of ``gpt2jax finetune`` from the committed small pretrained model with the reference
settings, an exact option (remat) and an approximate one (Adafactor), each measured with
``gpt2jax eval``: the table must parse, the reference must have learned something of the new
text, and the exact row must give the reference's numbers.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import FIXTURES, ROOT

SCRIPT = ROOT / "scripts" / "quality_table.py"
MODEL = FIXTURES / "small_pretrained"
COLUMNS = [
    "option",
    "exact?",
    "new-text loss",
    "Δ vs reference",
    "old-text loss",
    "forgetting",
    "Δ forgetting vs reference",
    "within target?",
]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_lines(text: str) -> list[list[str]]:
    """The rows of the markdown table in ``text`` (header and separator checked, dropped)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert _cells(lines[0]) == COLUMNS
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "")) == set()
    body = [_cells(line) for line in lines[2:]]
    assert all(len(cells) == len(COLUMNS) for cells in body)
    return body


@pytest.fixture(scope="module")
def qt():
    spec = importlib.util.spec_from_file_location("quality_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verdicts_and_table(qt) -> None:
    base = {"new_loss": 7.0, "old_loss": 4.0}

    def row(option: str, exact: bool, new: float, old: float) -> dict:
        return {"option": option, "exact": exact, "flags": f"--{option}", "new_loss": new,
                "old_loss": old}  # fmt: skip

    rows = [
        row("reference", True, 5.0, 4.4),  # forgets 10%
        row("remat-block", True, 5.0 * (1 + 5e-5), 4.4),  # float rounding: equal
        row("loss-chunk", True, 5.0 * (1 + 5e-4), 4.4),  # not equal
        row("adafactor", False, 5.09, 4.44),  # +1.8%, forgets 11%: within
        row("lora", False, 5.2, 4.0),  # +4%: out
        row("freeze-embeddings", False, 4.9, 4.6),  # forgets 15%: out
        {"option": "fsdp-8", "exact": True, "flags": "--parallel fsdp", "error": "boom"},
    ]
    qt.judge(rows, base, exact_tol=1e-4)
    verdicts = {r["option"]: r["within_target"] for r in rows}
    assert verdicts == {
        "reference": True,
        "remat-block": True,
        "loss-chunk": False,
        "adafactor": True,
        "lora": False,
        "freeze-embeddings": False,
        "fsdp-8": False,
    }
    assert rows[0]["forgetting_pct"] == pytest.approx(10.0)
    assert rows[3]["delta_new_pct"] == pytest.approx(1.8)
    assert rows[3]["delta_forgetting_pp"] == pytest.approx(1.0)
    body = _table_lines(qt.markdown(rows, base, 1e-4))
    assert [cells[0].split(" (")[0] for cells in body] == ["pretrained"] + [
        r["option"] for r in rows
    ]
    assert body[4][2] == "5.0900" and body[4][3] == "+1.800%" and body[4][7] == "yes"
    assert body[5][7] == "**no**" and body[1][7] == "(reference)"
    assert body[7][2].startswith("failed: boom") and body[7][7] == "no"


@pytest.fixture(scope="module")
def quick_table(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    if not (MODEL / "config.json").exists():
        pytest.skip("tests/fixtures/small_pretrained is missing: run scripts/pretrain_small.py")
    out = tmp_path_factory.mktemp("quality") / "table.json"
    rows = ("reference", "remat-block", "adafactor")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--rows", *rows, "--json-out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_table_parses_and_matches_json(quick_table: tuple[str, dict]) -> None:
    stdout, result = quick_table
    body = _table_lines(stdout)
    names = [cells[0].split(" (")[0] for cells in body]
    assert names == ["pretrained", "reference", "adafactor", "remat-block"]
    rows = {r["option"]: r for r in result["rows"]}
    for cells in body[1:]:
        row = rows[cells[0].split(" (")[0]]
        assert "error" not in row, row["error"]
        assert cells[1] == ("exact" if row["exact"] else "approximate")
        assert float(cells[2]) == pytest.approx(row["new_loss"], abs=1e-4)
        assert float(cells[4]) == pytest.approx(row["old_loss"], abs=1e-4)
    assert float(body[0][2]) == pytest.approx(result["pretrained"]["new_loss"], abs=1e-4)


@pytest.mark.slow
def test_reference_learns_and_exact_row_matches(quick_table: tuple[str, dict]) -> None:
    _, result = quick_table
    rows = {r["option"]: r for r in result["rows"]}
    ref, remat = rows["reference"], rows["remat-block"]
    assert ref["new_loss"] < result["pretrained"]["new_loss"]
    assert remat["exact"] and not rows["adafactor"]["exact"]
    for key in ("new_loss", "old_loss"):
        assert remat[key] == pytest.approx(ref[key], rel=1e-4)
    assert remat["within_target"] is True
    assert rows["adafactor"]["within_target"] in (True, False)
