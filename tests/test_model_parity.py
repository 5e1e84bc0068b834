"""Our GPT-2 against Hugging Face's ``GPT2LMHeadModel`` (PyTorch, CPU) on the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, hf_model, random_params
from gpt2jax.config import PRESETS, GPT2Config
from gpt2jax.model import GPT2

torch = pytest.importorskip("torch")

# A real GPT-2 block shape (124M's width and heads, 1024 positions, full vocabulary) with fewer
# layers so the test stays fast; every per-layer code path is the same for 2 layers or 12.
REAL = GPT2Config(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=2)


def _compare(config: GPT2Config, ids: np.ndarray, dtype=jnp.float32):
    params = random_params(config, seed=1)
    out = GPT2(config, dtype=dtype).apply(
        {"params": params}, jnp.asarray(ids), method="forward", output_hidden_states=True
    )
    with torch.no_grad():
        ref = hf_model(params, config)(torch.from_numpy(ids), output_hidden_states=True)
    return out, ref


@pytest.mark.parametrize("config", [TINY, REAL], ids=["tiny-odd", "real-width"])
def test_logits_and_hidden_states_match_transformers(config):
    ids = np.random.default_rng(0).integers(0, config.n_vocab, (2, 19))
    out, ref = _compare(config, ids)
    np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == config.n_layer + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.last_hidden, ref.hidden_states[-1].numpy(), atol=1e-4, rtol=0)


def test_full_context_matches_transformers():
    ids = np.random.default_rng(1).integers(0, TINY.n_vocab, (1, TINY.n_ctx))
    out, ref = _compare(TINY, ids)
    np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4, rtol=0)


def test_bfloat16_compute_within_documented_tolerance():
    """bfloat16 compute (float32 LayerNorm/softmax/logits) stays within 0.1 of float32 logits
    at the real width: about 3 significant digits, the precision bfloat16 has."""
    ids = np.random.default_rng(2).integers(0, REAL.n_vocab, (2, 17))
    out, ref = _compare(REAL, ids, dtype=jnp.bfloat16)
    assert out.logits.dtype == jnp.float32
    err = np.abs(np.asarray(out.logits) - ref.logits.numpy()).max()
    scale = np.abs(ref.logits.numpy()).max()
    assert err < 0.1 + 0.02 * scale, (err, scale)
    # and the argmax agrees almost everywhere
    agree = (np.asarray(out.logits).argmax(-1) == ref.logits.numpy().argmax(-1)).mean()
    assert agree > 0.9


def test_call_returns_logits_for_research_code(tiny_config):
    params = random_params(tiny_config)
    logits = GPT2(tiny_config).apply({"params": params}, jnp.zeros((3, 4), jnp.int32))
    assert logits.shape == (3, 4, tiny_config.n_vocab) and logits.dtype == jnp.float32


@pytest.mark.parametrize(
    "name,count",
    [("124M", 124_439_808), ("355M", 354_823_168), ("774M", 774_030_080), ("1558M", 1_557_611_200)],
)
def test_presets_build_with_openai_parameter_counts(name, count):
    from gpt2jax.model import param_shapes

    shapes = param_shapes(PRESETS[name])
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count
    assert PRESETS[name].num_params() == count
    assert shapes["h"]["attn"]["c_attn"]["w"].shape == (
        PRESETS[name].n_layer,
        PRESETS[name].n_embd,
        3 * PRESETS[name].n_embd,
    )
