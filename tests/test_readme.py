"""Follows README.md as a new user would: its code blocks, in order, in a fresh directory.

Every ```` ```bash ```` block runs as one ``bash -e -o pipefail`` script (``gpt2jax`` and
``python`` are this environment's), every ```` ```python ```` block as its own
``python -c``, all in one empty working directory, each expected to exit 0. What the test
changes, so that the README's commands can stay the ones a user types:

- **Models**: the download cache (``$GPT2JAX_CACHE/models/<size>``, ``$GPT2JAX_CACHE`` in the
  temporary directory) holds, for every size, the tiny OpenAI-format checkpoint
  ``tests/fixtures/openai_tiny`` and the manifest ``gpt2jax download`` writes, as if downloaded:
  ``gpt2jax download 124M`` and size names then find a complete download and make no request.
  ``GPT2JAX_BASE_URL`` points at a closed local port, so any request would fail at once.
- **Data**: ``corpus.txt`` and ``heldout.txt`` are ``tests/fixtures/english.txt``.
- **Sizes** (:data:`REWRITES`): step counts are divided by 1000 (``--steps 2000`` ->
  ``--steps 2``, ``steps=2000`` -> ``steps=2``, a TOML line ``steps = 2000`` likewise),
  ``--seq-len 1024`` becomes the tiny model's context (29), and ``gpt2jax plan SIZE`` reads
  the cached directory of SIZE (for a size name, ``plan`` uses the real preset's shape: a
  minute of compiling for 1558M on a CPU).
- **Markers**: an HTML comment right before a block, ``<!-- test: skip (why) -->``, leaves it
  out (network, or a full-size model; the list is printed); ``<!-- test: slow -->`` runs it only
  in the ``slow`` test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT, SHARED

README = ROOT / "README.md"
TINY_OPENAI = FIXTURES / "openai_tiny"
TEXT = FIXTURES / "english.txt"
SIZES = ("124M", "355M", "774M", "1558M")
MARKER = re.compile(r"<!--\s*test:\s*(skip|slow)\b\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


def _steps(m: re.Match) -> str:
    return f"{m.group(1)}{max(1, int(m.group(2)) // 1000)}"


#: (pattern, replacement) applied to every block before it runs; see the module docstring.
REWRITES: tuple[tuple[str, object], ...] = (
    (r"(?m)(--steps |steps=|^steps = )(\d+)", _steps),
    (r"--seq-len 1024\b", "--seq-len 29"),
    (r"gpt2jax plan (\d+M)\b", r'gpt2jax plan "$GPT2JAX_CACHE/models/\1"'),
)


@dataclasses.dataclass
class Block:
    line: int  # where the fence opens (1-based)
    lang: str
    code: str
    marker: str | None  # "skip", "slow" or None
    reason: str
    seconds: float = 0.0  # how long it ran


def read_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, each with the test marker right before it
    (blank lines may separate them; anything else cancels the marker)."""
    blocks, marker, reason = [], None, ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"README.md:{start}: code block never closed")
            blocks.append(Block(start, fence.group(1), "\n".join(body) + "\n", marker, reason))
            marker, reason = None, ""
        elif MARKER.search(line):
            m = MARKER.search(line)
            marker, reason = m.group(1), m.group(2)
        elif "<!--" in line and "test:" in line:
            raise AssertionError(f"README.md:{i + 1}: unknown test marker {line.strip()!r}")
        elif line.strip():
            marker, reason = None, ""
        i += 1
    return blocks


def rewrite(code: str) -> str:
    for pattern, replacement in REWRITES:
        code = re.sub(pattern, replacement, code)
    return code


def _fake_download(cache: Path) -> None:
    """Every size as ``gpt2jax download`` leaves it, holding the tiny checkpoint."""
    from gpt2jax.store.download import FILES, MANIFEST

    for size in SIZES:
        directory = cache / "models" / size
        shutil.copytree(TINY_OPENAI, directory)
        lengths = {name: (directory / name).stat().st_size for name in FILES}
        manifest = {"base_url": "http://127.0.0.1:9/gpt-2/models", "files": lengths}
        (directory / MANIFEST).write_text(json.dumps(manifest))


