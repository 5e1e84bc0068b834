"""Training run directories: the full configuration, checkpoints, metrics, samples.

Layout::

    runs/poems/
      run.json               {"format": "gpt2jax-run", "format_version": 1, "config": {model
                              shape}, "train": {every TrainConfig field}, ...}: all a resume needs
      encoder.json vocab.bpe the tokenizer files, copied from the starting model
      checkpoints/<step>/    params/ (as in a model directory), opt_state/, meta/ (Checkpoints)
      metrics.jsonl          one JSON object per step and per evaluation
      samples.txt loss.png   text sampled every --sample-every steps; the loss curve
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any

from gpt2jax.config import GPT2Config, read_json
from gpt2jax.errors import CheckpointError, Gpt2JaxError, chain_text
from gpt2jax.errors import reason as _reason
from gpt2jax.files import (
    WriterLock,
    apply_umask,
    check_not_overlapping,
    check_utf8_path,
    umask,
)
from gpt2jax.store.model_dir import TOKENIZER_FILES
from gpt2jax.train.settings import TrainConfig
from gpt2jax.version import __version__

log = logging.getLogger(__name__)

FORMAT = "gpt2jax-run"
FORMAT_VERSION = 1
RUN_JSON = "run.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SAMPLES = "samples.txt"
PLOT = "loss.png"

TRASH = ".deleted"  # checkpoints/.deleted: old checkpoints are renamed here, then deleted
DAMAGED = ".damaged"  # checkpoints/.damaged/<step>: checkpoints that did not restore, kept


def save_concurrent_gb(largest_leaf: int) -> int:
    """orbax's limit on the GB (10^9 bytes) being written at once: room for the largest leaf
    of what is saved, at least 1."""
    return max(1, -(-largest_leaf // 10**9))


def write_json_atomic(path: str, data: Any) -> None:
    """Writes JSON under a temporary name and renames it into place (mode as the umask says)."""
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_new_run(path: str, inputs: tuple[str | None, ...] = ()) -> None:
    """Refuses a directory that already holds a run or anything else, lies inside an input
    (the starting model, a data directory: the run's own files would become data), or cannot
    be written."""
    check_not_overlapping(path, inputs)
    if os.path.exists(os.path.join(path, RUN_JSON)):
        raise Gpt2JaxError(f"{path}: already holds a run; continue it with --resume {path}")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise Gpt2JaxError(f"{path}: exists and is not an empty directory; choose another --out")
    check_writable(path)


def check_writable(path: str) -> None:
    """A clear error, before any training, when no file can be written in ``path`` (or, when it
    does not exist yet, in the directory that would hold it): a read-only or full disk, no
    permission, a file in the way. Found by writing (and removing) a small file, which is the
    only test that sees all of these. A name orbax cannot use (not UTF-8) is refused too."""
    check_utf8_path(path)
    where = os.path.abspath(path)
    while not os.path.exists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise Gpt2JaxError(f"{path}: cannot be created ({where} is a file, not a directory)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".gpt2jax-write-test-", dir=where)
        try:
            os.write(fd, bytes(4096))
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise Gpt2JaxError(f"{path}: cannot write the run there ({where}: {e.strerror})") from None


def create_run(
    path: str,
    config: GPT2Config,
    train: TrainConfig,
    tokenizer_dir: str | None,
    base: dict[str, Any] | None = None,
) -> None:
    """Creates the run directory: ``run.json`` and the tokenizer files. Refuses a used one.

    The directory is filled under a temporary name and renamed into place, so a process killed
    while creating it leaves no run directory rather than one that neither a new start
    (not empty) nor ``--resume`` (no ``run.json``) accepts.
    """
    check_new_run(path)
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
        try:
            if tokenizer_dir is not None:
                for name in TOKENIZER_FILES:
                    src = os.path.join(tokenizer_dir, name)
                    if os.path.exists(src):
                        shutil.copyfile(src, os.path.join(tmp, name))
            write_run_json(tmp, config, train, base=base)
            os.chmod(tmp, 0o777 & ~umask())
            os.rename(tmp, path)  # also replaces an empty directory, which check_new_run allows
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        raise Gpt2JaxError(f"{path}: cannot create the run directory ({e.strerror})") from None


def write_run_json(
    path: str, config: GPT2Config, train: TrainConfig, base: dict[str, Any] | None = None
) -> None:
    """Writes ``run.json``; what an existing one records besides the settings (a LoRA run's
    ``base``) is kept unless ``base`` replaces it."""
    run_json = os.path.join(path, RUN_JSON)
    kept = read_json(run_json) if os.path.exists(run_json) else {}
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "train": train.to_dict(),
        "gpt2jax_version": __version__,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    base = base if base is not None else kept.get("base")
    if base is not None:
        data["base"] = base
    write_json_atomic(run_json, data)


def read_base(path: str) -> dict[str, Any] | None:
    """What ``run.json`` recorded of a LoRA run's base model (None for runs before it was)."""
    base = read_json(os.path.join(path, RUN_JSON)).get("base")
    return base if isinstance(base, dict) else None


def lock_path(path: str) -> str:
    """The writer lock of the run ``path``: ``.<name>.lock`` beside it, so that one path serves
    a run that does not exist yet and one that does."""
    real = os.path.realpath(os.path.abspath(path))
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.lock")


@contextlib.contextmanager
def writer_lock(path: str, resume: bool, enabled: bool = True):
    """Holds the run's writer lock (:class:`gpt2jax.files.WriterLock`) for the block: a second
    ``finetune`` of the same run (new or ``--resume``) refuses at once, naming the first. A run
    to resume must be one; the run directory (or the place it will be created) is checked to be
    writable first."""
    if not enabled:
        yield None
        return
    if resume:
        read_run(path)
    check_writable(path)
    lock = WriterLock(os.path.abspath(path), lock_path(path))
    made = []  # the folders made for the lock: removed again if the run leaves them empty
    folder = os.path.dirname(lock.path)
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        try:
            os.makedirs(os.path.dirname(lock.path), exist_ok=True)
            lock.acquire()
        except OSError as e:
            raise Gpt2JaxError(
                f"{path}: cannot take the writer lock {lock.path} ({e.strerror})"
            ) from None
        if lock.took_over:
            log.info("%s: removed the stale lock of pid %s (no longer running)", path,
                     lock.took_over.get("pid"))  # fmt: skip
        yield lock
    finally:
        lock.release()
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def read_run(path: str) -> tuple[GPT2Config, TrainConfig]:
    """The model config and training settings recorded in ``path/run.json``."""
    run_json = os.path.join(path, RUN_JSON)
    if not os.path.exists(run_json):
        raise CheckpointError(f"{path}: not a training run (no {RUN_JSON})")
    data = read_json(run_json)
    if data.get("format") != FORMAT:
        raise CheckpointError(f'{run_json}: not a gpt2jax run (no "format": "{FORMAT}")')
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{run_json}: format_version {data.get('format_version')!r} is not supported "
            f"(this gpt2jax reads version {FORMAT_VERSION})"
        )
    config = GPT2Config.from_dict(data.get("config"), source=run_json)
    return config, TrainConfig.from_dict(data.get("train") or {}, source=run_json)


