"""Model configuration: a frozen dataclass and OpenAI's four published sizes.

The field names follow OpenAI's ``hparams.json`` (``n_vocab``, ``n_ctx``, ``n_embd``, ``n_head``,
``n_layer``), so a checkpoint directory's hparams map onto it one to one. Hugging Face's
``config.json`` for ``model_type: gpt2`` is read and written too (``vocab_size``, ``n_positions``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from gpt2jax.errors import ConfigError

#: ``<|endoftext|>``: the document separator and the only special token of GPT-2's vocabulary.
EOT_TOKEN = 50256


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Shape of a GPT-2 model (OpenAI's ``hparams.json``) plus its LayerNorm epsilon and dropout.

    ``dropout`` is 0.0 by default: OpenAI's released model has none, and fine-tuning usually
    runs without it. When > 0 it is applied where Hugging Face applies ``*_pdrop`` (embeddings,
    attention probabilities, residual branches) during training only.
    """

    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if value > 10_000_000:
                raise ConfigError(f"{name}={value} is absurdly large for a GPT-2 model")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 < self.layer_norm_epsilon < 1.0:
            raise ConfigError(
                f"layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        """Channels per attention head, ``n_embd // n_head``."""
        return self.n_embd // self.n_head

    def num_params(self) -> int:
        """Parameter count with the LM head tied to ``wte`` (as OpenAI's checkpoints count it)."""
        c, L = self.n_embd, self.n_layer
        per_block = (
            2 * c  # ln_1
            + c * 3 * c
            + 3 * c  # attn/c_attn
            + c * c
            + c  # attn/c_proj
            + 2 * c  # ln_2
            + c * 4 * c
            + 4 * c  # mlp/c_fc
            + 4 * c * c
            + c  # mlp/c_proj
        )
        return self.n_vocab * c + self.n_ctx * c + L * per_block + 2 * c

    # -- OpenAI hparams.json -------------------------------------------------------------------

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any], source: str = "hparams.json") -> GPT2Config:
        """Builds a config from OpenAI's ``hparams.json`` contents (unknown keys are refused)."""
        return _build(hparams, _SHAPE_KEYS, _SHAPE_KEYS, source)

    def to_hparams(self) -> dict[str, int]:
        """OpenAI's ``hparams.json``: n_vocab, n_ctx, n_embd, n_head and n_layer."""
        return {k: getattr(self, k) for k in _SHAPE_KEYS}

    # -- Hugging Face config.json --------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> GPT2Config:
        """Builds a config from a Hugging Face ``config.json`` of ``model_type`` ``gpt2``."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type != "gpt2":
            raise ConfigError(f"{source}: model_type is {model_type!r}, only 'gpt2' is supported")
        activation = hf.get("activation_function", "gelu_new")
        if activation != "gelu_new":
            raise ConfigError(
                f"{source}: activation_function {activation!r} is not GPT-2's gelu_new"
            )
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ConfigError(f"{source}: {flag}=true is not supported")
        fields = {
            "n_vocab": hf.get("vocab_size"),
            "n_ctx": hf.get("n_positions", hf.get("n_ctx")),
            "n_embd": hf.get("n_embd"),
            "n_head": hf.get("n_head"),
            "n_layer": hf.get("n_layer"),
        }
        missing = [k for k, v in fields.items() if v is None]
        if missing:
            raise ConfigError(f"{source}: missing {', '.join(missing)}")
        fields["layer_norm_epsilon"] = hf.get("layer_norm_epsilon", 1e-5)
        return _build(fields, _SHAPE_KEYS, tuple(fields), source)

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` that ``transformers.GPT2LMHeadModel`` loads for this model."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "vocab_size": self.n_vocab,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_layer": self.n_layer,
            "n_inner": None,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "attn_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "resid_pdrop": self.dropout,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "bos_token_id": EOT_TOKEN,
            "eos_token_id": EOT_TOKEN,
            "tie_word_embeddings": True,
            "use_cache": True,
        }

    # -- our own model directories ------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> GPT2Config:
        """Reads the ``config`` object of a gpt2jax model directory (see :meth:`to_dict`)."""
        return _build(d, _SHAPE_KEYS, tuple(f.name for f in dataclasses.fields(cls)), source)

    def to_dict(self) -> dict[str, Any]:
        """Every field, as stored in a model directory's ``config.json`` (see ``from_dict``)."""
        return dataclasses.asdict(self)


_SHAPE_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


def _build(
    d: dict[str, Any], required: tuple[str, ...], allowed: tuple[str, ...], source: str
) -> GPT2Config:
    """Validates ``d`` and builds a config, naming ``source`` in every error."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(missing)}")
    extra = sorted(set(d) - set(allowed))
    if extra:
        # repr() a key with a newline or control character: the error must stay one line
        names = (k if k.isprintable() else repr(k) for k in extra)
        raise ConfigError(f"{source}: unknown keys {', '.join(names)}")
    try:
        return GPT2Config(**d)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None


#: OpenAI's four released sizes, named as OpenAI names their checkpoint directories.
PRESETS: dict[str, GPT2Config] = {
    "124M": GPT2Config(n_embd=768, n_head=12, n_layer=12),
    "355M": GPT2Config(n_embd=1024, n_head=16, n_layer=24),
    "774M": GPT2Config(n_embd=1280, n_head=20, n_layer=36),
    "1558M": GPT2Config(n_embd=1600, n_head=25, n_layer=48),
}


def get_preset(name: str) -> GPT2Config:
    """Returns the preset called ``name`` (``124M``, ``355M``, ``774M`` or ``1558M``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model size {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a small JSON file, turning every failure into one clear :class:`ConfigError`."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > 16 * 1024 * 1024:
            raise ConfigError(f"{path}: {size} bytes is too large for a config file")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (ValueError, RecursionError) as e:
        # ValueError: bad UTF-8 or JSON, and ints past Python's 4300-digit conversion limit;
        # RecursionError: nesting deeper than the interpreter's stack
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
