"""OpenAI's TensorFlow GPT-2 checkpoints -> gpt2jax, with no TensorFlow.

An OpenAI model directory holds ``checkpoint``, ``hparams.json``, ``model.ckpt.index``,
``model.ckpt.data-00000-of-00001``, ``model.ckpt.meta``, ``encoder.json`` and ``vocab.bpe``.
The tensors are read straight from the tensor bundle (:mod:`gpt2jax.formats.tf_bundle`),
CRC-checked, and placed by the table in :mod:`gpt2jax.convert.mapping`: into stacked arrays
(:func:`read_openai_dir`), or streamed to a model directory's files (:func:`convert_openai_dir`).

Run as a script from a checkout::

    python convert/openai_tf.py models/124M ckpt/124M
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from gpt2jax.config import GPT2Config, read_json
from gpt2jax.convert import mapping
from gpt2jax.errors import CheckpointError
from gpt2jax.files import read_bytes
from gpt2jax.formats.tf_bundle import BundleReader
from gpt2jax.progress import progress_bar
from gpt2jax.store.orbax_layout import OrbaxLayoutWriter


def checkpoint_prefix(path: str) -> str:
    """The tensor-bundle prefix of an OpenAI directory: from its ``checkpoint`` file, else
    ``model.ckpt``, else the only ``*.index`` file there."""
    state = os.path.join(path, "checkpoint")
    if os.path.exists(state):
        try:
            text = read_bytes(state, 1 << 20, CheckpointError).decode("utf-8", "replace")
        except OSError as e:
            raise CheckpointError(f"{state}: cannot read ({e.strerror})") from None
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model_checkpoint_path":
                name = os.path.basename(value.strip().strip('"'))
                if os.path.exists(os.path.join(path, name + ".index")):
                    return os.path.join(path, name)
    if os.path.exists(os.path.join(path, "model.ckpt.index")):
        return os.path.join(path, "model.ckpt")
    indexes = sorted(f for f in os.listdir(path) if f.endswith(".index"))
    if len(indexes) == 1:
        return os.path.join(path, indexes[0][: -len(".index")])
    raise CheckpointError(
        f"{path}: no TensorFlow checkpoint (expected model.ckpt.index and model.ckpt.data-*)"
    )


def read_hparams(path: str | os.PathLike) -> GPT2Config:
    """The config in an OpenAI directory's ``hparams.json`` (no weights read)."""
    hparams_path = os.path.join(os.fspath(path), "hparams.json")
    if not os.path.exists(hparams_path):
        raise CheckpointError(
            f"{hparams_path}: file not found (every OpenAI model directory has one)"
        )
    return GPT2Config.from_hparams(read_json(hparams_path), source=hparams_path)


def _open_checked(path: str, config: GPT2Config) -> BundleReader:
    """The checkpoint's reader, once every tensor's name, shape and dtype is checked against
    ``hparams.json`` (nothing is read yet)."""
    prefix = checkpoint_prefix(path)
    reader = BundleReader(prefix)
    try:
        source = f"{prefix}.index"
        names = set(reader.names())
        # OpenAI's checkpoints hold exactly the model's variables; fail clearly on others.
        mapping.check_names(names, config, "openai", source)
        shapes = {n: reader.shape(n) for n in names}
        mapping.check_shapes(shapes, config, "openai", source, os.path.join(path, "hparams.json"))
        mapping.check_float({n: reader.dtype(n).name for n in names}, source)
    except BaseException:
        reader.close()
        raise
    return reader


def _nbytes(reader: BundleReader) -> int:
    return sum(math.prod(reader.shape(n)) * reader.dtype(n).itemsize for n in reader.names())


def read_openai_dir(
    path: str | os.PathLike, dtype: Any = np.float32, show_progress: bool = False
) -> tuple[GPT2Config, dict]:
    """Reads an OpenAI GPT-2 checkpoint directory into ``(config, params)`` (numpy, ``dtype``).

    Every tensor's name and shape is checked against ``hparams.json`` before anything is read,
    and every tensor's CRC32C as it is read, straight into its place in the stacked arrays.
    """
    path = os.fspath(path)
    config = read_hparams(path)
    with _open_checked(path, config) as reader:
        total = _nbytes(reader)
        with progress_bar(total, "converting", unit="B", enabled=show_progress) as bar:
            params = mapping.from_theirs(
                reader.read, config, "openai", dtype, bar.update, functools.partial(_into, reader)
            )
    return config, params


