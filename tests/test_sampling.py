"""Sampling helpers on hand-made distributions: top-k, top-p, inverse-CDF draws, greedy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax.generation.sampling import (
    Sampler,
    apply_temperature,
    greedy_choice,
    sample_categorical,
    top_k_filter,
    top_p_filter,
)

NEG = -np.inf


def kept(filtered) -> list[int]:
    return np.flatnonzero(np.isfinite(np.asarray(filtered))).tolist()


def test_top_k_keeps_the_k_largest():
    logits = jnp.array([0.5, 3.0, -1.0, 2.0, 1.0])
    assert kept(top_k_filter(logits, 1)[0]) == [1]
    assert kept(top_k_filter(logits, 3)[0]) == [1, 3, 4]
    out = np.asarray(top_k_filter(logits, 2)[0])
    np.testing.assert_array_equal(out, [NEG, 3.0, NEG, 2.0, NEG])  # survivors unchanged


def test_top_k_keeps_ties_of_the_kth():
    logits = jnp.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert kept(top_k_filter(logits, 1)[0]) == [1, 2, 4]
    assert kept(top_k_filter(logits, 2)[0]) == [1, 2, 4]
    assert kept(top_k_filter(logits, 4)[0]) == [1, 2, 3, 4]


@pytest.mark.parametrize("k", [0, 5, 6, 100])
def test_top_k_off_or_at_least_vocab_keeps_everything(k):
    logits = jnp.array([0.5, 3.0, -1.0, 2.0, 1.0])
    out, top = top_k_filter(logits, k)
    np.testing.assert_array_equal(out, logits)
    assert top is None


def test_top_k_works_per_row():
    logits = jnp.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    out, top = top_k_filter(logits, 1)
    assert [kept(r) for r in out] == [[2], [0]]
    np.testing.assert_array_equal(top, [[3.0], [3.0]])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.1, 0.5, 0.3, 0.1])
    logits = jnp.log(jnp.asarray(probs))
    assert kept(top_p_filter(logits, 0.2)) == [1]  # the most likely always survives
    assert kept(top_p_filter(logits, 0.5)) == [1]  # 0.5 already reaches p
    assert kept(top_p_filter(logits, 0.55)) == [1, 2]
    assert kept(top_p_filter(logits, 0.85)) == [0, 1, 2, 3]  # tie at 0.1: both kept
    assert kept(top_p_filter(logits, 0.79)) == [1, 2]


def test_top_p_one_keeps_everything_even_negligible_tokens():
    logits = jnp.array([0.0, -200.0, -1e30, 5.0])
    np.testing.assert_array_equal(top_p_filter(logits, 1.0), logits)


def test_top_p_keeps_ties_of_the_last_needed_token():
    logits = jnp.array([2.0, 1.0, 2.0, 0.0])  # probs ~ 0.42, 0.16, 0.42, 0.06
    assert kept(top_p_filter(logits, 0.3)) == [0, 2]


def _reference_top_p(logits: np.ndarray, p: float) -> list[int]:
    """The textbook algorithm (sort, cumulative sum) for distributions without ties."""
    order = np.argsort(-logits)
    probs = np.exp(logits[order] - logits.max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    return sorted(order[before < p].tolist())


def test_top_p_matches_sort_and_cumsum_on_random_distributions():
    rng = np.random.default_rng(0)
    for trial in range(30):
        logits = rng.standard_normal(257).astype(np.float32) * (0.5 + trial / 5)
        p = float(rng.uniform(0.05, 0.99))
        assert kept(top_p_filter(jnp.asarray(logits), p)) == _reference_top_p(logits, p), trial


def test_top_p_after_top_k_searches_only_the_candidates_with_the_same_result():
    rng = np.random.default_rng(1)
    for k in (1, 3, 40):
        logits = jnp.asarray(rng.standard_normal((4, 301)), jnp.float32)
        filtered, top = top_k_filter(logits, k)
        for p in (0.1, 0.5, 0.9, 0.999):
            np.testing.assert_array_equal(
                top_p_filter(filtered, p, top), top_p_filter(filtered, p), err_msg=f"{k} {p}"
            )


def test_temperature_divides_logits():
    np.testing.assert_allclose(apply_temperature(jnp.array([1.0, -2.0]), 0.5), [2.0, -4.0])


def test_greedy_takes_the_first_of_tied_maxima():
    logits = jnp.array([[0.0, 5.0, 5.0, 1.0], [7.0, -1.0, 7.0, 7.0]])
    np.testing.assert_array_equal(greedy_choice(logits), [1, 0])


def test_inverse_cdf_draws_follow_the_distribution():
    probs = np.array([0.1, 0.0, 0.6, 0.0, 0.3])
    logits = np.log(np.maximum(probs, 1e-45)).astype(np.float32)
    logits[[1, 3]] = -np.inf
    n = 1000
    u = (np.arange(n) + 0.5) / n  # evenly spread "random" numbers
    draws = np.asarray(sample_categorical(jnp.asarray(u), jnp.asarray(np.tile(logits, (n, 1)))))
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / n, probs, atol=2 / n)


@pytest.mark.parametrize("chunk", [2, 3, 256])
def test_inverse_cdf_never_draws_an_impossible_token(chunk):
    logits = np.full((5, 11), -np.inf, np.float32)
    logits[:, [3, 7]] = [0.0, 1.0]
    u = jnp.array([0.0, 1e-9, 0.5, 0.999999, np.nextafter(np.float32(1), np.float32(0))])
    draws = np.asarray(sample_categorical(u, jnp.asarray(logits), chunk=chunk))
    assert set(draws.tolist()) <= {3, 7}
    assert draws[0] == 7 and draws[-1] == 3  # the extremes of u reach both ends


def test_sampler_is_seeded_and_respects_its_filters():
    logits = jnp.asarray(np.random.default_rng(2).standard_normal((3, 50)), jnp.float32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(0), jnp.arange(3))
    sampler = Sampler.make(temperature=0.7, top_k=2)
    first = np.asarray(sampler(keys, logits))
    np.testing.assert_array_equal(first, sampler(keys, logits))
    top2 = np.argsort(-np.asarray(logits), axis=-1)[:, :2]
    assert all(t in row for t, row in zip(first, top2, strict=True))


def test_sampler_settings():
    assert Sampler.make(temperature=0).greedy
    assert not Sampler.make(top_p=1.0).nucleus and Sampler.make(top_p=0.9).nucleus
    for bad in ({"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            Sampler.make(**bad)
