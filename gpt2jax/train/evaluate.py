"""``gpt2jax eval MODEL --data FILE``: loss and perplexity of a model on a text.

The text is tokenized like training data (:mod:`gpt2jax.train.data`, cached) and covered by
consecutive non-overlapping windows of ``seq_len + 1`` tokens
(:func:`gpt2jax.train.batches.eval_windows`): every token after the first is predicted once, from at
most ``seq_len`` tokens of context. The loss is the mean token cross-entropy in nats; perplexity
is its exponential.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax.numpy as jnp

from gpt2jax.errors import DataError
from gpt2jax.train.batches import eval_windows
from gpt2jax.train.data import check_vocab, load_tokens
from gpt2jax.train.step import AXIS, DataParallel, make_eval_step
from gpt2jax.validate import check_number


def evaluate(
    model_path: str | os.PathLike,
    data: list[str],
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    column: str | None = None,
    field: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    allow_changed_base: bool = False,
    compute_dtype: str = "float32",
    attention: str = "auto",
) -> dict[str, Any]:
    """``{"loss", "perplexity", "tokens"}`` of the model at ``model_path`` on ``data``.

    ``seq_len`` defaults to the model's context (at most 1024); ``batch_size`` windows are
    evaluated at a time, over all local devices (rounded up to a multiple of their number).
    ``allow_changed_base``: see :func:`gpt2jax.loader.load`.
    ``compute_dtype`` (``"auto"``: the device's, :mod:`gpt2jax.device`) and ``attention``
    choose how the model computes; the loss is float32 whatever they are.
    """
    from gpt2jax.device import resolve_compute_dtype
    from gpt2jax.dtypes import dtype
    from gpt2jax.loader import load
    from gpt2jax.store.sizes import resolve_model

    check_number("--batch-size", batch_size, low=1, integer=True)
    if seq_len is not None:  # given: checked, never replaced (0 is not "the default")
        check_number("--seq-len", seq_len, low=1, integer=True)
    model = load(  # a size name ("124M") means the download cache
        resolve_model(model_path),
        allow_changed_base=allow_changed_base,
        compute_dtype=dtype(resolve_compute_dtype(compute_dtype)),
        attention=attention,
    )
    config = model.config
    seq_len = seq_len if seq_len is not None else min(1024, config.n_ctx)
    check_number("--seq-len", seq_len, low=1, high=config.n_ctx, integer=True,
                 hint=f"the model's context is {config.n_ctx} tokens")  # fmt: skip
    tokens = load_tokens(
        data, model.tokenizer, column=column, field=field, cache_dir=cache_dir,
        show_progress=show_progress,
    )  # fmt: skip
    if len(tokens.tokens) < 2:
        raise DataError(f"{tokens.name}: only {len(tokens.tokens)} token, nothing to predict")
    check_vocab(tokens.tokens, config.n_vocab, tokens.name)
    windows, weights = eval_windows(tokens.tokens, seq_len)
    dp = DataParallel()
    per_device = -(-batch_size // (dp.num_devices * dp.process_count))
    step = dp.compile_eval_step(make_eval_step(model.module, AXIS))
    params = dp.replicate(model.params)
    loss, count = dp.evaluate(step, params, windows, weights, per_device, show_progress)
    return {
        "model": os.fspath(model_path),
        "data": tokens.name,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": int(count),
        "seq_len": seq_len,
        "compute_dtype": jnp.dtype(model.compute_dtype).name,
    }
