"""``gpt2jax plan``: memory prediction against a real step, and the search's choices."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import FIXTURES
from gpt2jax.cli.main import main
from gpt2jax.config import GPT2Config
from gpt2jax.errors import ConfigError
from gpt2jax.train.memory.planner import (
    Candidate,
    GiB,
    Planner,
    approximations,
    candidates,
    chosen_line,
    expected_cost,
    parse_memory,
    search,
    usable_bytes,
)
from gpt2jax.train.memory.probe import run_probe
from gpt2jax.train.settings import MemorySettings

TINY_MODEL = str(FIXTURES / "openai_tiny")
# Big enough that the step's memory (0.9-1.7 GB: a 25M-parameter vocabulary, optimizer state,
# activations of 4 x 256 tokens) dominates the process's own noise (tens of MB).
PROBE_CONFIG = GPT2Config(n_vocab=50257, n_ctx=256, n_embd=512, n_head=8, n_layer=6)


@pytest.mark.parametrize(
    "settings",
    [
        MemorySettings(remat="block", optimizer="adafactor", loss_chunk=64),
        pytest.param(MemorySettings(), marks=pytest.mark.slow),
    ],
    ids=["lean", "plain"],
)
@pytest.mark.slow
def test_predicted_peak_is_within_20_percent_of_measured(settings):
    """One real step in a fresh process: its peak RSS growth (state, batch, every temporary)
    against the compiled memory analysis (measured here: within 6% for lean, 3% for plain)."""
    result = run_probe(PROBE_CONFIG, settings, seq_len=256, batch_size=4, grad_accum=1)
    assert result["measured"] > 0.5 * GiB
    assert abs(result["predicted"] - result["measured"]) <= 0.2 * result["measured"], result


def test_parse_memory():
    """GB is 10^9 bytes and GiB 2^30, as the units say."""
    assert parse_memory("16GB") == 16 * 10**9 == parse_memory("16 g") == parse_memory("16gb")
    assert parse_memory("16GiB") == 16 * GiB == parse_memory("16Gi")
    assert parse_memory("1.5GiB") == int(1.5 * GiB)
    assert parse_memory("800MB") == 800 * 10**6
    assert parse_memory("800MiB") == 800 * 2**20
    assert usable_bytes(16 * GiB) == 15 * GiB
    for bad in ("sixteen", "16XB", "-1GB", "0", "nanGB"):
        with pytest.raises(ConfigError, match="--memory"):
            parse_memory(bad)


def test_candidates_are_ordered_by_expected_speed():
    order = sorted(candidates(MemorySettings(), 8, 1), key=lambda c: expected_cost(c, 1024, 1))
    first, last = order[0], order[-1]
    assert (first.settings.remat, first.settings.optimizer, first.grad_accum) == (
        "none",
        "adamw",
        1,
    )
    assert first.settings.loss_chunk == 0 and first.settings.opt_state_dtype == "float32"
    assert last.settings.remat == "block" and last.grad_accum == 8
    sgd = candidates(MemorySettings(optimizer="sgd"), 4, 2)
    assert {c.settings.optimizer for c in sgd} == {"sgd"}
    assert {c.grad_accum for c in sgd} == {1, 2}  # micro-batches must split over 2 devices


class FakePlanner:
    """Peaks from a formula instead of compiling: tests the search alone."""

    n_devices, seq_len, runtime = 1, 1024, 0
    parallels = ("data",)

    def __init__(self):
        self.compiled: list[Candidate] = []

    def state_bytes(self, c: Candidate) -> int:
        state = {"adamw": 3, "adafactor": 1, "sgd": 2}[c.settings.optimizer]
        if c.settings.opt_state_dtype == "bfloat16":
            state -= 1
        return (state + (2 if c.grad_accum > 1 else 1)) * GiB

    def predict(self, c: Candidate):
        self.compiled.append(c)
        act = {"none": 4, "dots": 2, "block": 1}[c.settings.remat] * c.micro_batch * GiB // 4
        peak = self.state_bytes(c) + act + (0 if c.settings.loss_chunk else GiB // 2)
        return peak, {"arguments": 0, "outputs": 0, "temporaries": peak, "aliased": 0}

    def whole_run(self, c: Candidate):
        peak, _ = self.predict(c)
        return peak, {"runtime": 0, "step": peak, "eval": 0, "sample": 0, "save": 0}


def test_search_returns_the_fastest_candidate_that_fits():
    fake = FakePlanner()
    chosen, rows = search(fake, MemorySettings(), 5 * GiB, 4)
    assert chosen is not None and rows[-1].fits and rows[-1].candidate == chosen
    limit = usable_bytes(5 * GiB)
    assert fake.predict(chosen)[0] <= limit
    cost = expected_cost(chosen, 1024, 1)
    base = MemorySettings()
    k = len(approximations(chosen, base))  # no candidate with fewer approximations fits
    assert all(r.approximate or not r.fits for r in rows) if k else True
    faster = [
        c
        for c in candidates(base, 4, 1)
        if expected_cost(c, 1024, 1) < cost and len(approximations(c, base)) <= k
    ]
    assert faster and all(fake.predict(c)[0] > limit for c in faster)
    assert any(r.peak is None and "alone" in r.why for r in rows)  # skipped without compiling


def test_search_approximates_only_when_nothing_exact_fits():
    """AdamW float32 (3 GiB of state + 1 of gradients) cannot fit 4.2 GiB with activations:
    the planner then takes an approximation and the row says what it is."""
    chosen, rows = search(FakePlanner(), MemorySettings(), int(4.6 * GiB), 4)
    assert chosen is not None
    row = next(r for r in rows if r.candidate == chosen and r.fits)
    assert row.approximate == approximations(chosen, MemorySettings()) != ()
    exact_rows = [r for r in rows if not r.approximate]
    assert exact_rows and not any(r.fits for r in exact_rows)
    assert "APPROXIMATE" in chosen_line(row, MemorySettings())


def test_search_skips_leaner_optimizer_states_that_cannot_make_up_the_difference():
    """Without remat, 4 windows of activations (4 GiB here) exceed the budget whatever the
    optimizer: once AdamW's step was compiled, Adafactor's and bfloat16 state's are ruled out
    by it (the state they save is less than the excess) without compiling them; the choice is
    the one a search compiling everything makes (the fastest that fits)."""
    fake = FakePlanner()
    chosen, rows = search(fake, MemorySettings(), 5 * GiB, 4)
    skipped = [r for r in rows if "not compiled" in r.why]
    assert skipped and all(r.peak is None and not r.fits for r in skipped)
    for r in skipped:
        assert r.candidate not in fake.compiled
        assert fake.predict(r.candidate)[0] > usable_bytes(5 * GiB)  # truly too big
    fits = [
        c for c in candidates(MemorySettings(), 4, 1) if fake.predict(c)[0] <= usable_bytes(5 * GiB)
    ]
    key = lambda c: (len(approximations(c, MemorySettings())), expected_cost(c, 1024, 1))  # noqa: E731
    assert chosen == min(fits, key=key)


def test_search_gives_up_early_and_halves_an_unset_batch():
    fake = FakePlanner()
    chosen, rows = search(fake, MemorySettings(), 3 * GiB, 8)
    assert chosen is None
    assert len(fake.compiled) <= 2  # only the leanest were compiled
    chosen, rows = search(FakePlanner(), MemorySettings(), 3 * GiB, 8, batch_given=False)
    assert chosen is not None and chosen.batch_size < 8


class FakeTwoWay(FakePlanner):
    """Four devices, both parallel modes: FSDP holds a quarter of the state on each device."""

    n_devices = 4
    parallels = ("data", "fsdp")

    def state_bytes(self, c: Candidate) -> int:
        whole = super().state_bytes(c)
        return whole // 4 if c.settings.parallel == "fsdp" else whole


def test_search_takes_fsdp_when_data_parallel_does_not_fit_exactly():
    """With several devices FSDP is a candidate: chosen over an approximation when exact data
    parallelism does not fit, never when it does, and not at all with --parallel given."""
    base = MemorySettings()
    roomy, _ = search(FakeTwoWay(), base, 64 * GiB, 8)
    assert roomy.settings.parallel == "data"
    tight, rows = search(FakeTwoWay(), base, int(4.6 * GiB), 8)
    assert tight.settings.parallel == "fsdp" and approximations(tight, base) == ()
    assert any(r.candidate.settings.parallel == "data" and not r.fits for r in rows)
    given, _ = search(FakeTwoWay(), base, int(4.6 * GiB), 8, fixed={"parallel"})
    assert given.settings.parallel == "data" and approximations(given, base) != ()


def test_user_settings_stay_fixed():
    base = MemorySettings(lora_rank=4, compute_dtype="bfloat16")
    for c in candidates(base, 2, 1):
        assert c.settings.lora_rank == 4 and c.settings.compute_dtype == "bfloat16"


def test_state_bytes_count_state_and_gradients():
    """Without compiling: float32 params + gradients (+ AdamW's two moments; Adafactor's
    factored statistics are small for matrices of 128 x 128 and up), per device."""
    config = GPT2Config(n_vocab=257, n_ctx=16, n_embd=128, n_head=2, n_layer=1)
    planner = Planner(config, 16)
    n = config.num_params() * 4
    lean = Candidate(MemorySettings(optimizer="adafactor"), 2, 1)
    adamw = dataclasses.replace(lean, settings=MemorySettings())
    assert 2 * n < planner.state_bytes(lean) < 2.2 * n
    assert 4 * n < planner.state_bytes(adamw) < 4.1 * n
    accumulating = dataclasses.replace(adamw, grad_accum=2)
    assert planner.state_bytes(accumulating) - planner.state_bytes(adamw) == n
    # Block remat accumulates in place (gpt2jax.train.memory.accumulate): no second gradient buffer.
    in_place = Candidate(MemorySettings(remat="block"), 2, 2)
    assert planner.state_bytes(in_place) == planner.state_bytes(adamw)


def test_plan_command(capsys):
    """Flags given stay fixed: here everything but the loss chunk, so two compiles at most."""
    fixed = ["--remat", "block", "--optimizer", "adafactor", "--grad-accum", "1"]
    # On the CPU the budget covers this (pytest) process's own memory too: be generous.
    args = ["plan", TINY_MODEL, "--memory", "64GiB", "--seq-len", "16", "--batch-size", "2"]
    assert main(args + fixed) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "chosen: --remat block --optimizer adafactor" in out
    assert "64GiB = 68.72 GB (64.00 GiB)" in out and "exact" in out
    assert main(["plan", "124M", "--memory", "100MB", "--seq-len", "32"]) == 1
    out = capsys.readouterr().out
    assert "nothing fits" in out and "alone need" in out
