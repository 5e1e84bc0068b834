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
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import lora
from gpt2jax.attention import check_name as check_attention
from gpt2jax.config import GPT2Config
from gpt2jax.convert.hf import describe_hf_dir, read_hf_config, read_hf_dir
from gpt2jax.convert.hf_tokenizer import load_tokenizer
from gpt2jax.convert.mapping import flatten
from gpt2jax.convert.openai_tf import read_hparams, read_openai_dir
from gpt2jax.errors import CheckpointError, Gpt2JaxError
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

    ``params`` are device arrays (see :func:`load`), in the dtype they were loaded in;
    ``compute_dtype`` is what :meth:`logits` and :func:`gpt2jax.generate` compute in, with the
    ``attention`` implementation (:mod:`gpt2jax.attention`). ``source`` says where the model
    came from (for ``gpt2jax info``).
    """

    config: GPT2Config
    params: Any
    tokenizer: Tokenizer
    path: str
    kind: str
    compute_dtype: Any = jnp.float32
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    attention: str = "auto"

    @property
    def module(self) -> GPT2:
        """The Flax module: ``m.module.apply({"params": m.params}, ids)``."""
        return GPT2(self.config, dtype=self.compute_dtype, attention=self.attention)

    def encode(self, text: str) -> np.ndarray:
        """Token ids ``(T,)`` int32 of ``text``."""
        return np.asarray(self.tokenizer.encode(text), dtype=np.int32)

    def decode(self, ids: Any) -> str:
        """Text of token ids of any shape (flattened); invalid UTF-8 becomes U+FFFD."""
        return self.tokenizer.decode(np.asarray(ids).reshape(-1).tolist())

    def logits(self, ids: Any) -> jax.Array:
        """Next-token logits, float32: ``(T, V)`` for ids ``(T,)``, ``(B, T, V)`` for ``(B, T)``."""
        # the ids are the only upload (explicit); the params are on the device already
        ids = ids if isinstance(ids, jax.Array) else jax.device_put(np.asarray(ids, np.int32))
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise Gpt2JaxError(f"logits expects token ids of shape (T,) or (B, T), got {ids.shape}")
        if ids.shape[-1] > self.config.n_ctx:
            raise Gpt2JaxError(
                f"{ids.shape[-1]} tokens exceed the model's context of {self.config.n_ctx}"
            )
        return _logits_fn(self.config, self.compute_dtype, self.attention)(self.params, ids)


@functools.cache
def _logits_fn(config: GPT2Config, dtype: Any, attention: str):
    model = GPT2(config, dtype=dtype, attention=attention)

    def logits(params, ids):
        # the cast, reshape and indexing compiled too: eager indexing uploads its index (jax 0.7)
        out = model.apply({"params": params}, jnp.atleast_2d(ids.astype(jnp.int32)))
        return out[0] if ids.ndim == 1 else out

    return jax.jit(logits)


def load(
    path: str | os.PathLike | ModelSource,
    *,
    dtype: Any = None,
    compute_dtype: Any = jnp.float32,
    allow_changed_base: bool = False,
    device: Any = None,
    sharding: Any = None,
    attention: str = "auto",
) -> Pretrained:
    """Loads a model directory (gpt2jax, OpenAI TF or Hugging Face), detected from its files.

    The parameters are put on ``device`` (default: JAX's default device, the accelerator when
    there is one), one tensor at a time, or laid out by ``sharding`` (one
    ``jax.sharding.Sharding`` for every leaf, or a pytree of them, e.g. FSDP's for a model too
    big for one device): ``m.logits`` and ``jax.grad`` over ``m.params`` then upload nothing.

    Args:
        path: the directory, or one of OpenAI's sizes ("124M", ...): its download cache,
            downloaded on first use (see :func:`gpt2jax.store.sizes.resolve_model`); or what
            :func:`describe` said of one.
        dtype: parameter dtype to load into (default: as stored for gpt2jax directories,
            float32 for OpenAI and Hugging Face ones).
        compute_dtype: dtype :meth:`Pretrained.logits` computes in.
        allow_changed_base: load a LoRA run whose base model's weights changed since the run
            started (refused otherwise: the adapters were trained for the old ones).
        device: a ``jax.Device`` for the parameters (not with ``sharding``).
        sharding: where each parameter goes (not with ``device``).
        attention: the attention implementation of ``logits`` and ``generate``.

    A training run loads as its newest checkpoint; one that a running ``finetune`` removes
    while it is being read (``--keep``) is replaced by the newer one it made room for.
    """
    if device is not None and sharding is not None:
        raise Gpt2JaxError("load: give device or sharding, not both")
    check_attention(attention)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    src = path if isinstance(path, ModelSource) else describe(path)
    path, kind = src.path, src.kind
    tokenizer = None
    if kind == "gpt2jax":  # restored straight onto the devices
        config = src.config
        params = restore_params(
            os.path.join(path, "params"), config, dtype=dtype, sharding=sharding
        )
        source = src.meta.get("source", {})
    elif kind == "openai":
        config, params = read_openai_dir(path, dtype=dtype or np.float32)
        source = {"format": "openai-tf", "path": os.path.abspath(path)}
    elif kind == "hf":
        config, params = read_hf_dir(path, dtype=dtype or np.float32)
        source = {"format": "hf", "path": os.path.abspath(path)}
        tokenizer = load_tokenizer(path)  # vocab.json + merges.txt, or tokenizer.json
    elif kind == "run":
        config = src.config
        step, params = _newest_checkpoint(src, dtype, allow_changed_base)
        source = {"format": "gpt2jax-run", "path": os.path.abspath(path), "step": step}
    else:
        raise Gpt2JaxError(f"{path}: loading a {kind!r} directory is not supported yet")
    tokenizer = tokenizer or Tokenizer.from_dir(path)
    field = "vocab_size" if kind == "hf" else "n_vocab"
    tokenizer.check_model_vocab(config.n_vocab, _config_file(path, kind), field)
    return Pretrained(
        config=config,
        params=place(params, sharding),
        tokenizer=tokenizer,
        path=path,
        kind=kind,
        compute_dtype=compute_dtype,
        source=source,
        attention=attention,
    )


def _config_file(path: str, kind: str) -> str:
    """The file that states a model directory's vocabulary size, for messages."""
    name = {"openai": "hparams.json", "run": runs.RUN_JSON}.get(kind, "config.json")
    return os.path.join(path, name)


