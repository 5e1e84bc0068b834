"""gpt2jax: GPT-2 in pure JAX/Flax, from OpenAI's checkpoints to Hugging Face's format.

Public API (every name in ``__all__`` is documented; README.md is the user guide)::

    import gpt2jax
    m = gpt2jax.load("ckpt/124M")                 # or an OpenAI checkpoint directory
    logits = m.logits(m.encode("Hello world"))    # (T, 50257) float32; params on the device
    gpt2jax.GPT2(m.config).apply({"params": m.params}, ids)   # the plain Flax module

The rest lives in the subpackages (ARCHITECTURE.md): e.g. :func:`gpt2jax.train.loop.finetune`,
:func:`gpt2jax.train.evaluate.evaluate`, :mod:`gpt2jax.train.memory.planner` (what fits in
memory), :mod:`gpt2jax.generation.decoding` (the sampler's pure functions).
"""

import importlib
from typing import TYPE_CHECKING, Any

from gpt2jax.version import __version__ as __version__

if TYPE_CHECKING:  # what each name is, for type checkers; imported on first use below
    from gpt2jax.config import PRESETS, GPT2Config, get_preset
    from gpt2jax.convert.hf import convert_hf_dir, export_hf
    from gpt2jax.convert.openai_export import export_openai
    from gpt2jax.convert.openai_tf import convert_openai_dir
    from gpt2jax.device import enable_compile_cache
    from gpt2jax.errors import CheckpointError, ConfigError, DataError, Gpt2JaxError
    from gpt2jax.generation.host import Generation, generate
    from gpt2jax.layer_views import layers, stack_layers
    from gpt2jax.loader import Pretrained, load
    from gpt2jax.model import GPT2, GPT2Output, KVCache, init_params, param_shapes
    from gpt2jax.nnx_bridge import to_nnx
    from gpt2jax.store.model_dir import save_model_dir
    from gpt2jax.store.sizes import resolve_model
    from gpt2jax.tokenizer import Tokenizer
    from gpt2jax.train.loop import FinetuneResult, NonFiniteLossError
    from gpt2jax.train.settings import TrainConfig

#: Public name -> the module it comes from. The package imports none of them up front, so
#: that ``gpt2jax convert`` (or ``import gpt2jax.formats``) need not import jax and flax.
_LAZY = {
    "PRESETS": "gpt2jax.config",
    "GPT2Config": "gpt2jax.config",
    "get_preset": "gpt2jax.config",
    "convert_hf_dir": "gpt2jax.convert.hf",
    "export_hf": "gpt2jax.convert.hf",
    "export_openai": "gpt2jax.convert.openai_export",
    "convert_openai_dir": "gpt2jax.convert.openai_tf",
    "enable_compile_cache": "gpt2jax.device",
    "CheckpointError": "gpt2jax.errors",
    "ConfigError": "gpt2jax.errors",
    "DataError": "gpt2jax.errors",
    "Gpt2JaxError": "gpt2jax.errors",
    "Generation": "gpt2jax.generation.host",
    "generate": "gpt2jax.generation.host",
    "layers": "gpt2jax.layer_views",
    "stack_layers": "gpt2jax.layer_views",
    "Pretrained": "gpt2jax.loader",
    "load": "gpt2jax.loader",
    "GPT2": "gpt2jax.model",
    "GPT2Output": "gpt2jax.model",
    "KVCache": "gpt2jax.model",
    "init_params": "gpt2jax.model",
    "param_shapes": "gpt2jax.model",
    "to_nnx": "gpt2jax.nnx_bridge",
    "save_model_dir": "gpt2jax.store.model_dir",
    "resolve_model": "gpt2jax.store.sizes",
    "Tokenizer": "gpt2jax.tokenizer",
    "FinetuneResult": "gpt2jax.train.loop",
    "NonFiniteLossError": "gpt2jax.train.loop",
    "TrainConfig": "gpt2jax.train.settings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "GPT2",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FinetuneResult",
    "GPT2Config",
    "GPT2Output",
    "Generation",
    "Gpt2JaxError",
    "KVCache",
    "NonFiniteLossError",
    "Pretrained",
    "Tokenizer",
    "TrainConfig",
    "convert_hf_dir",
    "convert_openai_dir",
    "enable_compile_cache",
    "export_hf",
    "export_openai",
    "get_preset",
    "generate",
    "init_params",
    "layers",
    "load",
    "param_shapes",
    "resolve_model",
    "save_model_dir",
    "stack_layers",
    "to_nnx",
]