class Checkpoints:
    """The run's orbax ``CheckpointManager``: items ``params``, ``opt_state`` and ``meta``.

    Every ``checkpoints/<step>`` directory is a complete checkpoint, whenever the process dies
    (``scripts/kill_test.py`` checks it): orbax writes a step under a temporary name and renames
    it when complete, and removes a step beyond ``keep`` by first renaming it into
    ``checkpoints/.deleted`` (emptied here), never by deleting it in place. A save that fails
    (a full disk) raises a one-line :class:`CheckpointError` naming the step, and the older
    checkpoints are kept.

    With several processes every one of them saves and restores (each writes the shards it
    holds; orbax synchronises them), and only the ``primary`` (process 0) empties the trash.
    """

    def __init__(
        self, run_path: str, keep: int, largest_leaf: int = 0, primary: bool = True
    ) -> None:
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.run_path = run_path
        self.primary = primary
        self.directory = os.path.join(os.path.abspath(run_path), CHECKPOINTS)
        self._saving: int | None = None  # the step of the asynchronous save in flight
        self._failed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,  # what a killed save left behind
            todelete_subdir=TRASH,
        )
        # About one array being written at a time (orbax refuses an array larger than its
        # limit, which is in whole GB). It does not bound the save's memory: TensorStore keeps
        # copies and compressed chunks until the save is done, measured 0.9x the state on the
        # CPU (scripts/bench_save.py, BENCHMARKS.md; gpt2jax.train.memory.planner counts 1x).
        limit = save_concurrent_gb(largest_leaf)
        arrays = lambda: ocp.StandardCheckpointHandler(  # noqa: E731
            save_concurrent_gb=limit, restore_concurrent_gb=limit
        )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    "params": arrays(),
                    "opt_state": arrays(),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )
        except OSError as e:
            raise Gpt2JaxError(f"{run_path}: cannot write checkpoints ({e.strerror})") from None
        self._empty_trash(idle=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save of ``step`` (the arrays must not be donated later).

        Waits for the previous save first: its failure, if it failed, is raised here."""
        args = self._ocp.args
        self._checked(
            step,
            lambda: self.manager.save(
                step,
                args=args.Composite(
                    params=args.StandardSave(params),
                    opt_state=args.StandardSave(opt_state),
                    meta=args.JsonSave(meta),
                ),
                force=True,
            ),
        )
        self._saving = step
        self._empty_trash()  # the steps the previous save replaced

    def restore(self, step: int, params: Any, opt_state: Any) -> tuple[Any, Any, dict[str, Any]]:
        """``(params, opt_state, meta)`` of ``step``; ``params``/``opt_state`` give the structure
        (abstract ``jax.ShapeDtypeStruct`` trees)."""
        args = self._ocp.args
        try:
            out = self.manager.restore(
                step,
                args=args.Composite(
                    params=args.StandardRestore(params),
                    opt_state=args.StandardRestore(opt_state),
                    meta=args.JsonRestore(),
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"{self.directory}/{step}: cannot restore ({_reason(e)})"
            ) from None
        return out.params, out.opt_state, out.meta

    def restore_newest(self, params: Any, opt_state: Any) -> tuple[int, Any, Any, dict] | None:
        """``(step, params, opt_state, meta)`` of the newest checkpoint that restores (None when
        there is none). Newer ones that do not restore (damaged on disk) are each reported in
        one line and moved to ``checkpoints/.damaged/<step>``, kept for inspection, so that the
        run continues from the one that restores and saves over none of them. When none
        restores (an error that is not the checkpoints', say), nothing is moved and the newest
        one's error is raised."""
        failed: list[tuple[int, CheckpointError]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.restore(step, params, opt_state)
            except CheckpointError as e:
                failed.append((step, e))
                continue
            for bad, error in failed:
                moved = os.path.join(self.directory, DAMAGED, str(bad))
                if self.primary:  # one process moves it; every one skips it
                    os.makedirs(os.path.dirname(moved), exist_ok=True)
                    shutil.rmtree(moved, ignore_errors=True)
                    os.rename(os.path.join(self.directory, str(bad)), moved)
                    log.warning("%s; moved to %s, resuming from checkpoint %d", error, moved, step)
            if failed:
                self.manager.reload()
            return (step, *restored)
        if failed:
            raise failed[0][1]
        return None

    def wait(self) -> None:
        """Waits for the save in flight; raises its failure."""
        self._checked(self._saving, self.manager.wait_until_finished)
        self._saving = None
        self._empty_trash(idle=True)

    def close(self) -> None:
        if self._failed:  # already reported: orbax would raise the same failure again
            with contextlib.suppress(Exception):
                self.manager.close()
            return
        self._checked(self._saving, self.manager.close)

    def _checked(self, step: int | None, call: Any) -> None:
        """Runs ``call``; a failed save becomes a one-line :class:`CheckpointError`."""
        try:
            call()
        except Exception as e:
            self._failed = True
            found = re.search(r"/(\d+)\.orbax-checkpoint-tmp", chain_text(e))
            failed = int(found.group(1)) if found else step
            try:
                done = [int(n) for n in os.listdir(self.directory) if n.isdigit()]
            except OSError:
                done = []
            kept = (
                f"checkpoint {max(done)} is the newest complete one and is kept"
                if done
                else "no checkpoint was saved before it"
            )
            raise CheckpointError(
                f"{self.directory}/{failed}: saving the checkpoint failed ({_reason(e)}); {kept}. "
                f"Once that is fixed, continue with: gpt2jax finetune --resume {self.run_path}"
            ) from None

    def _empty_trash(self, idle: bool = False) -> None:
        """Deletes the steps orbax moved aside; ``idle`` (no save in flight, so none is being
        moved there now): the directory too."""
        if not self.primary:
            return
        trash = os.path.join(self.directory, TRASH)
        if os.path.isdir(trash):
            for name in os.listdir(trash):
                shutil.rmtree(os.path.join(trash, name), ignore_errors=True)
            if idle:
                with contextlib.suppress(OSError):
                    os.rmdir(trash)


def latest_step(path: str) -> int:
    """The step of the newest complete checkpoint of the run in ``path``.

    :func:`gpt2jax.loader.describe` calls a directory with ``run.json`` a ``"run"``, and
    :func:`gpt2jax.loader.load` restores this step's parameters from it (:func:`restore_params`).
    """
    ckpt_dir = os.path.join(path, CHECKPOINTS)
    # orbax renames a step's directory to its bare number only once it is complete
    steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(ckpt_dir) else []
    if not steps:
        raise CheckpointError(f"{path}: the run has no checkpoint yet (nothing to load)")
    return max(steps)


def restore_params(path: str, config: GPT2Config, step: int, dtype: Any = None) -> Any:
    """The parameters of checkpoint ``step`` of a run, checked against ``config``.

    Reads the ``params`` item with orbax's handler directly (a checkpoint manager's item
    directory has no checkpoint-level metadata of its own).
    """
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    from gpt2jax.convert.mapping import flatten, our_shapes

    # orbax refuses relative paths (`gpt2jax eval runs/poems`)
    params_dir = epath.Path(os.path.abspath(path)) / CHECKPOINTS / str(step) / "params"
    handler = ocp.StandardCheckpointHandler()
    try:
        stored = handler.metadata(params_dir).tree
        found = {k: tuple(v.shape) for k, v in flatten(stored).items()}
        if found != our_shapes(config):
            raise CheckpointError(
                f"{params_dir}: parameters do not match the run's config in {RUN_JSON}"
            )
        # Onto this process's first device, whatever device count wrote it (an FSDP run's
        # checkpoint is stored sharded over its devices).
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=one), stored
        )
        return handler.restore(params_dir, args=ocp.args.StandardRestore(abstract))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{params_dir}: unreadable ({_reason(e)})") from None
    finally:
        handler.close()


def restore_adapters(path: str, config: GPT2Config, train: TrainConfig, step: int) -> dict:
    """The LoRA adapters checkpoint ``step`` of a LoRA run saved (its ``params`` item)."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    from gpt2jax.lora import init_lora

    params_dir = epath.Path(os.path.abspath(path)) / CHECKPOINTS / str(step) / "params"
    shapes = jax.eval_shape(lambda: init_lora(config, train.memory_settings.lora_rank))
    handler = ocp.StandardCheckpointHandler()
    try:
        adapters = handler.restore(params_dir, args=ocp.args.StandardRestore(shapes))
    except Exception as e:
        raise CheckpointError(f"{params_dir}: unreadable LoRA adapters ({_reason(e)})") from None
    finally:
        handler.close()
    return adapters
