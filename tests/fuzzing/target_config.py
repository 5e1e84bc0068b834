"""Fuzz targets: the config readers, ``GPT2Config.from_hparams`` / ``from_hf_config`` /
``from_dict`` on generated values, and :func:`gpt2jax.config.read_json` on generated files.

Values start from a valid config in each of the three layouts (OpenAI ``hparams.json``, Hugging
Face ``config.json``, ours) with keys deleted, set to junk (negative, absurd, huge ints, NaN,
wrong types, nested junk) or added; or are any JSON value at all. Files add NaN/Infinity,
5000-digit and deeply nested literals and byte mutations. Only ``ConfigError`` may escape, and
an accepted config must be valid and survive its round trips.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from fuzzing.harness import Target, check_clean, fresh_path, write_bytes
from fuzzing.mutations import byte_ops, inject_literal, json_literal_ops, json_values, mutate
from gpt2jax.config import GPT2Config, read_json
from gpt2jax.errors import Gpt2JaxError

_VALID = GPT2Config(n_vocab=97, n_ctx=23, n_embd=30, n_head=5, n_layer=3)
_BASES = {
    "hparams": _VALID.to_hparams(),
    "hf": _VALID.to_hf_config(),
    "ours": _VALID.to_dict(),
}
_KEYS = sorted({k for base in _BASES.values() for k in base} | {"format", "config"})
_BUILDS = ("from_hparams", "from_hf_config", "from_dict")
#: Where the config dicts "come from": every error must name it.
CONFIG_SOURCE = "fuzzed/config.json"

config_ops = st.one_of(
    st.tuples(st.just("del"), st.sampled_from(_KEYS)),
    st.tuples(st.just("set"), st.sampled_from(_KEYS), json_values),
    st.tuples(st.just("add"), st.text(max_size=8), json_values),
)
config_cases = st.one_of(
    st.tuples(st.sampled_from(sorted(_BASES)), st.lists(config_ops, max_size=5)),
    st.tuples(st.just("any"), json_values),  # not even an object, mostly
)


def _config_value(case: tuple) -> Any:
    if case[0] == "any":
        return case[1]
    value = dict(_BASES[case[0]])
    for op in case[1]:
        if op[0] == "del":
            value.pop(op[1], None)
        else:
            value[op[1]] = op[2]
    return value


def _check_config(config: GPT2Config) -> None:
    """An accepted config is a usable one, and survives its own round trips."""
    assert isinstance(config, GPT2Config)
    assert config.n_embd % config.n_head == 0 and 0 < config.layer_norm_epsilon < 1
    assert GPT2Config.from_dict(config.to_dict()) == config
    assert GPT2Config.from_hf_config(config.to_hf_config()).to_hparams() == config.to_hparams()


def _read_config(value: Any, build: str, names: str) -> str:
    try:
        _check_config(getattr(GPT2Config, build)(value, source=names))
    except Gpt2JaxError as e:
        check_clean(e, names)
        return "clean"
    return "accepted"


def _config_target(build: str) -> Target:
    return Target(
        name=f"config:{build}",
        strategy=config_cases,
        prepare=lambda case, workdir: _config_value(case),
        read=lambda value, workdir: _read_config(value, build, CONFIG_SOURCE),
        quick_examples=150,
        describes=CONFIG_SOURCE,
    )


json_file_cases = st.tuples(
    config_cases,
    st.lists(json_literal_ops, max_size=2),
    st.lists(byte_ops, max_size=2),
)


def prepare_json_file(case: tuple, workdir: str) -> str:
    value, literals, file_ops = case
    text = json.dumps(_config_value(value), allow_nan=True).encode()
    for _, index, literal in literals:
        text = inject_literal(text, index, literal)
    path = fresh_path(workdir, "config") + ".json"
    write_bytes(path, mutate(text, file_ops))
    return path


def read_json_file(path: str, workdir: str) -> str:
    """``read_json``, then every config constructor on what it returns."""
    value = read_json(path)
    assert isinstance(value, dict)
    outcomes = [_read_config(value, build, path) for build in _BUILDS]
    return "accepted" if "accepted" in outcomes else "clean"


TARGETS = [
    *(_config_target(build) for build in _BUILDS),
    Target("config:read_json", json_file_cases, prepare_json_file, read_json_file, 200),
]
