"""Shared test helpers: tiny odd-shaped configs and a bridge to Hugging Face's PyTorch GPT-2."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gpt2jax.config import GPT2Config
from gpt2jax.convert import mapping

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SHARED = ROOT.parent / "shared"
TOKENIZER_DIR = SHARED / "gpt2-tokenizer"

# Tests never download: tiktoken reads the committed-beside cache.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))

#: Odd sizes everywhere, so transposed or swapped axes cannot go unnoticed.
TINY = GPT2Config(n_vocab=97, n_ctx=23, n_embd=30, n_head=5, n_layer=3)


@pytest.fixture(scope="session", autouse=True)
def _compile_cache(tmp_path_factory):
    """One persistent XLA compile cache for the session, shared with the CLI processes the
    tests start (through ``JAX_COMPILATION_CACHE_DIR``): dozens of tests compile the same tiny
    train step, and a cached program is the same program, so results are unchanged."""
    import jax

    directory = str(tmp_path_factory.mktemp("jax-cache"))
    patch = pytest.MonkeyPatch()
    patch.setenv("JAX_COMPILATION_CACHE_DIR", directory)
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", directory)
    yield directory
    jax.config.update("jax_compilation_cache_dir", old)
    patch.undo()


@pytest.fixture
def tiny_config() -> GPT2Config:
    return TINY


def random_params(config: GPT2Config, seed: int = 0, scale: float = 0.3) -> dict:
    """Random numpy params where every tensor (LayerNorm gains and biases too) is random."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in mapping.our_shapes(config).items():
        x = rng.standard_normal(shape).astype(np.float32)
        if path.endswith("/g"):
            x = 1.0 + 0.2 * x
        elif path.endswith("/b"):
            x = 0.2 * x
        else:
            x = scale * x / np.sqrt(shape[-2] if len(shape) >= 2 else 1)
        flat[path] = x.astype(np.float32)  # np.sqrt above returns a float64 scalar
    flat["wte"] = flat["wte"] * 0.1
    flat["wpe"] = flat["wpe"] * 0.1
    return mapping.unflatten(flat)


def hf_model(params: dict, config: GPT2Config):
    """A ``transformers.GPT2LMHeadModel`` (torch, CPU, float32, eval mode) holding ``params``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(
        **{
            k: v
            for k, v in config.to_hf_config().items()
            if k not in ("architectures", "model_type")
        }
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    state = {
        f"transformer.{name}": torch.from_numpy(np.array(value, np.float32))
        for name, value in mapping.to_theirs(params, config, "hf")
    }
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), missing
    return model
