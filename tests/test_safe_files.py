"""What we write never destroys what a user owns; what we read is bounded (gpt2jax.files).

Unit tests of the pieces behind the bad-input corpus's second pass (``tests/test_bad_inputs.py``
runs the commands themselves): the writer lock of a run (live, stale, reused pid, another host),
outputs overlapping inputs, the user's umask on everything written, symlink cycles in globs, the
token cache naming the file passed, and a LoRA run's fingerprint of its base model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess

import numpy as np
import pytest

from conftest import FIXTURES, ROOT
from gpt2jax import files
from gpt2jax.cli import main as cli
from gpt2jax.errors import CheckpointError, Gpt2JaxError
from gpt2jax.loader import load
from gpt2jax.tokenizer import Tokenizer
from gpt2jax.train.data import load_tokens, resolve_paths, safe_glob
from gpt2jax.train.loop import NonFiniteLossError

TINY_MODEL = FIXTURES / "openai_tiny"
MINI = FIXTURES / "bad_inputs" / "bases" / "openai_mini"
ENGLISH = FIXTURES / "english.txt"


def _table():
    spec = importlib.util.spec_from_file_location("bad_input_table", ROOT / "scripts" /
                                                  "bad_input_table.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- one writer per run ------------------------------------------------------------------------


def _lock(tmp_path) -> files.WriterLock:
    return files.WriterLock(str(tmp_path / "run"), str(tmp_path / ".run.lock"))


def _ended_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_lock_refuses_a_live_holder_naming_it_and_is_released(tmp_path):
    with _lock(tmp_path) as held:
        record = held.read()
        assert record["pid"] == os.getpid() and record["host"] == files.host()
        with pytest.raises(Gpt2JaxError, match=rf"in use by .*\(pid {os.getpid()} on "):
            _lock(tmp_path).acquire()
    assert not (tmp_path / ".run.lock").exists()
    (tmp_path / ".run.lock").write_text(json.dumps({"pid": 1, "host": files.host()}))
    with pytest.raises(Gpt2JaxError, match="pid 1 on .*wait for it to end or stop it"):
        _lock(tmp_path).acquire()


def test_lock_of_an_ended_process_or_a_reused_pid_is_taken_over(tmp_path):
    dead = {"pid": _ended_pid(), "host": files.host()}
    (tmp_path / ".run.lock").write_text(json.dumps(dead))
    lock = _lock(tmp_path).acquire()
    assert lock.took_over["pid"] == dead["pid"] and lock.read()["pid"] == os.getpid()
    lock.release()
    # pid 1 is running, but it started at another time than the lock says: a reused pid
    reused = {"pid": 1, "host": files.host(), "ticks": files._start_ticks(1) + 1}
    (tmp_path / ".run.lock").write_text(json.dumps(reused))
    assert _lock(tmp_path).acquire().took_over["pid"] == 1


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / ".run.lock").write_text(json.dumps({"pid": _ended_pid(), "host": "elsewhere"}))
    with pytest.raises(Gpt2JaxError, match=r"on elsewhere.*if that process is gone, delete"):
        _lock(tmp_path).acquire()


# -- outputs and inputs ------------------------------------------------------------------------


def test_outputs_overlapping_inputs_are_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    for out, relation in [(model, "is the input"), (tmp_path, "contains the input"),
                          (model / "sub", "is inside the input"),
                          (tmp_path / "link", "is the input")]:  # fmt: skip
        with pytest.raises(Gpt2JaxError, match=relation):
            files.check_not_overlapping(out, [model])
    files.check_not_overlapping(model / "sub", [], reads=[model])  # a tokenizer's folder
    with pytest.raises(Gpt2JaxError, match="contains the input"):
        files.check_not_overlapping(tmp_path, [], reads=[model])
    files.check_not_overlapping(tmp_path / "other", [model, None])


def test_force_replaces_only_a_model_directory(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(Gpt2JaxError, match="already exists and is not empty"):
        files.check_destination(notes)
    with pytest.raises(Gpt2JaxError, match="--force replaces only a model directory"):
        files.check_destination(notes, overwrite=True)
    (notes / "hparams.json").write_text("{}")
    files.check_destination(notes, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(Gpt2JaxError, match="is a regular file, not a directory"):
        files.check_destination(tmp_path / "file", overwrite=True)
    with pytest.raises(Gpt2JaxError, match="not valid UTF-8"):
        files.check_destination(os.fsdecode(bytes(tmp_path) + b"/out-\xff"), utf8=True)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_get_the_modes_the_users_umask_gives(tmp_path, mask):
    """mkdtemp/mkstemp create 0700/0600; a converted or exported model must be readable by
    whoever the user's umask lets read it (a serving account)."""
    old = os.umask(mask)
    try:
        assert files.umask() == mask
        assert cli.main(["convert", str(TINY_MODEL), str(tmp_path / "ckpt")]) == 0
        assert cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    for top in ("ckpt", "hf"):
        for root, _, names in os.walk(tmp_path / top):
            assert stat.S_IMODE(os.stat(root).st_mode) == 0o777 & ~mask, root
            for name in names:
                path = os.path.join(root, name)
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, path


