"""Text generation: the KV-cache decoder against the uncached model and Hugging Face, and the
``generate`` API and CLI (batching, padding, stopping, streaming, seeds, prompts, buckets)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, TOKENIZER_DIR, hf_model, random_params
from gpt2jax.cli import main as cli
from gpt2jax.config import EOT_TOKEN, GPT2Config
from gpt2jax.errors import Gpt2JaxError
from gpt2jax.generation import decoding
from gpt2jax.generation.host import generate, row_keys
from gpt2jax.generation.sampling import Sampler
from gpt2jax.loader import Pretrained, load
from gpt2jax.model import GPT2, KVCache
from gpt2jax.store.model_dir import save_model_dir
from gpt2jax.tokenizer import Tokenizer

GREEDY = Sampler.make(greedy=True)
# The tokenizer needs GPT-2's whole vocabulary; everything else stays tiny.
REAL_VOCAB = GPT2Config(n_vocab=50257, n_ctx=40, n_embd=16, n_head=2, n_layer=2)


def _jnp(params):
    return jax.tree.map(jnp.asarray, params)


def _lively(config: GPT2Config, seed: int, to_jax: bool = True):
    """Random weights whose greedy continuations do not collapse into repeating one token: with
    tied embeddings a random model mostly predicts its input token again (or the token that
    ln_f's bias favours), so the positions get a larger say and ln_f no bias."""
    params = random_params(config, seed=seed, scale=1.0)
    params["wte"] = params["wte"] * 10
    params["wpe"] = params["wpe"] * 100
    params["ln_f"]["b"] = np.zeros_like(params["ln_f"]["b"])
    return _jnp(params) if to_jax else params


def _left_pad(prompts: list[list[int]]) -> tuple[jax.Array, jax.Array]:
    P = max(map(len, prompts))
    ids = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = p
    return jnp.asarray(ids), jnp.asarray([P - len(p) for p in prompts], jnp.int32)


# -- the decoder is the model --------------------------------------------------------------------


def test_cached_decoding_matches_the_uncached_forward_pass_to_the_full_context():
    """Every step's logits, for rows of different lengths decoded together until each fills
    the context (n_ctx=23), equal the plain forward pass over that row alone."""
    params = decoding.layer_params(_jnp(random_params(TINY, seed=3, scale=1.0)))
    rng = np.random.default_rng(0)
    lengths = [1, 6, 13, 22]
    prompts = [rng.integers(0, TINY.n_vocab, n).tolist() for n in lengths]
    ids, pad = _left_pad(prompts)
    B, P = ids.shape
    budget = np.array([TINY.n_ctx - n for n in lengths])
    last = jnp.asarray(P - 1 + budget, jnp.int32)
    S = P + int(budget.max())
    keys = row_keys(0, range(B), [0] * B)
    state, logits = decoding.prefill_jit(TINY, params, ids, pad, last, keys, GREEDY, -1, S)
    step = jax.jit(decoding.step, static_argnames=("config",))
    seen = [[np.asarray(logits[b])] for b in range(B)]  # logits predicting each new token
    while not bool(state.done.all()):
        state, logits = step(TINY, params, state, GREEDY, -1)
        for b in range(B):
            if len(seen[b]) < budget[b]:
                seen[b].append(np.asarray(logits[b]))

    tokens, length = np.asarray(state.tokens), np.asarray(state.length)
    np.testing.assert_array_equal(length, budget)
    full = np.zeros((B, TINY.n_ctx), np.int32)  # each row alone, right-padded (causal: harmless)
    for b in range(B):
        full[b] = tokens[b, int(pad[b]) : int(pad[b]) + TINY.n_ctx]
        np.testing.assert_array_equal(full[b, : lengths[b]], prompts[b])
    ref = np.asarray(GPT2(TINY).apply({"params": _jnp(random_params(TINY, 3, 1.0))}, full))
    for b in range(B):
        cached = np.stack(seen[b])  # (budget, V): positions lengths[b]-1 .. n_ctx-2
        expected = ref[b, lengths[b] - 1 : TINY.n_ctx - 1]
        assert np.abs(cached - expected).max() <= 1e-4
        np.testing.assert_array_equal(full[b, lengths[b] :], expected.argmax(-1))  # greedy


@pytest.mark.slow
def test_model_forward_with_its_stacked_cache_matches_the_uncached_pass():
    """GPT2.forward's own (scanned) cache path: a prompt in one call, then one token a call."""
    params = _jnp(random_params(TINY, seed=6, scale=1.0))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, TINY.n_vocab, (2, 11)), jnp.int32)
    model = GPT2(TINY)
    ref = model.apply({"params": params}, ids)
    cache = KVCache.zeros(TINY, 2, 16)
    out = model.apply({"params": params}, ids[:, :6], method="forward", cache=cache)
    logits = [out.logits]
    for t in range(6, 11):
        out = model.apply(
            {"params": params}, ids[:, t : t + 1], method="forward", cache=out.cache, cache_index=t
        )
        logits.append(out.logits)
    assert np.abs(np.concatenate(logits, axis=1) - np.asarray(ref)).max() <= 1e-4


