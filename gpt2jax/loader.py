"""Model directories in: :func:`describe` says what one is, :func:`load` loads it.

A path names a gpt2jax model directory (what ``gpt2jax convert`` writes), an OpenAI TF
checkpoint, a Hugging Face GPT-2 directory or a training run, told apart by their files (see
:func:`gpt2jax.store.model_dir.detect`); a size name ("124M") means the download cache. Every
command that takes a model asks :func:`describe` (no weights read), and :func:`load` returns
a :class:`Pretrained`: the config, the params pytree, the tokenizer and a jitted ``logits``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import lora
from gpt2jax.config import GPT2Config
from gpt2jax.convert.hf import describe_hf_dir, read_hf_config, read_hf_dir
from gpt2jax.convert.hf_tokenizer import load_tokenizer
from gpt2jax.convert.openai_tf import read_hparams, read_openai_dir
from gpt2jax.errors import Gpt2JaxError
from gpt2jax.model import GPT2, init_params
from gpt2jax.store import runs
from gpt2jax.store.model_dir import detect, read_meta, restore_params
from gpt2jax.store.sizes import resolve_model
from gpt2jax.tokenizer import Tokenizer
from gpt2jax.train.settings import TrainConfig

#: Tokenizer file pairs a model directory may hold, in the order they are looked for.
TOKENIZER_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What a model path is, read without loading any weight (:func:`describe`).

    ``path`` is the directory (a size name resolved to its download cache), ``kind`` one of
    ``gpt2jax``, ``openai``, ``hf``, ``run``. ``dtype`` is the stored parameter dtype where the
    directory's config says it (None for Hugging Face: see :meth:`hf_weights`). ``meta`` is a
    gpt2jax directory's ``config.json``; ``train`` and ``step`` a run's settings and newest
    checkpoint (None before the first). ``tokenizer`` is the pair of tokenizer files present.
    """

    path: str
    kind: str
    config: GPT2Config
    dtype: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: TrainConfig | None = None
    step: int | None = None
    tokenizer: tuple[str, str] | None = None

    def hf_weights(self) -> dict[str, Any]:
        """A Hugging Face directory's stored ``dtype`` and weight ``files`` (headers only)."""
        return describe_hf_dir(self.path)


def describe(path: str | os.PathLike) -> ModelSource:
    """What ``path`` (a model directory or a size name) is: its kind, config and files.

    Only the small files are read (configs, ``run.json``); a size name is downloaded first if
    its cache is not complete. Raises a clear error for anything that is not a model.
    """
    path = resolve_model(path)  # a size name ("124M") means the download cache
    kind = detect(path)
    fields: dict[str, Any] = {}
    if kind == "gpt2jax":
        meta = read_meta(path)
        fields.update(config=meta["config"], dtype=meta["dtype"], meta=meta)
    elif kind == "openai":
        fields.update(config=read_hparams(path), dtype="float32")
    elif kind == "hf":
        fields.update(config=read_hf_config(path))
    elif kind == "run":
        config, train = runs.read_run(path)
        try:
            step = runs.latest_step(path)
        except Gpt2JaxError:
            step = None  # no checkpoint yet
        fields.update(config=config, dtype="float32", train=train, step=step)
    else:
        raise Gpt2JaxError(f"{path}: {kind!r} directories are not supported")
    tokenizer = next(
        (pair for pair in TOKENIZER_PAIRS if os.path.exists(os.path.join(path, pair[0]))), None
    )
    return ModelSource(path=path, kind=kind, tokenizer=tokenizer, **fields)


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
    path: str | os.PathLike | ModelSource,
    *,
    dtype: Any = None,
    compute_dtype: Any = jnp.float32,
) -> Pretrained:
    """Loads a model directory (gpt2jax, OpenAI TF or Hugging Face), detected from its files.

    Args:
        path: the directory, or one of OpenAI's sizes ("124M", ...): its download cache,
            downloaded on first use (see :func:`gpt2jax.store.sizes.resolve_model`); or what
            :func:`describe` said of one.
        dtype: parameter dtype to load into (default: as stored for gpt2jax directories,
            float32 for OpenAI and Hugging Face ones).
        compute_dtype: dtype :meth:`Pretrained.logits` computes in.
    """
    src = path if isinstance(path, ModelSource) else describe(path)
    path, kind = src.path, src.kind
    tokenizer = None
    if kind == "gpt2jax":
        config = src.config
        params = restore_params(os.path.join(path, "params"), config, dtype=dtype)
        source = src.meta.get("source", {})
    elif kind == "openai":
        config, params = read_openai_dir(path, dtype=dtype or np.float32)
        source = {"format": "openai-tf", "path": os.path.abspath(path)}
    elif kind == "hf":
        config, params = read_hf_dir(path, dtype=dtype or np.float32)
        source = {"format": "hf", "path": os.path.abspath(path)}
        tokenizer = load_tokenizer(path)  # vocab.json + merges.txt, or tokenizer.json
    elif kind == "run":
        config, train = src.config, src.train
        # a training run loads as its newest checkpoint (this raises when there is none)
        step = src.step if src.step is not None else runs.latest_step(path)
        if (
            train.memory_settings.lora_rank
        ):  # its checkpoints hold adapters: merged into the starting model
            params = restore_lora_run(path, config, train, step, dtype=dtype)
        else:
            params = runs.restore_params(path, config, step, dtype=dtype)
        source = {"format": "gpt2jax-run", "path": os.path.abspath(path), "step": step}
    else:
        raise Gpt2JaxError(f"{path}: loading a {kind!r} directory is not supported yet")
    return Pretrained(
        config=config,
        params=params,
        tokenizer=tokenizer or Tokenizer.from_dir(path),
        path=path,
        kind=kind,
        compute_dtype=compute_dtype,
        source=source,
    )


def restore_lora_run(
    path: str, config: GPT2Config, train: TrainConfig, step: int, dtype: Any = None
) -> dict:
    """The model checkpoint ``step`` of a LoRA run stands for: its adapters (what the run saves)
    merged into the base model the run started from (``train.source.model``, or
    ``train.source.init``'s random weights, which the seed determines).

    The model is float32 unless ``dtype`` asks for another: the adapters' deltas need float32
    to survive (:func:`gpt2jax.lora.merge_lora`), whatever dtype the base was trained in."""
    adapters = runs.restore_adapters(path, config, train, step)
    if train.source.init is not None:
        base = init_params(config, train.run.seed)
    else:
        base = load(train.source.model).params
    base = jax.tree.map(lambda x: jnp.asarray(x, train.memory_settings.param_dtype), base)
    merged = lora.merge_lora(
        base,
        adapters,
        lora.lora_scale(train.memory_settings.lora_rank, train.memory_settings.lora_alpha),
    )
    return jax.tree.map(lambda x: x.astype(jnp.float32 if dtype is None else dtype), merged)
