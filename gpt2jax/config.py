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
from gpt2jax.files import read_bytes

#: ``<|endoftext|>``: the document separator and the only special token of GPT-2's vocabulary.
EOT_TOKEN = 50256
#: The attention implementations (``--attention``; :mod:`gpt2jax.attention` runs them), named
#: here so that the command line can offer them without importing jax.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
#: What a block keeps for the backward pass (:class:`gpt2jax.model.GPT2`'s ``remat``).
REMAT_POLICIES = ("none", "block", "dots")
#: ``--remat``'s choices: a policy, or ``auto`` (:func:`gpt2jax.device.default_remat`).
REMAT_CHOICES = ("auto", *REMAT_POLICIES)

#: The largest value of each shape field a config may hold: far above any GPT-2 (48 layers,
#: 1600 wide, 1024 positions), low enough that what is built per layer, per position or per
#: token id stays small whatever the other fields say. Checked before anything is allocated.
MAX_FIELD = {
    "n_vocab": 1 << 22,
    "n_ctx": 1 << 20,
    "n_embd": 1 << 16,
    "n_head": 1 << 12,
    "n_layer": 1 << 12,
}
#: The most parameter memory (float32) a config may describe: 400 GB, 64 times GPT-2 1558M's.
MAX_PARAM_BYTES = 400 * 10**9
#: The largest JSON file read as a config (``hparams.json``, ``config.json``, ``run.json``).
MAX_JSON_BYTES = 16 * 1024 * 1024


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
            if value > MAX_FIELD[name]:
                raise ConfigError(
                    f"{name}={value} is absurdly large for a GPT-2 model (at most "
                    f"{MAX_FIELD[name]:,})"
                )
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.num_params() * 4 > MAX_PARAM_BYTES:
            raise ConfigError(
                f"n_layer={self.n_layer}, n_embd={self.n_embd}, n_vocab={self.n_vocab}, "
                f"n_ctx={self.n_ctx} make {self.num_params() * 4 / 1e9:,.0f} GB of parameters: "
                f"absurdly large for a GPT-2 model (at most {MAX_PARAM_BYTES / 1e9:,.0f} GB)"
            )
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
        _check_hf_variant(hf, source)
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

#: Hugging Face GPT2Config fields that change what the model computes, with the one value our
#: GPT2 implements (an absent or null field takes transformers' default, which is that value).
_HF_FIXED = {
    "activation_function": "gelu_new",
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}


def _check_hf_variant(hf: dict[str, Any], source: str) -> None:
    """Refuses a Hugging Face config of a GPT-2 variant this implementation does not compute
    (converting it would silently give another function), naming the field."""
    for field, value in _HF_FIXED.items():
        given = hf.get(field)
        if given is not None and (given != value or type(given) is not type(value)):
            raise ConfigError(
                f"{source}: {field}={json.dumps(given)} is not supported (GPT-2 as implemented "
                f"here computes {field}={json.dumps(value)})"
            )
    n_inner, n_embd = hf.get("n_inner"), hf.get("n_embd")
    if n_inner is not None and (not isinstance(n_embd, int) or n_inner != 4 * n_embd):
        raise ConfigError(
            f"{source}: n_inner={json.dumps(n_inner)} is not supported (GPT-2's MLP is "
            "4 * n_embd wide: null or 4 * n_embd)"
        )
    positions, context = hf.get("n_positions"), hf.get("n_ctx")
    if positions is not None and context is not None and positions != context:
        raise ConfigError(
            f"{source}: n_positions={json.dumps(positions)} and n_ctx={json.dumps(context)} "
            "disagree"
        )


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
    """Reads a small JSON file, turning every failure into one clear :class:`ConfigError`:
    a regular file of at most :data:`MAX_JSON_BYTES` (a FIFO, a device or a bigger file is
    refused at once)."""
    path = os.fspath(path)
    try:
        data = json.loads(read_bytes(path, MAX_JSON_BYTES, ConfigError).decode("utf-8"))
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
