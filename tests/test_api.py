"""The Python API reference: ``gpt2jax.__all__`` names what is public, and all of it is documented.

``help(gpt2jax)`` and the docstrings are the reference README.md points to: every name in
``__all__`` must exist and have a docstring, and so must the public methods of its classes and
every public function and class of the modules the README sends research code to.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import types

import pytest

import gpt2jax

#: Modules whose public names are part of the documented API (README.md, gpt2jax.__doc__).
API_MODULES = (
    "gpt2jax.attention",
    "gpt2jax.store.model_dir",
    "gpt2jax.config",
    "gpt2jax.convert.hf",
    "gpt2jax.convert.openai_export",
    "gpt2jax.convert.openai_tf",
    "gpt2jax.device",
    "gpt2jax.generation.decoding",
    "gpt2jax.store.download",
    "gpt2jax.errors",
    "gpt2jax.train.evaluate",
    "gpt2jax.train.loop",
    "gpt2jax.generation.host",
    "gpt2jax.store.sizes",
    "gpt2jax.model",
    "gpt2jax.loader",
    "gpt2jax.loss_scale",
    "gpt2jax.tokenizer",
)


def undocumented(obj: object, name: str) -> list[str]:
    """``name`` and its public methods / properties that have no docstring of their own."""
    missing = [] if (inspect.getdoc(obj) or "").strip() else [name]
    if inspect.isclass(obj):
        for attr, value in vars(obj).items():
            if attr.startswith("_"):
                continue
            if isinstance(value, (classmethod, staticmethod)):
                value = value.__func__
            if isinstance(value, property):
                value = value.fget
            if inspect.isfunction(value) and not (value.__doc__ or "").strip():
                missing.append(f"{name}.{attr}")
    return missing


def test_all_lists_existing_names_once() -> None:
    assert len(gpt2jax.__all__) == len(set(gpt2jax.__all__))
    for name in gpt2jax.__all__:
        assert hasattr(gpt2jax, name), name
    # A function named like a submodule hides it as an attribute: in no package does one
    # (``generate`` lives in ``gpt2jax.generation.host``, ``finetune`` in ``gpt2jax.train.loop``).
    for package in (
        "gpt2jax",
        *(m.name for m in pkgutil.walk_packages(gpt2jax.__path__, "gpt2jax.")),
    ):
        if package.endswith("__main__"):
            continue  # importing it runs the command line
        module = importlib.import_module(package)
        if not hasattr(module, "__path__"):
            continue
        for name, value in vars(module).items():
            if not isinstance(value, types.ModuleType) and not name.startswith("_"):
                assert importlib.util.find_spec(f"{package}.{name}") is None, f"{package}.{name}"


@pytest.mark.parametrize("name", gpt2jax.__all__)
def test_public_name_is_documented(name: str) -> None:
    assert undocumented(getattr(gpt2jax, name), name) == []


@pytest.mark.parametrize("module_name", API_MODULES)
def test_api_module_is_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    missing = [] if (module.__doc__ or "").strip() else [f"{module_name} (module)"]
    for name, value in vars(module).items():
        public = not name.startswith("_") and getattr(value, "__module__", None) == module_name
        if public and (inspect.isfunction(value) or inspect.isclass(value)):
            missing += undocumented(value, f"{module_name}.{name}")
    assert missing == []


def test_undocumented_finds_what_is_missing() -> None:
    class Documented:
        """Yes."""

        def method(self) -> None:
            """Yes."""

    class Bare:
        def method(self) -> None:
            pass

        @property
        def prop(self) -> int:
            return 1

    assert undocumented(Documented, "D") == []
    assert undocumented(Bare, "B") == ["B", "B.method", "B.prop"]
    assert undocumented(lambda: None, "f") == ["f"]
