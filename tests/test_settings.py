"""The run's settings: nested sections with one owner per setting, flat where users see them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gpt2jax.cli.main import build_parser
from gpt2jax.errors import ConfigError
from gpt2jax.train.settings import SECTION_OF, SECTIONS, TrainConfig


def test_every_setting_has_one_owner():
    owners: dict[str, list[str]] = {}
    for section, cls in SECTIONS.items():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, section
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(section)
    assert {name: [SECTION_OF[name]] for name in owners} == owners


def test_flat_keywords_nested_reads_and_back():
    t = TrainConfig(model="m", data=["a.txt"], steps=7, lr=3e-4, remat="block", keep=2, seed=5)
    assert (t.schedule.steps, t.update.lr, t.memory_settings.remat) == (7, 3e-4, "block")
    assert (t.logging.keep, t.run.seed, t.dataset.data) == (2, 5, ("a.txt",))
    flat = t.to_dict()
    assert set(flat) == set(SECTION_OF)
    assert TrainConfig.from_dict(json.loads(json.dumps(flat))) == t  # what run.json holds
    assert t.replace(steps=9).schedule.steps == 9 and t.schedule.steps == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.schedule.steps = 3  # type: ignore[misc]


def test_unknown_settings_are_named():
    with pytest.raises(TypeError, match="stepz"):
        TrainConfig(stepz=3)
    with pytest.raises(ConfigError, match="run.json: unknown training settings stepz"):
        TrainConfig.from_dict({"stepz": 3})


def test_run_json_without_newer_keys_loads():
    """A run.json written before a setting existed (schedule_steps) takes its default."""
    flat = TrainConfig(model="m", data=["a"]).to_dict()
    del flat["schedule_steps"]
    assert TrainConfig.from_dict(flat).schedule.schedule_steps is None


def test_every_setting_is_a_finetune_flag():
    """The flat names are the flags: each setting can be given on the command line."""
    finetune = build_parser()._subparsers._group_actions[0].choices["finetune"]
    dests = {a.dest for a in finetune._actions}
    assert set(SECTION_OF) - {"approximate"} <= dests | {"memory"}
    assert "approximate" not in dests  # recorded by --memory, not chosen by hand
