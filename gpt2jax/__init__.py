"""gpt2jax: GPT-2 in pure JAX/Flax, from OpenAI's checkpoints to Hugging Face's format.

Public API::

    import gpt2jax
    m = gpt2jax.load("ckpt/124M")                 # or an OpenAI checkpoint directory
    logits = m.logits(m.encode("Hello world"))    # (T, 50257) float32
    gpt2jax.GPT2(m.config).apply({"params": m.params}, ids)   # the plain Flax module
"""

from gpt2jax.config import PRESETS, GPT2Config, get_preset
from gpt2jax.errors import CheckpointError, ConfigError, DataError, Gpt2JaxError
from gpt2jax.generate import Generation, generate
from gpt2jax.model import GPT2, GPT2Output, KVCache, init_params, param_shapes
from gpt2jax.pretrained import Pretrained, load
from gpt2jax.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT2",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GPT2Config",
    "GPT2Output",
    "Generation",
    "Gpt2JaxError",
    "KVCache",
    "Pretrained",
    "Tokenizer",
    "get_preset",
    "generate",
    "init_params",
    "load",
    "param_shapes",
]
