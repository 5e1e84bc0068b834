"""``gpt2jax.load``: one entry point for every kind of model directory.

``load(path)`` accepts a gpt2jax model directory (what ``gpt2jax convert`` writes), an OpenAI
checkpoint directory or a Hugging Face GPT-2 directory (both converted in memory), detected from
the files present, and returns a
:class:`Pretrained`: the config, the params pytree, the tokenizer and a jitted ``logits``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.checkpoint import detect, read_meta, restore_params
from gpt2jax.config import GPT2Config
from gpt2jax.errors import Gpt2JaxError
from gpt2jax.hub import resolve_model
from gpt2jax.model import GPT2
from gpt2jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Pretrained:
    """A loaded model: ``config``, ``params`` (OpenAI-named pytree), ``tokenizer``.

    ``compute_dtype`` is what :meth:`logits` computes in; ``params`` keep the dtype they were
    loaded in. ``source`` says where the model came from (for ``gpt2jax info``).
    """

    config: GPT2Config
    params: Any
    tokenizer: Tokenizer
    path: str
    kind: str
    compute_dtype: Any = jnp.float32
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def module(self) -> GPT2:
        """The Flax module: ``m.module.apply({"params": m.params}, ids)``."""
        return GPT2(self.config, dtype=self.compute_dtype)

    def encode(self, text: str) -> np.ndarray:
        """Token ids ``(T,)`` int32 of ``text``."""
        return np.asarray(self.tokenizer.encode(text), dtype=np.int32)

    def decode(self, ids: Any) -> str:
        """Text of token ids of any shape (flattened); invalid UTF-8 becomes U+FFFD."""
        return self.tokenizer.decode(np.asarray(ids).reshape(-1).tolist())

    def logits(self, ids: Any) -> jax.Array:
        """Next-token logits, float32: ``(T, V)`` for ids ``(T,)``, ``(B, T, V)`` for ``(B, T)``."""
        ids = jnp.asarray(ids, jnp.int32)
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise Gpt2JaxError(f"logits expects token ids of shape (T,) or (B, T), got {ids.shape}")
        if ids.shape[-1] > self.config.n_ctx:
            raise Gpt2JaxError(
                f"{ids.shape[-1]} tokens exceed the model's context of {self.config.n_ctx}"
            )
        out = _logits_fn(self.config, self.compute_dtype)(self.params, jnp.atleast_2d(ids))
        return out[0] if ids.ndim == 1 else out


@functools.cache
def _logits_fn(config: GPT2Config, dtype: Any):
    model = GPT2(config, dtype=dtype)
    return jax.jit(lambda params, ids: model.apply({"params": params}, ids))


def load(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    compute_dtype: Any = jnp.float32,
) -> Pretrained:
    """Loads a model directory (gpt2jax, OpenAI TF or Hugging Face), detected from its files.

    Args:
        path: the directory, or one of OpenAI's sizes ("124M", ...): its download cache,
            downloaded on first use (see :func:`gpt2jax.hub.resolve_model`).
        dtype: parameter dtype to load into (default: as stored for gpt2jax directories,
            float32 for OpenAI and Hugging Face ones).
        compute_dtype: dtype :meth:`Pretrained.logits` computes in.
    """
    path = resolve_model(path)
    kind = detect(path)
    if kind == "gpt2jax":
        meta = read_meta(path)
        config = meta["config"]
        params = restore_params(os.path.join(path, "params"), config, dtype=dtype)
        source = meta.get("source", {})
    elif kind == "openai":
        from gpt2jax.convert.openai_tf import read_openai_dir

        config, params = read_openai_dir(path, dtype=dtype or np.float32)
        source = {"format": "openai-tf", "path": os.path.abspath(path)}
    elif kind == "hf":
        from gpt2jax.convert.hf import read_hf_dir
        from gpt2jax.convert.hf_tokenizer import load_tokenizer

        config, params = read_hf_dir(path, dtype=dtype or np.float32)
        source = {"format": "hf", "path": os.path.abspath(path)}
        hf_tokenizer = load_tokenizer(path)  # vocab.json + merges.txt, or tokenizer.json
    elif kind == "run":
        from gpt2jax import runs

        config, train = runs.read_run(path)
        step = runs.latest_step(path)  # a training run loads as its newest checkpoint
        if train.lora_rank:  # its checkpoints hold adapters: merged into the starting model
            from gpt2jax.lora import restore_run

            params = restore_run(path, config, train, step, dtype=dtype)
        else:
            params = runs.restore_params(path, config, step, dtype=dtype)
        source = {"format": "gpt2jax-run", "path": os.path.abspath(path), "step": step}
    else:
        raise Gpt2JaxError(f"{path}: loading a {kind!r} directory is not supported yet")
    return Pretrained(
        config=config,
        params=params,
        tokenizer=hf_tokenizer if kind == "hf" else Tokenizer.from_dir(path),
        path=path,
        kind=kind,
        compute_dtype=compute_dtype,
        source=source,
    )
