"""GPT2Config: presets, OpenAI hparams.json, Hugging Face config.json, validation."""

from __future__ import annotations

import pytest

from gpt2jax.config import PRESETS, GPT2Config, get_preset
from gpt2jax.errors import ConfigError


def test_presets_are_openai_hparams():
    expected = {
        "124M": (12, 12, 768),
        "355M": (24, 16, 1024),
        "774M": (36, 20, 1280),
        "1558M": (48, 25, 1600),
    }
    for name, (n_layer, n_head, n_embd) in expected.items():
        c = get_preset(name)
        assert c.to_hparams() == {
            "n_vocab": 50257,
            "n_ctx": 1024,
            "n_embd": n_embd,
            "n_head": n_head,
            "n_layer": n_layer,
        }
    with pytest.raises(ConfigError, match="unknown model size"):
        get_preset("2B")


def test_frozen():
    with pytest.raises(AttributeError):
        PRESETS["124M"].n_layer = 3


def test_hparams_round_trip():
    c = GPT2Config.from_hparams(PRESETS["355M"].to_hparams())
    assert c == PRESETS["355M"]


@pytest.mark.parametrize(
    "hparams,match",
    [
        ({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12}, "missing n_layer"),
        ({**PRESETS["124M"].to_hparams(), "n_layer": -3}, "n_layer must be a positive"),
        ({**PRESETS["124M"].to_hparams(), "n_head": 7}, "divisible"),
        ({**PRESETS["124M"].to_hparams(), "n_embd": 10**9}, "absurdly large"),
        ({**PRESETS["124M"].to_hparams(), "n_embd": "768"}, "positive integer"),
        ({**PRESETS["124M"].to_hparams(), "n_ctx": 1.5}, "positive integer"),
        ({**PRESETS["124M"].to_hparams(), "n_ctx": True}, "positive integer"),
        ({**PRESETS["124M"].to_hparams(), "n_foo": 3}, "unknown keys n_foo"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_hparams_are_clear_errors(hparams, match):
    with pytest.raises(ConfigError, match=match) as e:
        GPT2Config.from_hparams(hparams, source="models/x/hparams.json")
    assert "models/x/hparams.json" in str(e.value)


def test_hf_config_round_trip_and_checks():
    c = PRESETS["774M"]
    assert GPT2Config.from_hf_config(c.to_hf_config()) == c
    # Hugging Face's own defaults (n_ctx absent in newer configs) are read too.
    hf = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768}
    hf.update(n_head=12, n_layer=12, layer_norm_epsilon=1e-5)
    assert GPT2Config.from_hf_config(hf) == PRESETS["124M"]
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        GPT2Config.from_hf_config({**hf, "model_type": "llama"})
    with pytest.raises(ConfigError, match="activation_function"):
        GPT2Config.from_hf_config({**hf, "activation_function": "relu"})
    with pytest.raises(ConfigError, match="missing n_layer"):
        GPT2Config.from_hf_config({k: v for k, v in hf.items() if k != "n_layer"})


def test_dict_round_trip():
    c = GPT2Config(n_vocab=97, n_ctx=23, n_embd=30, n_head=5, n_layer=3, dropout=0.1)
    assert GPT2Config.from_dict(c.to_dict()) == c
