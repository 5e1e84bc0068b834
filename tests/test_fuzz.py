"""Fuzzing the readers of untrusted files: only the project's own one-line errors may escape.

The targets (``tests/fuzzing/``) feed generated hostile inputs to the TF tensor-bundle
reader, the safetensors reader, the config readers and the tokenizer loader; the harness
(``tests/fuzzing/harness.py``) runs each under a deadline and an address-space limit. By default
each target gets a few hundred inputs (``Target.quick_examples``); ``GPT2JAX_FUZZ_EXAMPLES=N``
runs N per target, and ``-m slow`` runs the thousands-per-target variant.
``scripts/fuzz_readers.py`` runs the same targets outside pytest and prints a table.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from fuzzing.harness import Target, fuzz, run_one
from fuzzing.mutations import proto_field
from fuzzing.targets import TARGETS
from hypothesis import strategies as st

from gpt2jax.errors import CheckpointError
from gpt2jax.tokenizer import Tokenizer

SLOW_EXAMPLES = 3000


def _examples(target: Target) -> int:
    return int(os.environ.get("GPT2JAX_FUZZ_EXAMPLES", target.quick_examples))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz(name: str, tmp_path) -> None:
    stats = fuzz(TARGETS[name], _examples(TARGETS[name]), str(tmp_path), fail_fast=True)
    assert stats.crashes == stats.hangs == 0
    assert stats.tried >= _examples(TARGETS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_thousands(name: str, tmp_path) -> None:
    n = int(os.environ.get("GPT2JAX_FUZZ_EXAMPLES", SLOW_EXAMPLES))
    stats = fuzz(TARGETS[name], n, str(tmp_path), fail_fast=False)
    assert stats.crashes == stats.hangs == 0, "\n\n".join(stats.reports)


@pytest.mark.parametrize("name", ["tf_bundle", "safetensors"])
def test_unmodified_inputs_are_accepted(name: str, tmp_path) -> None:
    """The fuzzer's base inputs are valid files: what it mutates is really what readers read."""
    keep = {
        "tf_bundle": ("tf_bundle_dtypes", ("keep",), []),
        "safetensors": (
            {"w": ("F32", [2, 3], 1), "b": ("BF16", [0, 4], 2)},
            [],
            "exact",
            [],
            False,
        ),
    }[name]
    assert run_one(TARGETS[name], keep, str(tmp_path))[:2] == ("accepted", None)


def _empty_but_huge_entry() -> bytes:
    """A BundleEntryProto: float32, shape (0, 2**62), size 0 -- no bytes, but no array either."""
    dims = proto_field(2, 2, proto_field(1, 0, 0)) + proto_field(2, 2, proto_field(1, 0, 2**62))
    return proto_field(1, 0, 1) + proto_field(2, 2, dims)


#: Inputs the fuzzer found crashing the readers (each is now a clean error): (target, case).
FOUND = {
    "empty tensor with huge dims (bundle)": (
        "tf_bundle",
        ("tf_bundle_dtypes", ("records", [("entry", 0, _empty_but_huge_entry())]), []),
    ),
    "empty tensor with huge dims (safetensors)": (
        "safetensors",
        ({"w": ("F32", [0], 1)}, [("shape", 0, [0, 2**62], True)], "exact", [], True),
    ),
    "5000-digit int in a safetensors header": (
        "safetensors",
        ({"w": ("F32", [2], 1)}, [("literal", 0, "9" * 5000)], "exact", [], False),
    ),
    "HF config that is not an object": ("config:from_hf_config", ("any", [1, 2])),
    "unknown key with a newline": ("config:from_dict", ("ours", [("add", "a\nb", 1)])),
    "JSON nested past the recursion limit": (
        "config:read_json",
        (("hparams", []), [("literal", 0, "[" * 100_000 + "]" * 100_000)], []),
    ),
    "5000-digit int in a config": (
        "config:read_json",
        (("hparams", []), [("literal", 0, "9" * 5000)], []),
    ),
    # a repeated merge plus an encoder.json made to agree: ids skip one and collide with
    # <|endoftext|>, which made tiktoken panic (a PanicException, not even an Exception)
    "repeated BPE merge": ("tokenizer", (None, [("dup", 0)], "consistent", [], [], [], "\n")),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_inputs_the_fuzzer_found_are_clean_errors(name: str, tmp_path) -> None:
    target, case = FOUND[name]
    outcome, error, _ = run_one(TARGETS[target], case, str(tmp_path))
    assert (outcome, error) == ("clean", None)


@pytest.mark.parametrize(
    "encoder",
    [b"[" * 100_000, b'{"a": ' + b"9" * 5000 + b"}", b"\xff\xfe", None],
    ids=["deep", "digits", "binary", "directory"],
)
def test_tokenizer_files_json_cannot_parse_are_clean_errors(encoder, tmp_path) -> None:
    # found reading the code beside the fuzzer: RecursionError, ValueError and IsADirectoryError
    # used to escape Tokenizer.from_files
    path = tmp_path / "encoder.json"
    if encoder is None:
        path.mkdir()
    else:
        path.write_bytes(encoder)
    bpe = tmp_path / "vocab.bpe"
    bpe.write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_files(path, bpe)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# ---- the harness itself: it must be able to fail ------------------------------------------------


def _target(read) -> Target:
    return Target("probe", st.integers(0, 9), lambda case, workdir: case, read, 10)


def test_harness_reports_foreign_exceptions_as_crashes(tmp_path) -> None:
    def read(case, workdir):
        return [1, 2][case]  # IndexError for most cases

    outcome, error, _ = run_one(_target(read), 5, str(tmp_path))
    assert outcome == "crash" and isinstance(error, IndexError)
    stats = fuzz(_target(read), 20, str(tmp_path), fail_fast=False)
    assert stats.crashes > 0 and stats.reports
    with pytest.raises(AssertionError, match="probe: crash"):
        fuzz(_target(read), 20, str(tmp_path), fail_fast=True)


def test_harness_checks_error_messages(tmp_path) -> None:
    def multi_line(case, workdir):
        raise CheckpointError(f"{workdir}: first line\nsecond line")

    def unnamed(case, workdir):
        raise CheckpointError("corrupt file")

    def good(case, workdir):
        raise CheckpointError(f"{workdir}/model.ckpt.index: corrupt")

    assert run_one(_target(multi_line), 0, str(tmp_path))[0] == "crash"
    assert run_one(_target(unnamed), 0, str(tmp_path))[0] == "crash"
    assert run_one(_target(good), 0, str(tmp_path))[:2] == ("clean", None)


def test_harness_interrupts_hangs(tmp_path) -> None:
    def forever(case, workdir):
        while True:
            pass

    outcome, _, seconds = run_one(_target(forever), 0, str(tmp_path), deadline_s=0.2)
    assert outcome == "hang" and seconds < 5


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RLIMIT_AS is Linux-only")
def test_harness_stops_huge_allocations(tmp_path) -> None:
    def believes_the_size_field(case, workdir):
        return np.ones(4 << 30, np.uint8)  # 4 GiB, well past the budget

    outcome, error, _ = run_one(_target(believes_the_size_field), 0, str(tmp_path))
    assert outcome == "crash" and isinstance(error, MemoryError)
