""":func:`to_nnx`: the model as a Flax NNX module, for code written against NNX.

Flax's documentation now leads with NNX (Linen stays supported), and Google's JAX LLM tutorials
use it. The model stays the Linen :class:`~gpt2jax.model.GPT2`; ``flax.nnx.bridge.ToNNX``
wraps it, holding the parameters as ``nnx.Param`` variables under the same names
(``m.h["attn"]["c_attn"]["w"]``), so ``nnx.Optimizer``, ``nnx.jit`` and ``nnx.grad`` work on it
and ``nnx.state(m, nnx.Param)`` is the params tree again.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
from flax.nnx import bridge
from flax.nnx.bridge import variables as bridge_variables

from gpt2jax.loader import Pretrained
from gpt2jax.model import GPT2


def to_nnx(model: Pretrained | GPT2, params: Any = None, *, seed: int = 0) -> nnx.Module:
    """An NNX module computing ``model`` with ``params`` (default: the loaded model's).

    ``model`` is what :func:`gpt2jax.load` returns, or a :class:`~gpt2jax.model.GPT2` module
    with its ``params``. The result is called like the Linen module: ``m(ids)`` gives logits,
    ``m(ids, output_hidden_states=True)`` a :class:`~gpt2jax.model.GPT2Output`,
    ``m.forward(ids, cache=...)`` the general entry point. Parameters are not copied or
    re-initialised. ``seed`` seeds the ``dropout`` RNG stream (dropout runs when called with
    ``deterministic=False`` and ``config.dropout > 0``).
    """
    if isinstance(model, Pretrained):
        module, params = model.module, model.params if params is None else params
    elif isinstance(model, GPT2):
        module = model
        if params is None:
            raise ValueError("to_nnx(GPT2(...)) needs the params")
    else:
        raise TypeError(f"to_nnx expects a gpt2jax.Pretrained or a GPT2 module, got {model!r}")
    wrapped = bridge.ToNNX(module, rngs=nnx.Rngs(dropout=seed))
    # What ToNNX.lazy_init would store after a (random) init, here holding the given weights.
    for name, value in bridge_variables.linen_vars_to_nnx_attrs({"params": params}).items():
        setattr(wrapped, name, value)
    return wrapped
