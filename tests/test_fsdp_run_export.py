"""A checkpoint written by an FSDP run on 8 devices loads, evaluates and exports on one device.

A subprocess with 8 fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``)
runs ``gpt2jax finetune --parallel fsdp`` (the token embedding is sharded 8 ways there, so
orbax stores it in 8 pieces), then reads the checkpoint back *sharded*, as a resumed FSDP run
would, and writes the values. This process has one device: :func:`gpt2jax.store.runs.restore_params`
must put every parameter on it with exactly those values, and ``gpt2jax export`` must write
them to a Hugging Face directory that loads back equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import FIXTURES, ROOT, TOKENIZER_DIR
from gpt2jax.cli.main import main as cli_main
from gpt2jax.config import GPT2Config
from gpt2jax.convert import mapping
from gpt2jax.loader import load
from gpt2jax.model import init_params
from gpt2jax.store import runs
from gpt2jax.store.model_dir import save_model_dir

pytestmark = pytest.mark.slow  # an 8-device subprocess run: ~90 s on 2 cores

# n_embd 16: wte (50257, 16) splits over 8 devices along its width; the rest is replicated.
CONFIG = GPT2Config(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1)
STEPS = 2

_EIGHT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np, orbax.checkpoint as ocp
    from etils import epath
    from gpt2jax.store import runs
    from gpt2jax.cli.main import main
    from gpt2jax.convert import mapping
    from gpt2jax.model import init_params
    from gpt2jax.train.sharding import FSDP
    model, data, run, out = sys.argv[1:5]
    assert jax.device_count() == 8
    code = main(["finetune", model, "--data", data, "--out", run, "--parallel", "fsdp",
                 "--steps", "STEPS", "--batch-size", "8", "--seq-len", "16", "--lr", "1e-2",
                 "--eval-every", "0", "--sample-every", "0"])
    assert code == 0, code
    config, _ = runs.read_run(run)
    fsdp = FSDP()
    shapes = jax.eval_shape(lambda: init_params(config, 0))
    abstract = fsdp.abstract(shapes)
    path = epath.Path(run) / runs.CHECKPOINTS / "STEPS" / "params"
    params = ocp.StandardCheckpointHandler().restore(path, args=ocp.args.StandardRestore(abstract))
    flat = mapping.flatten(params)
    np.savez(f"{out}/params.npz", **{k: np.asarray(v) for k, v in flat.items()})
    specs = {k: str(v.sharding.spec) for k, v in flat.items()}
    json.dump(specs, open(f"{out}/specs.json", "w"))
    """
).replace("STEPS", str(STEPS))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """``(run dir, the checkpoint's values as read by the 8-device process, their specs)``."""
    tmp = tmp_path_factory.mktemp("fsdp_run")
    model = tmp / "model"
    save_model_dir(model, CONFIG, init_params(CONFIG, 0), tokenizer_dir=TOKENIZER_DIR)
    data = tmp / "train.txt"
    data.write_text((FIXTURES / "english.txt").read_text(encoding="utf-8") * 2, encoding="utf-8")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", _EIGHT, str(model), str(data), str(tmp / "run"), str(tmp)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp / "params.npz") as f:
        values = dict(f)
    return tmp / "run", values, json.loads((tmp / "specs.json").read_text())


def test_fsdp_checkpoint_restores_on_one_device(fsdp_run) -> None:
    run, values, specs = fsdp_run
    assert "fsdp" in specs["wte"], specs  # really written from 8 shards
    assert len(jax.devices()) == 1
    config, _ = runs.read_run(str(run))
    assert config == CONFIG
    step = runs.latest_step(str(run))
    assert step == STEPS
    params = runs.restore_params(str(run), config, step)
    flat = mapping.flatten(params)
    assert set(flat) == set(values)
    for path, x in flat.items():
        assert x.devices() == {jax.local_devices()[0]}, path
        np.testing.assert_array_equal(np.asarray(x), values[path], err_msg=path)
    start = mapping.flatten(init_params(CONFIG, 0))
    assert not np.array_equal(values["wte"], np.asarray(start["wte"]))  # it trained


def test_fsdp_run_exports_and_evaluates_on_one_device(fsdp_run, tmp_path, capsys) -> None:
    run, values, _ = fsdp_run
    hf_dir = tmp_path / "hf"
    assert cli_main(["export", str(run), str(hf_dir)]) == 0
    exported = mapping.flatten(load(hf_dir).params)
    assert set(exported) == set(values)
    for path, x in exported.items():
        np.testing.assert_array_equal(np.asarray(x), values[path], err_msg=path)
    capsys.readouterr()
    text = str(FIXTURES / "english.txt")
    assert cli_main(["eval", str(run), "--data", text, "--seq-len", "16", "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert cli_main(["eval", str(hf_dir), "--data", text, "--seq-len", "16", "--json"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert np.isfinite(from_run["loss"])
    assert from_export["loss"] == pytest.approx(from_run["loss"], rel=1e-6)
