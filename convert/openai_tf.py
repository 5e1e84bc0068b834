"""OpenAI's TensorFlow GPT-2 checkpoints -> gpt2jax, with no TensorFlow.

An OpenAI model directory holds ``checkpoint``, ``hparams.json``, ``model.ckpt.index``,
``model.ckpt.data-00000-of-00001``, ``model.ckpt.meta``, ``encoder.json`` and ``vocab.bpe``.
The tensors are read straight from the tensor bundle (:mod:`gpt2jax.formats.tf_bundle`), one at
a time and CRC-checked, and placed by the table in :mod:`gpt2jax.convert.mapping`.

Run as a script from a checkout::

    python convert/openai_tf.py models/124M ckpt/124M
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from gpt2jax.config import GPT2Config, read_json
from gpt2jax.convert import mapping
from gpt2jax.errors import CheckpointError
from gpt2jax.files import read_bytes
from gpt2jax.formats.tf_bundle import BundleReader
from gpt2jax.progress import progress_bar


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


def read_openai_dir(
    path: str | os.PathLike, dtype: Any = np.float32, show_progress: bool = False
) -> tuple[GPT2Config, dict]:
    """Reads an OpenAI GPT-2 checkpoint directory into ``(config, params)`` (numpy, ``dtype``).

    Every tensor's name and shape is checked against ``hparams.json`` before anything is read,
    and every tensor's CRC32C as it is read.
    """
    path = os.fspath(path)
    hparams_path = os.path.join(path, "hparams.json")
    config = read_hparams(path)
    prefix = checkpoint_prefix(path)
    with BundleReader(prefix) as reader:
        source = f"{prefix}.index"
        names = set(reader.names())
        # OpenAI's checkpoints hold exactly the model's variables; fail clearly on others.
        mapping.check_names(names, config, "openai", source)
        shapes = {n: reader.shape(n) for n in names}
        mapping.check_shapes(shapes, config, "openai", source, hparams_path)
        mapping.check_float({n: reader.dtype(n).name for n in names}, source)
        total = sum(int(np.prod(s)) * reader.dtype(n).itemsize for n, s in shapes.items())
        with progress_bar(total, "converting", unit="B", enabled=show_progress) as bar:
            params = mapping.from_theirs(reader.read, config, "openai", dtype, bar.update)
    return config, params


def convert_openai_dir(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: Any = np.float32,
    overwrite: bool = False,
    show_progress: bool = False,
) -> GPT2Config:
    """Converts an OpenAI checkpoint directory into a gpt2jax model directory at ``dst``."""
    from gpt2jax.files import check_destination
    from gpt2jax.store.model_dir import TOKENIZER_FILES, save_model_dir
    from gpt2jax.tokenizer import Tokenizer

    check_destination(dst, overwrite=overwrite, inputs=[src], utf8=True)  # before any work
    if any(os.path.exists(os.path.join(src, name)) for name in TOKENIZER_FILES):
        # files that disagree, or a vocabulary of another size, are refused now, not when
        # loading DST
        tokenizer = Tokenizer.from_dir(src)
        tokenizer.check_model_vocab(read_hparams(src).n_vocab, os.path.join(src, "hparams.json"))
    config, params = read_openai_dir(src, dtype=dtype, show_progress=show_progress)
    save_model_dir(
        dst,
        config,
        params,
        tokenizer_dir=src,
        source={"format": "openai-tf", "path": os.path.abspath(os.fspath(src))},
        overwrite=overwrite,
        inputs=[src],
    )
    return config


if __name__ == "__main__":  # run as a file, this is the CLI's module __main__, not a library one
    from gpt2jax.cli.main import script_main

    sys.exit(script_main("openai_tf", sys.argv[1:]))
