"""gpt2jax params -> an OpenAI-style TensorFlow checkpoint directory, with no TensorFlow.

Writes what OpenAI's ``download_model.py`` fetches (``checkpoint``, ``hparams.json``, the tensor
bundle ``model.ckpt.index`` + ``model.ckpt.data-00000-of-00001`` byte-identical to TF's own, the
tokenizer files) except ``model.ckpt.meta``, which neither OpenAI's scripts nor gpt-2-simple
need (see :func:`export_openai`).

Run as a script from a checkout::

    python convert/openai_export.py ckpt/124M models/my-124M   # = gpt2jax export --format openai
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

from gpt2jax.config import GPT2Config
from gpt2jax.convert import mapping
from gpt2jax.convert.hf_tokenizer import (
    OPENAI_NAMES,
    copy_tokenizer_files,
    write_default_tokenizer_files,
)
from gpt2jax.errors import ConfigError
from gpt2jax.formats.tf_bundle import write_bundle
from gpt2jax.progress import progress_bar
from gpt2jax.store.atomic import atomic_dir

#: OpenAI's model.py hard-codes this epsilon in ``norm``; hparams.json cannot carry another.
OPENAI_EPSILON = 1e-5


def export_openai(
    params: Any,
    config: GPT2Config,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    inputs: tuple[str | os.PathLike | None, ...] | list = (),
) -> list[str]:
    """Writes ``params`` as an OpenAI GPT-2 checkpoint directory at ``out_dir``; returns its files.

    The weights are stored in float32 (OpenAI's graph declares float32 variables, and
    ``Saver.restore`` does not cast). Tokenizer files come from ``tokenizer_dir`` (OpenAI or
    Hugging Face naming), else GPT-2's are rebuilt from tiktoken. The directory is written
    atomically; an existing non-empty one is refused unless ``overwrite``, and one that is,
    holds or lies inside ``inputs`` (the paths the params came from) always::

        checkpoint                       model_checkpoint_path: "model.ckpt"
        hparams.json                     n_vocab, n_ctx, n_embd, n_head, n_layer
        model.ckpt.index                 the tensor bundle (gpt2jax.formats.tf_bundle.write_bundle),
        model.ckpt.data-00000-of-00001   OpenAI's variable names and shapes, float32, in the order
                                         TF's Saver writes them: byte-identical to TF's own files
        encoder.json, vocab.bpe          the tokenizer

    ``model.ckpt.meta`` is a serialized ``MetaGraphDef``: the whole TF graph (every op of the
    model and of the optimizer) as a protobuf, which cannot be written cleanly without
    TensorFlow, so it is left out. Nothing that restores these checkpoints needs it: OpenAI's
    ``src/interactive_conditional_samples.py`` and ``generate_unconditional_samples.py`` build
    the graph in Python (``model.model``), then call ``tf.train.Saver().restore(sess,
    tf.train.latest_checkpoint(dir))``; gpt-2-simple's ``load_gpt2`` and ``finetune`` do the
    same (``tf.compat.v1.train.Saver(...)`` over the variables of the graph they built, then
    ``saver.restore(sess, latest_checkpoint(...))``). ``latest_checkpoint`` reads the
    ``checkpoint`` file and checks that ``model.ckpt.index`` exists, and ``Saver.restore`` reads
    only the index and data files. Only ``tf.train.import_meta_graph`` needs the ``.meta``, and
    neither tool calls it.
    """
    if config.layer_norm_epsilon != OPENAI_EPSILON:
        raise ConfigError(
            f"layer_norm_epsilon={config.layer_norm_epsilon} cannot be exported to OpenAI's "
            f"format: its code fixes epsilon at {OPENAI_EPSILON}"
        )
    total = config.num_params() * 4
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs, reads=[tokenizer_dir]) as tmp:
        # Tokenizer first: if it cannot be had (offline, no files) nothing big was written yet.
        if tokenizer_dir is None or not copy_tokenizer_files(tokenizer_dir, tmp, OPENAI_NAMES):
            write_default_tokenizer_files(tmp, OPENAI_NAMES)
        with progress_bar(total, "exporting", unit="B", enabled=show_progress) as bar:
            # TF's Saver writes variables sorted by name; so do we, which makes the index and
            # data files byte-identical to TensorFlow's for the same weights. The dict holds
            # views into params (no copies); each tensor is cast and written one at a time.
            views = dict(mapping.to_theirs(params, config, "openai"))

            def stream():
                for name in sorted(views):
                    value = np.asarray(views.pop(name)).astype(np.float32, copy=False)
                    yield name, value
                    bar.update(value.nbytes)

            write_bundle(os.path.join(tmp, "model.ckpt"), stream())
        with open(os.path.join(tmp, "hparams.json"), "w", encoding="utf-8") as f:
            json.dump(config.to_hparams(), f, indent=2)
            f.write("\n")
        # The CheckpointState text proto that tf.train.latest_checkpoint reads; relative paths
        # are resolved against this directory, so the checkpoint can be moved.
        with open(os.path.join(tmp, "checkpoint"), "w", encoding="utf-8") as f:
            f.write('model_checkpoint_path: "model.ckpt"\n')
            f.write('all_model_checkpoint_paths: "model.ckpt"\n')
        files = sorted(os.listdir(tmp))
    return files


if __name__ == "__main__":  # run as a file, this is the CLI's module __main__, not a library one
    from gpt2jax.cli.main import script_main

    sys.exit(script_main("openai_export", sys.argv[1:]))
