"""Runs every cell of ``scripts/finetune_colab.ipynb``, top to bottom, on the CPU in tiny mode.

No Jupyter needed: the notebook's code cells are plain Python plus IPython's ``!command`` lines
(which this test translates to a shell call, with IPython's ``{name}`` expansion), executed in
one shared namespace as a kernel would. As papermill does, the test sets ``INSTALL`` in a cell
after the parameters: the wheel it builds from this checkout, which the install cell installs
(into a scratch folder, in tiny mode, so the test's own environment stays).
``GPT2JAX_NOTEBOOK_TINY=1`` makes the notebook swap in the committed tiny checkpoint and a short
text, train two steps and skip the JAX installation, the download and Google Drive (its parameter
cell reads it). Then the test checks what a user ends with: the backend check's message, the
loss curve, samples, and a Hugging Face export that ``transformers`` loads and that computes the
fine-tuned model's logits.
"""

from __future__ import annotations

import json
import logging
import os
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "scripts" / "finetune_colab.ipynb"


def code_cells(path: Path) -> list[str]:
    """The code cells' sources, in order."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def to_python(source: str) -> str:
    """IPython's ``!command`` lines (at any indentation) as calls of ``_shell``; no magics."""
    lines = []
    for line in source.splitlines():
        body = line.lstrip()
        indent = line[: len(line) - len(body)]
        if body.startswith("%"):
            raise AssertionError(f"the notebook uses a magic this test cannot run: {line!r}")
        lines.append(f"{indent}_shell({body[1:]!r}, globals())" if body.startswith("!") else line)
    return "\n".join(lines) + "\n"


def _shell(command: str, namespace: dict) -> None:
    """What IPython does with ``!command``: expand ``{name}`` from the namespace, run a shell."""
    expanded = string.Formatter().vformat(command, (), namespace)
    subprocess.run(expanded, shell=True, check=True)


def test_translation() -> None:
    src = "x = 1\nif x:\n    !echo {x}\n!ls\n"
    assert to_python(src) == (
        "x = 1\nif x:\n    _shell('echo {x}', globals())\n_shell('ls', globals())\n"
    )
    with pytest.raises(AssertionError, match="magic"):
        to_python("%pip install x\n")


def test_notebook_structure() -> None:
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    # papermill injects parameters after the cell tagged "parameters": it must be the first.
    assert code[0]["metadata"].get("tags") == ["parameters"]
    assert "TINY" in "".join(code[0]["source"])
    assert 'INSTALL = ""' in "".join(code[0]["source"])  # no package index name to fail on
    text = "".join("".join(c["source"]) for c in nb["cells"])
    assert "v5e-8" in text and "v3-8" not in text
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), "outputs saved"
    assert len({c["id"] for c in nb["cells"]}) == len(nb["cells"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout (what ``python -m build`` makes, without its isolated env)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (path,) = out.glob("gpt2jax-*.whl")
    return path


def test_notebook_runs_top_to_bottom(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wheel: Path
) -> None:
    monkeypatch.setenv("GPT2JAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # plt.show() draws nothing
    monkeypatch.setenv("GPT2JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)  # restored after the run
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the notebook's mkdtemp, cleaned up
    # The notebook shows the library's log lines (log_to_stderr); other tests expect the
    # logger as it was.
    logger = logging.getLogger("gpt2jax")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    namespace: dict = {"__name__": "__main__", "_shell": _shell}
    cells = code_cells(NOTEBOOK)
    cells.insert(1, f"INSTALL = {str(wheel)!r}\n")  # papermill's injected parameters
    cache_dir = jax.config.jax_compilation_cache_dir
    try:
        for i, source in enumerate(cells):
            try:
                exec(compile(to_python(source), f"<cell {i}>", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"cell {i} raised {type(e).__name__}: {e}\n{source}") from e
    finally:
        jax.config.update("jax_compilation_cache_dir", cache_dir)

    assert namespace["TINY"] is True
    # the install cell installed the wheel
    installed = namespace["work"] / "site-packages" / "gpt2jax"
    assert (installed / "__init__.py").is_file() and (installed / "convert" / "hf.py").is_file()
    # the backend check: on a CPU runtime it says so; an accelerator runtime on the CPU stops
    assert namespace["BACKEND_MESSAGE"].startswith("No TPU or GPU in this runtime")
    with pytest.raises(RuntimeError, match="has a TPU, but JAX computes on the CPU"):
        namespace["check_backend"]("tpu", "cpu")
    assert namespace["check_backend"]("gpu", "gpu") == "JAX computes on the GPU."
    assert namespace["COMPILE_CACHE"] == str(namespace["work"] / "jax-cache")
    run, export = Path(namespace["RUN_DIR"]), Path(namespace["EXPORT_DIR"])
    assert run.is_relative_to(namespace["work"])  # tiny mode wrote only to its temp dir
    assert (run / "loss.png").stat().st_size > 0
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r]
    assert steps == [1, 2]
    samples = namespace["samples"]
    assert len(samples) == 3 and all(s.tokens for s in samples)

    # The export loads in transformers and computes the fine-tuned model's logits.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    tuned = namespace["tuned"]
    ids = tuned.encode("ROMEO: what light")
    with jax.default_matmul_precision("highest"):  # GPUs multiply float32 in TF32 by default
        ours = np.asarray(tuned.logits(ids))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    assert os.path.isfile(export / "vocab.json") and os.path.isfile(export / "merges.txt")
