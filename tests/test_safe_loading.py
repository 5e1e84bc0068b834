"""Safe loading: no code runs from a file, and no name read from a file becomes a path outside.

* A static scan (``ast``) of ``gpt2jax/`` and ``convert/``: no ``eval``/``exec``, no pickle-family
  module, no ``np.load`` with ``allow_pickle`` other than ``False``, no ``torch.load`` without
  ``weights_only=True``. It fails as soon as someone adds one.
* Paths: a sharded checkpoint's ``weight_map``, a TF ``checkpoint`` file and tensor names cannot
  point the readers (or the writers) outside the directories they were given.

A malicious ``pytorch_model.bin`` (a pickle that would create a file) is tested where ``.bin``
loading lives: ``tests/test_hf_export.py::test_malicious_bin_is_refused_and_never_executed``.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, ROOT, TINY, TOKENIZER_DIR, random_params
from gpt2jax.cli.main import main as cli_main
from gpt2jax.convert import hf
from gpt2jax.convert.openai_tf import checkpoint_prefix, read_openai_dir
from gpt2jax.errors import CheckpointError
from gpt2jax.formats.tf_bundle import BundleReader, write_bundle

SCANNED = ("gpt2jax", "convert")
#: Modules whose loaders rebuild arbitrary objects, i.e. run code the file names.
PICKLE_FAMILY = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "marshal",
    "shelve",
}
ALWAYS_UNSAFE = {"eval", "exec", "builtins.eval", "builtins.exec"}


# ---- the static scan --------------------------------------------------------------------------


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str:
    """``torch.load`` for ``torch.load``/``t.load`` (``import torch as t``)/``load``
    (``from torch import load``); ``""`` for calls on anything but names and attributes."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str, filename: str = "<source>") -> tuple[list[str], list[str]]:
    """``(findings, loads)``: every unsafe import or call in ``source``, and every
    ``torch.load``/``numpy.load`` call seen (so a test can tell the scan saw them)."""
    tree = ast.parse(source, filename)
    findings, loads = [], []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                local = a.asname or a.name.split(".")[0]  # `import os.path` binds `os`
                aliases[local] = a.name if a.asname else local
                if a.name.split(".")[0] in PICKLE_FAMILY:
                    findings.append(f"{filename}:{node.lineno}: imports {a.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            for a in node.names:
                aliases[a.asname or a.name] = f"{module}.{a.name}"
            if module.split(".")[0] in PICKLE_FAMILY:
                findings.append(f"{filename}:{node.lineno}: imports from {module}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        name = {"np.load": "numpy.load"}.get(name, name)
        where = f"{filename}:{node.lineno}: {name or 'call'}"
        if name in ALWAYS_UNSAFE or name.split(".")[0] in PICKLE_FAMILY:
            findings.append(f"{where} runs code from data")
        if any(k.arg is None for k in node.keywords) and name in ("torch.load", "numpy.load"):
            findings.append(f"{where} with **kwargs: cannot check it is safe")
        if name == "torch.load":
            loads.append(where)
            if not _is_const(_keyword(node, "weights_only"), True):
                findings.append(f"{where} without weights_only=True")
        if name == "numpy.load":
            loads.append(where)
        allow_pickle = _keyword(node, "allow_pickle")
        if allow_pickle is not None and not _is_const(allow_pickle, False):
            findings.append(f"{where} with allow_pickle not False")
    return findings, loads


@pytest.mark.parametrize(
    "source",
    [
        "eval(text)",
        "exec(code)",
        "import builtins\nbuiltins.eval(text)",
        "from builtins import exec as run\nrun(code)",
        "import pickle\npickle.load(f)",
        "from pickle import loads",
        "import dill",
        "import joblib\njoblib.load(path)",
        "import torch\ntorch.load(path)",
        "torch.load(path, weights_only=False)",
        "torch.load(path, weights_only=flag)",
        "torch.load(path, **options)",
        "import torch as t\nt.load(path, map_location='cpu')",
        "from torch import load\nload(path)",
        "import numpy as np\nnp.load(path, allow_pickle=True)",
        "import numpy\nnumpy.load(path, allow_pickle=flag)",
    ],
)
def test_scan_catches_unsafe_loading(source: str) -> None:
    findings, _ = unsafe_calls(source)
    assert findings, source


@pytest.mark.parametrize(
    "source",
    [
        "model.eval()",
        "torch = require_torch('x')\ntorch.load(path, map_location='cpu', weights_only=True)",
        "import numpy as np\nnp.load(path)",
        "import numpy as np\nnp.load(path, allow_pickle=False)",
        "import ast\nast.literal_eval(text)",
        "import json\njson.loads(text)",
        "import re\nre.compile(pattern)",
    ],
)
def test_scan_allows_safe_loading(source: str) -> None:
    assert unsafe_calls(source)[0] == [], source


def test_no_unsafe_loading_in_the_package() -> None:
    findings, loads = [], []
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20
    for path in files:
        found, seen = unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
        findings += found
        loads += seen
    assert not findings, "\n".join(findings)
    # the scan is not vacuous: it saw the one torch.load there is (gpt2jax/formats/torch_bin.py)
    assert any("torch_bin.py" in where and "torch.load" in where for where in loads), loads


# ---- paths read from files --------------------------------------------------------------------


def _sharded_export(tmp_path: Path) -> tuple[str, str, dict]:
    """A sharded HF export of TINY: ``(directory, index path, index)``."""
    out = str(tmp_path / "hf")
    hf.export_hf(
        random_params(TINY, 1), TINY, out, tokenizer_dir=TOKENIZER_DIR, max_shard_size="20KB"
    )
    index_path = os.path.join(out, "model.safetensors.index.json")
    with open(index_path, encoding="utf-8") as f:
        return out, index_path, json.load(f)


def test_weight_map_cannot_point_outside_the_directory(tmp_path, monkeypatch) -> None:
    out, index_path, index = _sharded_export(tmp_path)
    shard = sorted(set(index["weight_map"].values()))[0]
    # a perfectly valid shard outside the model directory: it must still never be opened
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(os.path.join(out, shard), outside)
    opened: list[str] = []
    real = hf.SafetensorsFile
    monkeypatch.setattr(hf, "SafetensorsFile", lambda p: opened.append(os.fspath(p)) or real(p))

    hostile = [
        "../outside.safetensors",
        str(outside),
        "../../../../../../etc/passwd",
        "/etc/passwd",
        "sub/../" + shard,
        "./" + shard,
        "..",
        ".",
        "",
        7,
        None,
        [shard],
    ]
    for bad in hostile:
        weight_map = {n: (bad if f == shard else f) for n, f in index["weight_map"].items()}
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump({**index, "weight_map": weight_map}, f)
        for read in (hf.read_hf_dir, hf.describe_hf_dir):
            with pytest.raises(CheckpointError) as e:
                read(out)
            assert index_path in str(e.value) and "\n" not in str(e.value), bad
    assert str(outside) not in opened
    assert all(os.path.dirname(p) == out for p in opened), opened


def test_bin_weight_map_cannot_point_outside_the_directory(tmp_path) -> None:
    # checked before torch is even imported: no torch.load of a file outside
    out, index_path, index = _sharded_export(tmp_path)
    for name in set(index["weight_map"].values()) | {os.path.basename(index_path)}:
        os.remove(os.path.join(out, name))
    (tmp_path / "outside.bin").write_bytes(b"not a state dict")
    bin_index = os.path.join(out, "pytorch_model.bin.index.json")
    for bad in ["../outside.bin", str(tmp_path / "outside.bin")]:
        with open(bin_index, "w", encoding="utf-8") as f:
            json.dump({"weight_map": dict.fromkeys(index["weight_map"], bad)}, f)
        with pytest.raises(CheckpointError, match="not a file name") as e:
            hf.read_hf_dir(out)
        assert bin_index in str(e.value)


def _copy_openai(tmp_path: Path, name: str = "openai") -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / "openai_tiny", dst)
    return dst


def test_tf_checkpoint_file_cannot_redirect_outside(tmp_path) -> None:
    src = _copy_openai(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for f in src.glob("model.ckpt.*"):
        shutil.copyfile(f, elsewhere / f.name.replace("model", "evil"))
    for target in [elsewhere / "evil.ckpt", "../elsewhere/evil.ckpt", "/etc/passwd"]:
        (src / "checkpoint").write_text(f'model_checkpoint_path: "{target}"\n', encoding="utf-8")
        prefix = checkpoint_prefix(str(src))
        assert os.path.dirname(prefix) == str(src), (target, prefix)
    read_openai_dir(src)  # and the directory still reads, from its own files


def test_tensor_names_never_become_paths(tmp_path) -> None:
    """A tensor named like a path is refused before anything is written anywhere."""
    src = _copy_openai(tmp_path)
    with BundleReader(src / "model.ckpt") as reader:
        tensors = dict(reader.items())
    tensors["../../escaped"] = np.zeros(3, np.float32)
    write_bundle(src / "model.ckpt", tensors)
    dst = tmp_path / "out" / "model"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match="unexpected 1 tensors"):
        read_openai_dir(src)
    assert cli_main(["convert", str(src), str(dst)]) == 1
    assert set(tmp_path.rglob("*")) == before  # nothing written: no dst, no "escaped"
    assert not list(tmp_path.parent.glob("escaped*"))