def test_compiled_loop_equals_stepping_and_stops_each_row_at_its_stop_token():
    params = _lively(TINY, seed=4)
    ids, pad = _left_pad([[5, 17, 2], [40, 41, 42, 43, 44, 45, 46]])
    keys = row_keys(0, [0, 1], [0, 0])
    free, free_len = decoding.generate_tokens(
        TINY, params, ids, pad, keys, max_new_tokens=10, sampler=GREEDY
    )
    free = np.asarray(free)
    np.testing.assert_array_equal(free_len, [10, 10])
    # A stop token that row 0 makes first, as its k-th token, and row 1 not before it.
    k = next(k for k in range(1, 8) if free[0, k] not in [*free[0, :k], *free[1, : k + 1]])
    out, length = decoding.generate_tokens(
        TINY, params, ids, pad, keys, max_new_tokens=10, sampler=GREEDY, stop_token=int(free[0, k])
    )
    assert int(length[0]) == k + 1  # stopped, the stop token included
    np.testing.assert_array_equal(np.asarray(out)[0, : k + 1], free[0, : k + 1])
    n1 = int(length[1])
    assert n1 > k + 1  # the other row went on, unchanged
    np.testing.assert_array_equal(np.asarray(out)[1, :n1], free[1, :n1])


def test_greedy_continuation_equals_transformers_generate():
    torch = pytest.importorskip("torch")
    config = GPT2Config(n_vocab=211, n_ctx=96, n_embd=48, n_head=4, n_layer=2)
    params = _lively(config, seed=5, to_jax=False)
    prompts = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50]]
    ids, pad = _left_pad(prompts)
    n_new = 60
    ours, lengths = decoding.generate_tokens(
        config, _jnp(params), ids, pad, row_keys(0, [0, 1], [0, 0]),
        max_new_tokens=n_new, sampler=GREEDY,
    )  # fmt: skip
    np.testing.assert_array_equal(lengths, [n_new, n_new])

    model = hf_model(params, config)
    mask = (np.arange(ids.shape[1])[None, :] >= np.asarray(pad)[:, None]).astype(np.int64)
    with torch.no_grad():
        theirs = model.generate(
            torch.from_numpy(np.asarray(ids, np.int64)),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            pad_token_id=EOT_TOKEN,
            eos_token_id=None,
        )[:, ids.shape[1] :].numpy()
    assert len(set(theirs.ravel().tolist())) > 20  # not a degenerate repetition
    np.testing.assert_array_equal(np.asarray(ours), theirs)


# -- the generate API ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gen") / "tiny"
    save_model_dir(path, REAL_VOCAB, random_params(REAL_VOCAB, 0, 1.0), tokenizer_dir=TOKENIZER_DIR)
    return str(path)


@pytest.fixture(scope="module")
def model(model_dir) -> Pretrained:
    return load(model_dir)


PROMPTS = ["Hello world", "The meaning of life is", "a"]


def test_batched_rows_equal_each_row_generated_alone(model):
    together = generate(model, PROMPTS, max_new_tokens=12, greedy=True, batch_size=3)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, prompt, max_new_tokens=12, greedy=True)[0]
        assert together[i].tokens == alone.tokens
        assert together[i].text == alone.text
        assert together[i].prompt_index == i and together[i].finish_reason == "length"


@pytest.mark.slow
def test_samples_do_not_depend_on_the_batch_they_ran_in(model):
    kwargs = dict(max_new_tokens=8, top_k=50, seed=7, num_samples=3)
    small = generate(model, PROMPTS[:2], batch_size=4, **kwargs)  # 6 samples: batches 4 + 2
    big = generate(model, PROMPTS[:2], batch_size=3, **kwargs)  # batches 3 + 3
    assert [(g.prompt_index, g.sample_index) for g in small] == [
        (i, j) for i in range(2) for j in range(3)
    ]
    assert [g.tokens for g in small] == [g.tokens for g in big]
    assert len({tuple(g.tokens) for g in small}) == 6  # every sample its own randomness


