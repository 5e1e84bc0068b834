"""The old home of :func:`gpt2jax.load` and :class:`Pretrained`, now in :mod:`gpt2jax.loader`."""

from gpt2jax.loader import Pretrained, load

__all__ = ["Pretrained", "load"]