def _into(reader: BundleReader, name: str, out: np.ndarray) -> bool:
    """Reads tensor ``name`` into ``out`` when it is stored in ``out``'s dtype."""
    if reader.dtype(name) != out.dtype:
        return False
    reader.read_into(name, out)
    return True


def stream_openai_params(
    reader: BundleReader,
    config: GPT2Config,
    params_dir: str,
    dtype: Any = np.float32,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Writes the checkpoint's tensors as our params tree, an orbax checkpoint at
    ``params_dir`` (:mod:`gpt2jax.store.orbax_layout`), without holding it: each tensor's
    bytes go from the bundle straight to their place in the leaf's file (cast to ``dtype``
    on the way when it differs), CRC-checked on threads while the next ones are read."""
    out = np.dtype(dtype)
    shapes = mapping.our_shapes(config)
    with OrbaxLayoutWriter(params_dir, {path: (s, out) for path, s in shapes.items()}) as writer:
        sinks = {}
        for ours, name, layer, _ in mapping.placements(config, "openai"):
            stored = reader.dtype(name)
            # a layer's slice of a stacked leaf starts at layer * (elements per layer)
            start = 0 if layer is None else layer * math.prod(shapes[ours][1:])
            sinks[name] = functools.partial(_place, writer, ours, start, stored, out)
        reader.copy_tensors(sinks, progress=progress)


def _place(
    writer: OrbaxLayoutWriter,
    leaf: str,
    start: int,
    stored: np.dtype,
    out: np.dtype,
    offset: int,
    data: np.ndarray,
) -> None:
    """Writes the bytes ``data`` of a tensor (from byte ``offset`` on, in the ``stored`` dtype)
    at element ``start`` of ``leaf``, cast to ``out`` as ``from_theirs`` casts (numpy's)."""
    if stored != out:
        data = data.view(stored).astype(out).view(np.uint8)
    writer.write(leaf, (start + offset // stored.itemsize) * out.itemsize, data)


def convert_openai_dir(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: Any = np.float32,
    overwrite: bool = False,
    show_progress: bool = False,
) -> GPT2Config:
    """Converts an OpenAI checkpoint directory into a gpt2jax model directory at ``dst``,
    streaming the tensors to disk (:func:`stream_openai_params`): jax and orbax are not
    imported, and memory holds a few pieces of tensors, not the model."""
    from gpt2jax.files import check_destination
    from gpt2jax.store.model_dir import TOKENIZER_FILES, dtype_name, write_model_dir
    from gpt2jax.tokenizer import Tokenizer

    src = os.fspath(src)
    check_destination(dst, overwrite=overwrite, inputs=[src], utf8=True)  # before any work
    config = read_hparams(src)
    if any(os.path.exists(os.path.join(src, name)) for name in TOKENIZER_FILES):
        # files that disagree, or a vocabulary of another size, are refused now, not when
        # loading DST
        tokenizer = Tokenizer.from_dir(src)
        tokenizer.check_model_vocab(config.n_vocab, os.path.join(src, "hparams.json"))
    with _open_checked(src, config) as reader:
        total = _nbytes(reader)
        with progress_bar(total, "converting", unit="B", enabled=show_progress) as bar:
            write_model_dir(
                dst,
                config,
                lambda params_dir: stream_openai_params(
                    reader, config, params_dir, dtype, bar.update
                ),
                dtype=dtype_name(dtype),
                num_params=config.num_params(),
                tokenizer_dir=src,
                source={"format": "openai-tf", "path": os.path.abspath(src)},
                overwrite=overwrite,
                inputs=[src],
            )
    return config


if __name__ == "__main__":  # run as a file, this is the CLI's module __main__, not a library one
    from gpt2jax.cli.main import script_main

    sys.exit(script_main("openai_tf", sys.argv[1:]))