# -- reads -------------------------------------------------------------------------------------


def test_globs_do_not_follow_symlink_cycles(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.txt").write_text("one")
    (tmp_path / "a" / "b" / "two.txt").write_text("two")
    (tmp_path / "a" / "b" / "loop").symlink_to("..")
    (tmp_path / "a" / ".hidden.txt").write_text("hidden")
    found = resolve_paths([str(tmp_path / "a" / "**" / "*.txt")])
    assert found == [str(tmp_path / "a" / "b" / "two.txt"), str(tmp_path / "a" / "one.txt")]
    # what glob.glob finds where there is no link (names starting with a dot skipped alike)
    import glob

    (tmp_path / "a" / "b" / "loop").unlink()
    for pattern in ("a/**/*.txt", "a/*.txt", "a/*/*.txt", "a/.*", "a/**"):
        full = str(tmp_path / pattern)
        want = {p.rstrip("/") for p in glob.glob(full, recursive=True)} - {str(tmp_path / "a")}
        assert set(safe_glob(full)) - {str(tmp_path / "a")} == want, pattern


def test_non_regular_files_say_what_they_are(tmp_path):
    os.mkfifo(tmp_path / "fifo.txt")
    for path, kind in [(tmp_path / "fifo.txt", "a FIFO"), ("/dev/zero", "a character device")]:
        with pytest.raises(Gpt2JaxError, match=f"is {kind}"):
            resolve_paths([str(path)])
        with pytest.raises(Gpt2JaxError, match=f"is {kind}"):
            files.read_bytes(str(path), 100)
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(Gpt2JaxError, match="larger than 100 bytes"):
        files.read_bytes(str(tmp_path / "big"), 100)


def test_token_cache_reports_the_file_passed(tmp_path):
    """The cache is keyed by content: a copy reuses it, but is reported under its own name."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    shutil.copyfile(ENGLISH, a)
    shutil.copyfile(ENGLISH, b)
    tokenizer = Tokenizer.from_dir(TINY_MODEL)
    first = load_tokens([str(a)], tokenizer, cache_dir=tmp_path / "cache", show_progress=False)
    second = load_tokens([str(b)], tokenizer, cache_dir=tmp_path / "cache", show_progress=False)
    assert second.cached and second.key == first.key
    assert second.name == str(b) and [f["path"] for f in second.files] == [str(b)]


def test_nonfinite_error_names_what_was_not_finite():
    grad = NonFiniteLossError(7, 4.2e13, 6, "RUN", grad_norm=float("inf"))
    assert "step 7: the gradient norm is inf (not finite; the loss was 42000000000000.0)" in str(
        grad
    )
    loss = NonFiniteLossError(7, float("nan"), None, "RUN", grad_norm=float("nan"))
    assert "step 7: the loss is nan (not finite)" in str(loss)


# -- a LoRA run and its base model -------------------------------------------------------------


@pytest.fixture
def lora_run(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(MINI, base)
    run = tmp_path / "run"
    _table().make_run(run, str(base), str(ENGLISH), lora_rank=2)
    return run, base


def test_lora_run_records_its_base_and_refuses_other_weights(lora_run):
    run, base = lora_run
    recorded = json.loads((run / "run.json").read_text())["base"]
    assert recorded["path"] == str(base) and len(recorded["fingerprint"]) == 32
    merged = load(run).params
    os.utime(base / "hparams.json")  # touched, not changed: the weights are hashed again
    np.testing.assert_array_equal(load(run).params["wte"], merged["wte"])
    # other weights under the same name: refused, naming the path, unless allowed
    data = base / "model.ckpt.data-00000-of-00001"
    other = FIXTURES / "bad_inputs" / "cases" / "lora_base_changed"
    shutil.copyfile(other / data.name, data)
    shutil.copyfile(other / "model.ckpt.index", base / "model.ckpt.index")
    with pytest.raises(CheckpointError, match=f"base model {base} as it was then.*other weights"):
        load(run)
    changed = load(run, allow_changed_base=True).params
    assert not np.array_equal(changed["wte"], merged["wte"])
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match=f"needs its base model {base}"):
        load(run)


def test_reading_a_live_run_follows_its_rotation(tmp_path):
    """A reader chose checkpoint 6 as the newest; before it reads it, the writer completes 8 and
    (``--keep``) moves 6 away, as orbax does: the reader reads 8, not a corruption error."""
    from gpt2jax.loader import describe

    run = tmp_path / "run"
    _table().make_run(run, str(TINY_MODEL), str(ENGLISH))
    source = describe(run)
    assert source.step == 6
    shutil.copytree(run / "checkpoints" / "6", run / "checkpoints" / "8")
    (run / "checkpoints" / ".deleted").mkdir()
    os.rename(run / "checkpoints" / "6", run / "checkpoints" / ".deleted" / "6")
    assert load(source).source["step"] == 8
    # a damaged newest one is not mistaken for rotation: one line, naming the older ones
    shutil.rmtree(run / "checkpoints" / "8" / "params" / "ocdbt.process_0")
    with pytest.raises(
        CheckpointError,
        match=r"checkpoints/8/params: unreadable .*older "
        r"checkpoints: 4, 2 \(gpt2jax finetune --resume",
    ):
        load(run)


def test_resume_falls_back_past_damaged_checkpoints_only_when_an_older_one_restores(tmp_path):
    """What ``finetune --resume`` calls: the damaged newest is moved to checkpoints/.damaged
    and the one before is restored; when none restores, nothing is moved."""
    import jax

    from gpt2jax.store import runs
    from gpt2jax.train.memory.build import build
    from gpt2jax.train.optim import learning_rate_schedule

    run = tmp_path / "run"
    _table().make_run(run, str(TINY_MODEL), str(ENGLISH))
    config, train = runs.read_run(str(run))
    s = train.schedule
    schedule = learning_rate_schedule(train.update.lr, s.warmup, s.steps, s.schedule)
    recipe = build(config, train.memory_settings, schedule)
    shapes, _ = recipe.abstract_params()
    opt_shapes = jax.eval_shape(recipe.tx.init, shapes)

    def damage(step: int) -> None:
        shutil.rmtree(run / "checkpoints" / str(step) / "params" / "ocdbt.process_0")

    damage(6)
    ckpts = runs.Checkpoints(str(run), train.logging.keep)
    step, *_ = ckpts.restore_newest(shapes, opt_shapes)
    ckpts.close()
    assert step == 4 and ckpts.latest_step() == 4
    assert sorted(os.listdir(run / "checkpoints")) == [".damaged", "2", "4"]
    damage(4)
    damage(2)
    ckpts = runs.Checkpoints(str(run), train.logging.keep)
    with pytest.raises(CheckpointError, match=r"checkpoints/4: cannot restore"):
        ckpts.restore_newest(shapes, opt_shapes)
    ckpts.close()
    assert sorted(os.listdir(run / "checkpoints")) == [".damaged", "2", "4"]  # nothing moved


def test_a_resume_allowed_to_change_the_base_records_the_new_one(lora_run):
    from gpt2jax.loader import run_base_params
    from gpt2jax.store import runs

    run, base = lora_run
    other = FIXTURES / "bad_inputs" / "cases" / "lora_base_changed"
    for name in ("model.ckpt.data-00000-of-00001", "model.ckpt.index"):
        shutil.copyfile(other / name, base / name)
    config, train = runs.read_run(str(run))
    before = runs.read_base(str(run))
    with pytest.raises(CheckpointError, match="other weights"):
        run_base_params(str(run), train, config, update_record=True)
    assert runs.read_base(str(run)) == before  # refused: nothing recorded
    run_base_params(str(run), train, config, allow_changed_base=True, update_record=True)
    assert runs.read_base(str(run))["fingerprint"] != before["fingerprint"]
    load(run)  # the new base is the run's base now