def _newest_checkpoint(src: ModelSource, dtype: Any, allow_changed_base: bool) -> tuple[int, Any]:
    """``(step, params)`` of a run's newest checkpoint. A live run (``--keep``) may move the step
    being read away once a newer one is complete: then the newer one is read."""
    path, config, train = src.path, src.config, src.train
    step = src.step if src.step is not None else runs.latest_step(path)  # raises if none
    for _ in range(5):
        try:
            if train.memory_settings.lora_rank:  # its checkpoints hold adapters: merged in the base
                return step, restore_lora_run(
                    path, config, train, step, dtype=dtype, allow_changed_base=allow_changed_base
                )
            return step, runs.restore_params(path, config, step, dtype=dtype)
        except CheckpointError as e:
            newest = runs.latest_step(path)
            if os.path.isdir(os.path.join(path, runs.CHECKPOINTS, str(step))) or newest == step:
                raise _with_older(e, path, step) from None  # still there: damaged, not rotated
            step = newest
    raise CheckpointError(f"{path}: its checkpoints change faster than they can be read")


def _with_older(error: CheckpointError, path: str, step: int) -> CheckpointError:
    """``error`` (about checkpoint ``step``) naming the run's older checkpoints, if any."""
    folder = os.path.join(path, runs.CHECKPOINTS)
    older = sorted((int(n) for n in os.listdir(folder) if n.isdigit() and int(n) < step),
                   reverse=True)  # fmt: skip
    if not older:
        return error
    return CheckpointError(
        f"{error}; older checkpoints: {', '.join(map(str, older))} (gpt2jax finetune --resume "
        "falls back to the newest that restores)"
    )


