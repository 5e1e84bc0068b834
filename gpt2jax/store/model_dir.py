"""gpt2jax model directories: what ``gpt2jax convert`` writes and :func:`gpt2jax.load` reads.

Layout (written atomically, :mod:`gpt2jax.store.atomic`)::

    ckpt/124M/
      config.json          {"format": "gpt2jax", "format_version": 1, "config": {...},
                            "dtype": "float32", "num_params": ..., "source": {...}}
      params/              the parameter tree, an orbax checkpoint (``convert`` writes it
                           directly: :mod:`gpt2jax.store.orbax_layout`)
      encoder.json         the tokenizer files (copied from the source, when it had them)
      vocab.bpe
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gpt2jax.config import GPT2Config, read_json
from gpt2jax.dtypes import STORAGE
from gpt2jax.errors import CheckpointError, Gpt2JaxError, reason
from gpt2jax.files import kind_of
from gpt2jax.store.atomic import atomic_dir

FORMAT = "gpt2jax"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
TOKENIZER_FILES = ("encoder.json", "vocab.bpe")


def dtype_name(dtype: Any) -> str:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` for ``dtype``; anything else is an error."""
    name = np.dtype(dtype).name
    if name not in STORAGE:
        raise Gpt2JaxError(f"unsupported parameter dtype {name}; use one of {', '.join(STORAGE)}")
    return name