def _environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPT2JAX_", "JAX_", "XLA_"))}
    env.update(
        HOME=str(home),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        GPT2JAX_CACHE=str(home / "cache"),
        GPT2JAX_BASE_URL="http://127.0.0.1:9/gpt-2/models",  # the discard port: nothing answers
        TIKTOKEN_CACHE_DIR=str(SHARED / "tiktoken-cache"),
        JAX_PLATFORMS="cpu",
        # Identical programs (a resumed run, the same shapes again) compile once per test.
        JAX_COMPILATION_CACHE_DIR=str(home / "jax-cache"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1",
        PYTHONWARNINGS="ignore",
    )
    return env


def follow_readme(tmp_path: Path, include_slow: bool) -> tuple[Path, list[Block], list[Block]]:
    """Runs the README's blocks; returns the working directory, the blocks run and skipped."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir(parents=True)
    _fake_download(home / "cache")
    for name in ("corpus.txt", "heldout.txt"):
        shutil.copy(TEXT, work / name)
    env = _environment(home)
    ran, skipped = [], []
    for block in read_blocks(README.read_text(encoding="utf-8")):
        if block.lang not in ("bash", "python"):
            continue
        if block.marker == "skip" or (block.marker == "slow" and not include_slow):
            skipped.append(block)
            continue
        code = rewrite(block.code)
        cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
        if block.lang == "python":
            cmd = [sys.executable, "-c", code]
        start = time.perf_counter()
        result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        block.seconds = time.perf_counter() - start
        assert result.returncode == 0, (
            f"README.md:{block.line} ({block.lang}) failed with exit code {result.returncode}:\n"
            f"{code}\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n"
            f"{result.stderr[-3000:]}"
        )
        ran.append(block)
    print("README blocks run:")
    for b in ran:
        print(f"  README.md:{b.line}: {b.seconds:5.1f} s")
    print("skipped README blocks:")
    for b in skipped:
        print(f"  README.md:{b.line}: {b.marker} {b.reason}")
    return work, ran, skipped


@pytest.mark.slow
def test_readme_blocks_run_in_order(tmp_path: Path) -> None:
    work, ran, skipped = follow_readme(tmp_path, include_slow=False)
    assert len(ran) >= 7, [b.line for b in ran]
    assert all(b.marker != "skip" or b.reason for b in skipped), "a skip needs a reason"
    # What the quickstart promises exists, and the export is a Hugging Face directory.
    assert (work / "runs/poems/loss.png").is_file()
    assert (work / "runs/poems/metrics.jsonl").is_file()
    config = json.loads((work / "hf/poems/config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert (work / "hf/poems/model.safetensors").is_file()
    assert json.loads((work / "ckpt/124M/config.json").read_text())["format"] == "gpt2jax"
    assert (work / "tf/poems/model.ckpt.index").is_file()
    assert (work / "hf/api/model.safetensors").is_file()  # the Python API's export
    assert (work / "poems.gguf").read_bytes()[:4] == b"GGUF"
    assert list((work / "runs/toml/tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((work / "runs/again/run.json").read_text())["train"]["lr"] == 3e-4


@pytest.mark.slow
def test_readme_all_blocks_run_in_order(tmp_path: Path) -> None:
    work, _, skipped = follow_readme(tmp_path, include_slow=True)
    assert not [b for b in skipped if b.marker == "slow"]
    assert (work / "samples.jsonl").read_text().count("\n") == 2  # one sample per prompt
    assert (work / "runs/story/loss.png").is_file()


def test_readme_parsing_and_rewrites() -> None:
    blocks = read_blocks(README.read_text(encoding="utf-8"))
    # CI runs exactly the set-up commands the README starts with.
    assert blocks[0].code.splitlines()[0].startswith('pip install -e ".[dev]"')
    assert blocks[0].code.splitlines()[1].startswith("python -m pytest ")
    assert blocks[0].marker == "skip"
    runnable = [b for b in blocks if b.lang in ("bash", "python") and b.marker != "skip"]
    assert any("gpt2jax download 124M" in b.code for b in runnable)  # offline, from the cache
    for b in blocks:
        assert b.marker is None or b.reason or b.marker == "slow", f"README.md:{b.line}"

    md = "<!-- test: skip (network) -->\n\n```bash\nx\n```\ntext\n\n```python\ny\n```\n"
    got = [(b.lang, b.code, b.marker, b.reason) for b in read_blocks(md)]
    assert got == [("bash", "x\n", "skip", "(network)"), ("python", "y\n", None, "")]
    with pytest.raises(AssertionError, match="unknown test marker"):
        read_blocks("<!-- test: later -->\n```bash\nx\n```\n")
    assert rewrite("gpt2jax finetune 124M --steps 2000 --seq-len 1024") == (
        "gpt2jax finetune 124M --steps 2 --seq-len 29"
    )
    assert rewrite("TrainConfig(steps=500)") == "TrainConfig(steps=1)"
    assert rewrite('model = "124M"\nsteps = 2000\n') == 'model = "124M"\nsteps = 2\n'  # TOML
    assert rewrite("gpt2jax plan 1558M --memory 16GB") == (
        'gpt2jax plan "$GPT2JAX_CACHE/models/1558M" --memory 16GB'
    )