def test_seed_determinism(model):
    a = generate(model, "Once upon", max_new_tokens=10, top_k=50, seed=3)[0]
    b = generate(model, "Once upon", max_new_tokens=10, top_k=50, seed=3)[0]
    c = generate(model, "Once upon", max_new_tokens=10, top_k=50, seed=4)[0]
    assert a.text == b.text and a.tokens == b.tokens
    assert c.tokens != a.tokens


def test_top_k_one_is_greedy(model):
    sampled = generate(model, "Once upon", max_new_tokens=10, top_k=1, seed=9)[0]
    assert sampled.tokens == generate(model, "Once upon", max_new_tokens=10, greedy=True)[0].tokens


def test_stop_string_cuts_the_text_and_streaming_adds_up(model):
    full = generate(model, "Hello world", max_new_tokens=20, greedy=True)[0]
    stop = full.text[6:9]
    cut = full.text.find(stop)
    streamed: dict[int, list] = {}

    def on_token(i, ids, text):
        streamed.setdefault(i, []).append((ids, text))

    kwargs = dict(max_new_tokens=20, greedy=True, stop=[stop], on_token=on_token)
    out = generate(model, "Hello world", **kwargs)[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert out.tokens == full.tokens[: len(out.tokens)] and len(out.tokens) < 20
    assert stop in model.decode(out.tokens) and stop not in model.decode(out.tokens[:-1])
    assert "".join(t for _, t in streamed[0]) == out.text
    assert sum((ids for ids, _ in streamed[0]), []) == out.tokens


def test_streaming_every_sample_of_a_batch(model):
    got: dict[int, str] = {}
    out = generate(
        model, PROMPTS, max_new_tokens=20, top_k=50, seed=1, batch_size=2,
        on_token=lambda i, ids, text: got.__setitem__(i, got.get(i, "") + text),
    )  # fmt: skip
    assert got == {i: g.text for i, g in enumerate(out)}


@pytest.fixture(scope="module")
def eot_model(tokenizer) -> Pretrained:
    """A model whose every next token is <|endoftext|> (final LayerNorm output is constant)."""
    params = random_params(REAL_VOCAB, 1, 1.0)
    params["ln_f"]["g"] = np.zeros_like(params["ln_f"]["g"])
    params["ln_f"]["b"] = np.eye(REAL_VOCAB.n_embd, dtype=np.float32)[0]
    params["wte"][EOT_TOKEN, 0] = 100.0
    return Pretrained(REAL_VOCAB, params, tokenizer, path="", kind="test")


def test_end_of_text_stops_unless_told_not_to(eot_model):
    out = generate(eot_model, ["Hi", "there you"], max_new_tokens=5, seed=0)
    assert [(g.tokens, g.text, g.finish_reason) for g in out] == [([], "", "eot")] * 2
    out = generate(eot_model, "Hi", max_new_tokens=5, stop_at_eot=False)[0]
    assert out.tokens == [EOT_TOKEN] * 5 and out.finish_reason == "length"
    assert out.text == "<|endoftext|>" * 5


def test_include_prompt_and_unconditional(model):
    plain = generate(model, "Hello world", max_new_tokens=6, greedy=True)[0]
    both = generate(model, "Hello world", max_new_tokens=6, greedy=True, include_prompt=True)[0]
    assert both.text == "Hello world" + plain.text
    assert both.tokens == model.tokenizer.encode("Hello world") + plain.tokens
    free = generate(model, None, max_new_tokens=6, greedy=True)[0]
    assert free.prompt == "" and free.prompt_tokens == [EOT_TOKEN]
    assert free.tokens == generate(model, [[EOT_TOKEN]], max_new_tokens=6, greedy=True)[0].tokens
    assert free.tokens == generate(model, "", max_new_tokens=6, greedy=True)[0].tokens


def test_generation_stops_at_the_end_of_the_context(model):
    prompt = list(range(100, 130))  # 30 of the 40 positions
    out = generate(model, [prompt], max_new_tokens=25, greedy=True)[0]
    assert len(out.tokens) == 10 and out.finish_reason == "context"


def test_too_long_prompts_are_refused_or_truncated(model):
    prompt = list(range(1000, 1045))  # 45 tokens > n_ctx = 40
    with pytest.raises(Gpt2JaxError, match="45 tokens.*context is 40.*truncate"):
        generate(model, [prompt], max_new_tokens=5)
    out = generate(model, [prompt], max_new_tokens=5, truncate_prompt=True, greedy=True)[0]
    assert out.prompt_tokens == prompt[-35:] and len(out.tokens) == 5
    assert out.tokens == generate(model, [prompt[-35:]], max_new_tokens=5, greedy=True)[0].tokens


def test_bad_arguments_are_clear_errors(model):
    for kwargs, match in [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"num_samples": 0}, "num_samples"),
    ]:
        with pytest.raises(Gpt2JaxError, match=match):
            generate(model, "hi", **kwargs)
    with pytest.raises(Gpt2JaxError, match="token id 50257"):
        generate(model, [[1, 50257]])
    with pytest.raises(Gpt2JaxError, match="no prompts"):
        generate(model, [])