def detect(path: str | os.PathLike) -> str:
    """What kind of model directory ``path`` is: ``gpt2jax``, ``openai``, ``hf`` or ``run``.

    Raises a clear error when it is none of them.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        what = kind_of(os.stat(path).st_mode)
        raise CheckpointError(f"{path}: is {what}, expected a model directory")
    cfg = os.path.join(path, "config.json")
    if os.path.exists(cfg):
        data = read_json(cfg)
        if data.get("format") == FORMAT:
            return "gpt2jax"
        if "model_type" in data:
            return "hf"
    if os.path.exists(os.path.join(path, "run.json")):
        return "run"
    if os.path.exists(os.path.join(path, "hparams.json")) or any(
        f.endswith(".index") for f in os.listdir(path)
    ):
        return "openai"
    raise CheckpointError(
        f"{path}: not a model directory (no gpt2jax config.json, OpenAI hparams.json + "
        "model.ckpt.index, Hugging Face config.json, or training run.json)"
    )


def save_model_dir(
    path: str | os.PathLike,
    config: GPT2Config,
    params: Any,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    source: dict[str, Any] | None = None,
    dtype: Any = None,
    overwrite: bool = False,
    inputs: tuple[str | os.PathLike, ...] = (),
) -> None:
    """Writes a model directory atomically. ``params`` may hold numpy or jax arrays.

    ``dtype`` casts the parameters (default: keep their dtype). Tokenizer files are copied from
    ``tokenizer_dir`` when it has them. ``path`` must not overlap ``inputs`` or
    ``tokenizer_dir`` (:func:`gpt2jax.store.atomic.atomic_dir`).
    """
    import jax

    if dtype is not None:
        params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
    leaves = jax.tree.leaves(params)
    names = {dtype_name(x.dtype) for x in leaves}
    write_model_dir(
        path,
        config,
        lambda params_dir: save_params(params_dir, params),
        dtype=names.pop() if len(names) == 1 else "mixed",
        num_params=int(sum(np.prod(x.shape) for x in leaves)),
        tokenizer_dir=tokenizer_dir,
        source=source,
        overwrite=overwrite,
        inputs=inputs,
    )


def write_model_dir(
    path: str | os.PathLike,
    config: GPT2Config,
    write_params: Callable[[str], None],
    *,
    dtype: str,
    num_params: int,
    tokenizer_dir: str | os.PathLike | None = None,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
    inputs: tuple[str | os.PathLike, ...] = (),
) -> None:
    """Writes a model directory atomically, its parameters by ``write_params(params_dir)``
    (:func:`save_params`, or a converter streaming them); ``dtype`` is their dtype's name.
    An error writing them (a full disk) is one line naming ``path``."""
    with atomic_dir(
        path, overwrite=overwrite, inputs=inputs, reads=[tokenizer_dir], utf8=True
    ) as tmp:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "dtype": dtype,
            "num_params": num_params,
            "source": source or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            write_params(os.path.join(tmp, PARAMS_DIR))
        except CheckpointError as e:  # named as the user named it, not as the temporary copy
            raise CheckpointError(str(e).replace(tmp, os.path.abspath(path))) from None
        except OSError as e:
            raise CheckpointError(
                f"{os.path.abspath(path)}: writing the parameters failed ({reason(e)})"
            ) from None
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, name)
                if os.path.exists(src):
                    shutil.copyfile(src, os.path.join(tmp, name))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")


def save_params(params_dir: str, params: Any) -> None:
    """Saves a params pytree with orbax, streaming it without extra copies.

    Orbax's defaults deep-copy host arrays and zstd-compress every chunk: for a converted
    checkpoint that is twice the memory and five times the time, for almost no saving on
    disk (float weights barely compress). Here numpy leaves are written as they are, jax
    arrays through orbax's array handler, uncompressed; the directory restores with any orbax
    checkpointer (``restore_params`` uses ``StandardCheckpointer``).
    """
    import jax
    import orbax.checkpoint as ocp

    handlers = ocp.type_handlers
    # Older orbax (0.11.24, of the jax 0.7.2 that Colab ships) has neither option: it copies
    # host arrays (a save holds them twice) and does not compress.
    registry = handlers.create_type_handler_registry(
        (np.ndarray, handlers.NumpyHandler(**_accepted(handlers.NumpyHandler,
                                                       deepcopy_host_arrays=False))),
        (jax.Array, handlers.ArrayHandler()),
    )  # fmt: skip
    handler = ocp.PyTreeCheckpointHandler(
        type_handler_registry=registry,
        **_accepted(ocp.PyTreeCheckpointHandler, use_compression=False),
    )

    def save() -> None:
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(os.path.abspath(params_dir), args=ocp.args.PyTreeSave(params))

    try:
        interruptible(save)
    except Exception as e:  # a full disk: orbax / TensorStore errors, many lines each
        raise CheckpointError(
            f"{os.path.dirname(os.path.abspath(params_dir))}: writing the parameters failed "
            f"({reason(e)})"
        ) from None


def interruptible(work: Any) -> None:
    """Runs ``work()`` on a daemon thread while this one waits in short steps: orbax waits for
    TensorStore in C++, where Ctrl-C (or SIGTERM turned into an exception) would only be seen
    once the whole save is done, minutes for the big models. Its exception is raised here."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # handed to the waiting thread
            failure.append(e)

    worker = threading.Thread(target=run, name="gpt2jax-save", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if failure:
        raise failure[0]


def _accepted(cls: Any, **options: Any) -> dict[str, Any]:
    """The ``options`` that ``cls`` (of the installed orbax version) takes."""
    parameters = inspect.signature(cls).parameters
    return {k: v for k, v in options.items() if k in parameters}


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a gpt2jax model directory, validated."""
    cfg_path = os.path.join(path, "config.json")
    meta = read_json(cfg_path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f'{cfg_path}: not a gpt2jax model config (no "format": "gpt2jax")')
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: format_version {meta.get('format_version')!r} is not supported "
            f"(this gpt2jax reads version {FORMAT_VERSION})"
        )
    meta["config"] = GPT2Config.from_dict(meta.get("config"), source=cfg_path)
    return meta


def restore_params(
    params_dir: str | os.PathLike,
    config: GPT2Config,
    dtype: Any = None,
    sharding: Any = None,
) -> Any:
    """Restores an orbax params tree, checking it against ``config``.

    ``dtype`` casts on restore (default: as stored). ``sharding`` is a pytree of shardings (or
    one sharding for every leaf): the arrays are then restored straight onto devices; without it
    they come back as numpy arrays in host memory.
    """
    import jax
    import orbax.checkpoint as ocp

    from gpt2jax.convert.mapping import flatten, our_shapes

    params_dir = os.path.abspath(os.fspath(params_dir))
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir}: missing (the model directory has no params)")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(params_dir).item_metadata.tree
    except Exception as e:
        raise CheckpointError(f"{params_dir}: unreadable orbax checkpoint ({reason(e)})") from None
    expected = our_shapes(config)
    found = {k: tuple(v.shape) for k, v in flatten(stored).items()}
    if found != expected:
        diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise CheckpointError(
            f"{params_dir}: parameters do not match config.json (first mismatch: {diff[0]}: "
            f"stored {found.get(diff[0])}, expected {expected.get(diff[0])})"
        )

    def target(meta, shard):
        return jax.ShapeDtypeStruct(meta.shape, dtype or meta.dtype, sharding=shard)

    if sharding is None or not isinstance(sharding, dict):
        abstract = jax.tree.map(lambda m: target(m, sharding), stored)
    else:
        abstract = jax.tree.map(target, stored, sharding)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(params_dir, abstract)
    except Exception as e:
        raise CheckpointError(
            f"{params_dir}: restoring the parameters failed ({reason(e)})"
        ) from None
