"""Settings files for ``gpt2jax finetune --config FILE``: TOML, JSON or YAML.

A file holds one table of settings named like the command's flags (``batch_size`` or
``batch-size``). A run's ``run.json`` is a settings file too: its ``train`` table (every
setting of that run) is read, so ``--config runs/a/run.json --out runs/b`` repeats run ``a``.
TOML is read with the standard library's ``tomllib`` (Python 3.11+; ``tomli`` before), YAML
only where PyYAML is installed.
"""

from __future__ import annotations

import json
import os
from typing import Any

from gpt2jax.errors import ConfigError

RUN_FORMAT = "gpt2jax-run"  # run.json's "format" (gpt2jax.store.runs.FORMAT)


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in ``path`` as ``{name: value}``, names with ``_`` for ``-``.

    The format comes from the extension (``.toml``, ``.json``, ``.yaml``/``.yml``). Raises
    :class:`ConfigError` for a missing or unparsable file, or one that is not a table.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    readers = {".toml": _toml, ".json": _json, ".yaml": _yaml, ".yml": _yaml}
    if ext not in readers:
        raise ConfigError(f"{path}: a settings file must end in .toml, .json, .yaml or .yml")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the settings file ({e.strerror})") from None
    data = readers[ext](path, raw)
    if isinstance(data, dict) and data.get("format") == RUN_FORMAT:
        data = dict(data.get("train", {}))  # a run's run.json: its training settings
        if data.get("schedule_steps") == data.get("steps"):
            del data["schedule_steps"]  # recorded from --steps: a new --steps should move it
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings, got {type(data).__name__}")
    settings = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in settings:
            raise ConfigError(f"{path}: {key!r} is given twice")
        settings[name] = value
    return settings


def _toml(path: str, raw: bytes) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(
                f"{path}: reading TOML on Python 3.10 needs `pip install tomli` (or use JSON)"
            ) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def _json(path: str, raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _yaml(path: str, raw: bytes) -> Any:
    try:
        import yaml
    except ModuleNotFoundError:
        raise ConfigError(
            f"{path}: reading YAML needs `pip install pyyaml` (or use TOML)"
        ) from None
    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