def params_fingerprint(params: Any) -> str:
    """A hash of a parameter tree's contents: every leaf's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name, leaf in sorted(flatten(params).items()):
        value = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        digest.update(value.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def files_signature(path: str) -> str:
    """A hash of the names, sizes and modification times of every file under ``path``: when it
    is unchanged, so are the weights, and they need not be hashed again."""
    entries = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:32]


def base_record(path: str, params: Any) -> dict[str, Any]:
    """What a LoRA run's ``run.json`` records of its base model (computed once, at the start):
    the path, a fingerprint of the weights (:func:`params_fingerprint`) and of the files."""
    return {"path": path, "fingerprint": params_fingerprint(params), "files": files_signature(path)}


def run_base_params(
    run_path: str,
    train: TrainConfig,
    config: GPT2Config,
    *,
    allow_changed_base: bool = False,
    update_record: bool = False,
) -> Any:
    """The parameters a run started from: ``train.init``'s random weights, or ``train.model``'s,
    which a LoRA run checks against the fingerprint its ``run.json`` recorded: changed weights
    are refused (naming the path) unless ``allow_changed_base``; then ``update_record``
    records the new ones."""
    model, lora_rank = train.source.model, train.memory_settings.lora_rank
    if train.source.init is not None:
        return init_params(config, train.run.seed)
    try:
        params = load(model).params
    except Gpt2JaxError as e:
        if not lora_rank:
            raise
        raise CheckpointError(
            f"{run_path}: the LoRA run needs its base model {model}, which does not load ({e})"
        ) from None
    recorded = runs.read_base(run_path) if lora_rank else None
    if recorded is None or recorded.get("files") == files_signature(model):
        return params
    now = base_record(model, params)
    if now["fingerprint"] == recorded.get("fingerprint"):
        return params  # touched, not changed
    if not allow_changed_base:
        raise CheckpointError(
            f"{run_path}: its LoRA adapters were trained on the base model {model} as it "
            f"was then, and that directory now holds other weights (fingerprint "
            f"{now['fingerprint'][:12]}, the run recorded {str(recorded.get('fingerprint'))[:12]}"
            f"); put that model back at {model}, or pass --allow-changed-base"
        )
    if update_record:
        runs.write_run_json(run_path, config, train, base=now)
    return params


def place(params: dict, sharding: Any) -> dict:
    """``params`` (a nested dict) with every leaf put where ``sharding`` says (one sharding,
    or a matching tree of them). Each host leaf is dropped from the tree as soon as it is
    copied, so that the host never holds the model twice; leaves already there stay."""
    shardings = sharding if isinstance(sharding, dict) else None
    out = {}
    for key in list(params):
        value = params.pop(key) if isinstance(params, dict) else params[key]
        target = shardings[key] if shardings is not None else sharding
        if isinstance(value, dict):
            out[key] = place(value, target)
        elif isinstance(value, jax.Array) and value.sharding == target:
            out[key] = value
        else:
            out[key] = jax.device_put(value, target)
        del value
    return out


def restore_lora_run(
    path: str,
    config: GPT2Config,
    train: TrainConfig,
    step: int,
    dtype: Any = None,
    allow_changed_base: bool = False,
) -> dict:
    """The model checkpoint ``step`` of a LoRA run stands for: its adapters (what the run saves)
    merged into the base model the run started from (``train.source.model``, or
    ``train.source.init``'s random weights, which the seed determines).

    The model is float32 unless ``dtype`` asks for another: the adapters' deltas need float32
    to survive (:func:`gpt2jax.lora.merge_lora`), whatever dtype the base was trained in. A
    base whose weights changed since the run started is refused unless
    ``allow_changed_base`` (:func:`run_base_params`)."""
    adapters = runs.restore_adapters(path, config, train, step)
    base = run_base_params(path, train, config, allow_changed_base=allow_changed_base)
    base = jax.tree.map(lambda x: jnp.asarray(x, train.memory_settings.param_dtype), base)
    merged = lora.merge_lora(
        base,
        adapters,
        lora.lora_scale(train.memory_settings.lora_rank, train.memory_settings.lora_alpha),
    )
    return jax.tree.map(lambda x: x.astype(jnp.float32 if dtype is None else dtype), merged)