def test_prompt_lengths_in_one_bucket_share_the_compiled_programs(tokenizer):
    """Prompts of 2 and 9 tokens share the 16-slot bucket; 20 tokens need a new prefill (32
    slots) but the same cache bucket (64), so the decoding loop is not compiled again."""
    config = dataclasses.replace(REAL_VOCAB, n_ctx=48)  # a config no other test compiles for
    model = Pretrained(config, random_params(config, 2), tokenizer, path="", kind="test")
    generate(model, "one two", max_new_tokens=4, greedy=True)
    counts = decoding.prefill_jit._cache_size(), decoding.decode_jit._cache_size()
    generate(model, "one two three four five six seven eight nine", max_new_tokens=4, greedy=True)
    generate(model, "nine", max_new_tokens=4, greedy=True)
    assert (decoding.prefill_jit._cache_size(), decoding.decode_jit._cache_size()) == counts
    generate(model, " x" * 20, max_new_tokens=4, greedy=True)
    assert decoding.prefill_jit._cache_size() == counts[0] + 1
    assert decoding.decode_jit._cache_size() == counts[1]


def test_bfloat16_weights_and_compute(model_dir):
    m = load(model_dir, dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    assert jax.tree.leaves(m.params)[0].dtype == jnp.bfloat16
    out = generate(m, PROMPTS[:1], max_new_tokens=8, greedy=True)
    ref = generate(load(model_dir), PROMPTS[:1], max_new_tokens=8, greedy=True)
    assert len(out[0].tokens) == 8
    # bf16 rounding may flip a near-tie, but most greedy tokens agree with float32
    assert np.mean(np.array(out[0].tokens) == np.array(ref[0].tokens)) >= 0.5


# -- the command line ----------------------------------------------------------------------------


def test_cli_streams_one_sample(model, model_dir, capsys):
    assert cli.main(["generate", model_dir, "--prompt", "Hello world", "--max-new-tokens", "8",
                     "--seed", "2", "--top-k", "50"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    expected = generate(model, "Hello world", max_new_tokens=8, seed=2, top_k=50)[0].text
    assert printed == expected + "\n"


@pytest.mark.slow
def test_cli_writes_jsonl_for_many_samples_and_prompt_files(model, model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\n\nThe meaning of life is\n")
    out = tmp_path / "samples.jsonl"
    argv = ["generate", model_dir, "--prompt-file", str(prompts), "--out", str(out),
            "--num-samples", "3", "--batch-size", "4", "--max-new-tokens", "5", "--seed", "1",
            "--top-k", "50", "--include-prompt"]  # fmt: skip
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [
        (i, j) for i in range(2) for j in range(3)
    ]
    assert rows[3]["text"].startswith("The meaning of life is")
    expected = generate(model, PROMPTS[:2], max_new_tokens=5, top_k=50, seed=1, num_samples=3)
    assert [r["tokens"][-5:] for r in rows] == [g.tokens for g in expected]

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "Hello world"}\n{"prompt": "a"}\n')
    assert cli.main(["generate", model_dir, "--prompt-file", str(jsonl), "--out", str(out),
                     "--max-new-tokens", "3", "--greedy"]) == 1  # fmt: skip
    assert "already exists (use --force" in capsys.readouterr().err
    assert cli.main(["generate", model_dir, "--prompt-file", str(jsonl), "--out", str(out),
                     "--max-new-tokens", "3", "--greedy", "--force"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello world", "a"]


def test_cli_unconditional_and_errors(model_dir, tmp_path, capsys):
    assert cli.main(["generate", model_dir, "--max-new-tokens", "4", "--greedy"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", model_dir, "--prompt", "x" * 400, "--max-new-tokens", "3"]) == 1
    err = capsys.readouterr().err
    assert "context is 40" in err and "Traceback" not in err and err.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    assert cli.main(["generate", model_dir, "--prompt-file", str(bad)]) == 1
    assert "bad.jsonl" in capsys.readouterr().err
