"""The research API: Hugging Face's keywords (against transformers' torch GPT-2 on padded
batches), attention probabilities and sown intermediates through the layer scan (and that they
cost nothing when off), layer views, the one KV-cache type, and the NNX bridge."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gpt2jax
from conftest import TINY, hf_model, random_params
from gpt2jax import model as model_lib
from gpt2jax.generation import decoding
from gpt2jax.generation.sampling import Sampler
from gpt2jax.model import GPT2, GPT2Output, KVCache

torch = pytest.importorskip("torch")

LENGTHS = [19, 11, 4]  # tokens per row of a padded batch


def _padded(side: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``ids (B, T)`` with each row's tokens at the ``side`` end, and ``mask (B, T)`` 1/0."""
    rng = np.random.default_rng(seed)
    T = max(LENGTHS)
    ids = rng.integers(0, TINY.n_vocab, (len(LENGTHS), T))  # padding: random ids too
    mask = np.zeros_like(ids)
    for b, n in enumerate(LENGTHS):
        if side == "left":
            mask[b, T - n :] = 1
        else:
            mask[b, :n] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("positions", ["default", "from-mask"])
def test_hf_keywords_match_transformers_on_padded_batches(side, positions):
    """``attention_mask``, ``position_ids``, ``output_hidden_states``, ``output_attentions`` on
    ``GPT2.__call__`` mean what they mean for transformers' ``GPT2LMHeadModel`` (eager
    attention, which returns its probabilities): logits, every hidden state and every layer's
    attention probabilities agree at the positions that are tokens (a padding position's
    output is undefined in both)."""
    params = random_params(TINY, seed=5)
    ids, mask = _padded(side, seed=1)
    kwargs = {}
    if positions == "from-mask":  # what generate() passes for left padding
        kwargs["position_ids"] = np.maximum(np.cumsum(mask, -1) - 1, 0)
    out = GPT2(TINY).apply(
        {"params": params},
        jnp.asarray(ids),
        attention_mask=jnp.asarray(mask),
        output_hidden_states=True,
        output_attentions=True,
        **{k: jnp.asarray(v) for k, v in kwargs.items()},
    )
    assert isinstance(out, GPT2Output)
    hf = hf_model(params, TINY)
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        ref = hf(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            output_hidden_states=True,
            output_attentions=True,
            **{k: torch.from_numpy(v) for k, v in kwargs.items()},
        )
    real = mask.astype(bool)
    np.testing.assert_allclose(out.logits[real], ref.logits.numpy()[real], atol=1e-4, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY.n_layer + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(ours)[real], theirs.numpy()[real], atol=1e-4)
    assert len(out.attentions) == len(ref.attentions) == TINY.n_layer
    for ours, theirs in zip(out.attentions, ref.attentions, strict=True):
        ours, theirs = np.asarray(ours), theirs.numpy()  # (B, H, T, T)
        assert ours.shape == theirs.shape == (len(LENGTHS), TINY.n_head, ids.shape[1], ids.shape[1])
        for b in range(len(LENGTHS)):
            q = real[b]
            np.testing.assert_allclose(ours[b][:, q], theirs[b][:, q], atol=1e-5)
            assert np.all(ours[b][:, q][:, :, ~real[b]] == 0)  # padding never attended to


def test_call_without_output_flags_still_returns_logits():
    params = random_params(TINY)
    ids = jnp.zeros((2, 5), jnp.int32)
    logits = GPT2(TINY).apply({"params": params}, ids, attention_mask=jnp.ones((2, 5)))
    assert isinstance(logits, jax.Array) and logits.shape == (2, 5, TINY.n_vocab)


def _intermediates(remat: str, **apply_kwargs):
    params = random_params(TINY, seed=2)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, TINY.n_vocab, (2, 9)))
    model = GPT2(TINY, remat=remat)
    out, state = model.apply(
        {"params": params},
        ids,
        output_hidden_states=True,
        output_attentions=True,
        mutable=["intermediates"],
        **apply_kwargs,
    )
    return out, state["intermediates"]


@pytest.mark.parametrize("remat", ["none", "block"])
def test_blocks_sow_through_the_scan(remat):
    """``mutable=["intermediates"]`` returns what every block sowed, stacked over layers:
    block outputs equal the next block's input (``hidden_states``), the probabilities equal
    ``output_attentions``, and attention + MLP outputs add up to the residual stream."""
    out, inter = _intermediates(remat)
    h = inter["h"]
    (block_out,) = h["out"]
    assert block_out.shape == (TINY.n_layer, 2, 9, TINY.n_embd)
    for i in range(TINY.n_layer - 1):
        np.testing.assert_array_equal(block_out[i], out.hidden_states[i + 1])
    (probs,) = h["attn"]["probs"]
    assert probs.shape == (TINY.n_layer, 2, TINY.n_head, 9, 9)
    for i in range(TINY.n_layer):
        np.testing.assert_array_equal(probs[i], out.attentions[i])
    (attn_out,), (mlp_out,) = h["attn_out"], h["mlp_out"]
    x_in = jnp.stack(out.hidden_states[:-1])
    np.testing.assert_allclose(x_in + attn_out + mlp_out, block_out, atol=1e-5)


def test_capture_intermediates_reaches_inside_the_scan():
    """Flax's ``capture_intermediates=True`` records the outputs of the modules inside the
    scanned blocks too (stacked over layers), e.g. every ``mlp/c_fc`` projection."""
    params = random_params(TINY, seed=2)
    ids = jnp.zeros((2, 7), jnp.int32)
    _, state = GPT2(TINY).apply(
        {"params": params}, ids, capture_intermediates=True, mutable=["intermediates"]
    )
    (c_fc,) = state["intermediates"]["h"]["mlp"]["c_fc"]["__call__"]
    assert c_fc.shape == (TINY.n_layer, 2, 7, 4 * TINY.n_embd)
    (ln_f,) = state["intermediates"]["ln_f"]["__call__"]
    assert ln_f.shape == (2, 7, TINY.n_embd)


def _hlo(fn, *args) -> str:
    text = jax.jit(fn).lower(*args).compile().as_text()
    text = re.sub(r", metadata=\{[^}]*\}", "", text)  # source locations
    return re.sub(r"^\d+ (\{|\").*$\n?", "", text, flags=re.M)


@pytest.mark.parametrize("remat", ["none", "block"])
def test_research_outputs_cost_nothing_when_off(monkeypatch, remat):
    """With the outputs off, the compiled forward pass and gradient are the programs of a model
    whose blocks sow nothing and never compute attention probabilities for output."""
    params = jax.tree.map(jnp.asarray, random_params(TINY, seed=4))
    ids = jnp.zeros((2, 11), jnp.int32)
    model = GPT2(TINY, remat=remat)

    def forward(p, x):
        return model.apply({"params": p}, x)

    def grad(p, x):
        return jax.grad(lambda p: forward(p, x).sum())(p)

    programs = [_hlo(forward, params, ids), _hlo(grad, params, ids)]
    on = _hlo(lambda p, x: model.apply({"params": p}, x, output_attentions=True), params, ids)
    assert on != programs[0]  # the comparison can tell programs apart

    def no_probs(*args):
        raise AssertionError("attention probabilities computed while off")

    monkeypatch.setattr(nn.Module, "sow", lambda self, *a, **k: False)
    monkeypatch.setattr(model_lib, "_slot_probs", no_probs)
    assert [_hlo(forward, params, ids), _hlo(grad, params, ids)] == programs


# -- layer views ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_layers_and_stack_layers_are_exact_inverses(kind):
    params = random_params(TINY, seed=7)
    if kind == "jax":
        params = jax.tree.map(jnp.asarray, params)
    views = gpt2jax.layers(params)
    assert len(views) == TINY.n_layer
    np.testing.assert_array_equal(
        views[2]["attn"]["c_attn"]["w"], params["h"]["attn"]["c_attn"]["w"][2]
    )
    heads = gpt2jax.layers(params, n_head=TINY.n_head)
    C, H, D = TINY.n_embd, TINY.n_head, TINY.head_dim
    assert heads[0]["attn"]["q"]["w"].shape == (C, H, D)
    assert heads[0]["attn"]["v"]["b"].shape == (H, D)
    assert heads[0]["attn"]["o"]["w"].shape == (H, D, C)
    assert heads[0]["mlp"]["c_fc"]["w"].shape == (C, 4 * C)
    for back in (gpt2jax.stack_layers(views), gpt2jax.stack_layers(heads)):
        flat, ref = jax.tree.leaves_with_path(back), jax.tree.leaves_with_path(params["h"])
        assert [p for p, _ in flat] == [p for p, _ in ref]
        for (_, x), (_, y) in zip(flat, ref, strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)  # bitwise
        assert isinstance(jax.tree.leaves(back)[0], np.ndarray) == (kind == "numpy")
    if kind == "numpy":  # views, not copies
        assert np.shares_memory(views[1]["mlp"]["c_fc"]["w"], params["h"]["mlp"]["c_fc"]["w"])


def test_per_head_views_are_the_heads_the_model_computes():
    """q/k/v per head reproduce the model's attention of a layer (from its sown probabilities),
    and o per head sums to the attention output: the split is the model's, not a guess."""
    params = jax.tree.map(jnp.asarray, random_params(TINY, seed=8))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, TINY.n_vocab, (1, 8)))
    out, state = GPT2(TINY).apply(
        {"params": params}, ids, output_hidden_states=True, mutable=["intermediates"]
    )
    i = 1
    layer = gpt2jax.layers(params, n_head=TINY.n_head)[i]
    ln = model_lib.LayerNorm(1e-5, jnp.float32, jnp.float32)
    x = ln.apply({"params": layer["ln_1"]}, out.hidden_states[i])[0]  # (T, C)
    q = jnp.einsum("tc,chd->htd", x, layer["attn"]["q"]["w"]) + layer["attn"]["q"]["b"][:, None]
    k = jnp.einsum("tc,chd->htd", x, layer["attn"]["k"]["w"]) + layer["attn"]["k"]["b"][:, None]
    v = jnp.einsum("tc,chd->htd", x, layer["attn"]["v"]["w"]) + layer["attn"]["v"]["b"][:, None]
    scores = jnp.einsum("htd,hsd->hts", q, k) / TINY.head_dim**0.5
    scores = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), scores, -1e10)
    probs = jax.nn.softmax(scores, -1)
    (sown,) = state["intermediates"]["h"]["attn"]["probs"]
    np.testing.assert_allclose(probs, sown[i, 0], atol=1e-5)
    y = jnp.einsum("hts,hsd,hdc->tc", probs, v, layer["attn"]["o"]["w"]) + layer["attn"]["o"]["b"]
    (attn_out,) = state["intermediates"]["h"]["attn_out"]
    np.testing.assert_allclose(y, attn_out[i, 0], atol=1e-5)


def test_edited_layer_views_stack_into_a_working_model():
    """Zeroing one head's output projection through the views and stacking back changes that
    layer's attention output by exactly that head's contribution."""
    params = jax.tree.map(jnp.asarray, random_params(TINY, seed=9))
    trees = gpt2jax.layers(params, n_head=TINY.n_head)
    trees[0]["attn"]["o"]["w"] = trees[0]["attn"]["o"]["w"].at[2].set(0.0)
    edited = {**params, "h": gpt2jax.stack_layers(trees)}
    ids = jnp.zeros((1, 4), jnp.int32)
    a = GPT2(TINY).apply({"params": params}, ids)
    b = GPT2(TINY).apply({"params": edited}, ids)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
    w = np.asarray(edited["h"]["attn"]["c_proj"]["w"][0])
    D = TINY.head_dim
    assert np.all(w[2 * D : 3 * D] == 0) and np.any(w[D : 2 * D] != 0)


# -- one KV-cache type ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sampler_and_model_share_the_cache_type():
    """The sampler's prefill leaves a :class:`KVCache` that ``GPT2.forward`` continues from:
    the model's next-token logits equal the sampler's own step, and the model's returned cache
    equals the sampler's."""
    params = jax.tree.map(jnp.asarray, random_params(TINY, seed=10, scale=1.0))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, TINY.n_vocab, (2, 6)), jnp.int32)
    pad = jnp.zeros((2,), jnp.int32)
    last = jnp.full((2,), 12, jnp.int32)
    greedy = Sampler.make(greedy=True)
    split = decoding.layer_params(params)
    state, _ = decoding.prefill(
        TINY, split, ids, pad, last, decoding.row_keys(0, [0, 1]), greedy, -1, 16
    )
    assert isinstance(state.cache, KVCache) and state.cache.length == 16
    nxt = state.tokens[:, 6:7]
    out = GPT2(TINY).apply(
        {"params": params}, nxt, method="forward", cache=state.cache, cache_index=6
    )
    stepped, logits = decoding.step(TINY, split, state, greedy, -1)
    np.testing.assert_allclose(out.logits[:, 0], logits, atol=1e-5)
    for (k1, v1), (k2, v2) in zip(out.cache.layers, stepped.cache.layers, strict=True):
        np.testing.assert_allclose(k1, k2, atol=1e-6)
        np.testing.assert_allclose(v1, v2, atol=1e-6)
    k, v = out.cache.stacked()
    assert k.shape == (TINY.n_layer, 2, TINY.n_head, 16, TINY.head_dim)
    assert KVCache.from_stacked(k, v).layers[1][0].shape == (2, TINY.n_head, 16, TINY.head_dim)


@pytest.mark.slow
def test_attentions_with_a_cache_cover_its_slots():
    """With a cache, each layer's probabilities are over the cache's slots, and equal the
    uncached pass's on the slots written so far."""
    params = jax.tree.map(jnp.asarray, random_params(TINY, seed=11))
    ids = jnp.asarray(np.random.default_rng(5).integers(0, TINY.n_vocab, (2, 8)), jnp.int32)
    model = GPT2(TINY)
    ref = model.apply({"params": params}, ids, output_attentions=True).attentions
    out = model.apply(
        {"params": params}, ids[:, :5], method="forward", cache=KVCache.zeros(TINY, 2, 12),
        output_attentions=True,
    )  # fmt: skip
    out = model.apply(
        {"params": params}, ids[:, 5:], method="forward", cache=out.cache, cache_index=5,
        output_attentions=True,
    )  # fmt: skip
    for ours, theirs in zip(out.attentions, ref, strict=True):
        assert ours.shape == (2, TINY.n_head, 3, 12)
        np.testing.assert_allclose(ours[..., :8], theirs[:, :, 5:], atol=1e-6)
        assert np.all(np.asarray(ours[..., 8:]) == 0)


# -- NNX -----------------------------------------------------------------------------------------


def _batches():
    rng = np.random.default_rng(12)
    return [jnp.asarray(rng.integers(0, TINY.n_vocab, (4, 10)), jnp.int32) for _ in range(2)]


def _loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


@pytest.mark.slow
def test_to_nnx_trains_like_the_linen_path():
    """Two AdamW steps with ``nnx.Optimizer`` on ``to_nnx(model)`` give the losses and the
    parameters of the same two steps on the Linen module with optax."""
    from flax import nnx

    params = jax.tree.map(jnp.asarray, random_params(TINY, seed=13))
    tx = optax.adamw(1e-2, weight_decay=0.1)
    linen = GPT2(TINY)

    @jax.jit
    def linen_step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(
            lambda p: _loss(linen.apply({"params": p}, ids[:, :-1]), ids)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, ref_losses, ref = tx.init(params), [], params
    for ids in _batches():
        ref, opt_state, loss = linen_step(ref, opt_state, ids)
        ref_losses.append(float(loss))

    m = gpt2jax.to_nnx(linen, params)
    optimizer = nnx.Optimizer(m, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(m, optimizer, ids):
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(ids[:, :-1]), ids))(m)
        optimizer.update(m, grads)
        return loss

    losses = [float(nnx_step(m, optimizer, ids)) for ids in _batches()]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert ref_losses[1] < ref_losses[0]
    trained = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), trained, ref)
    # and the module keeps the model's other entry points
    out = m(_batches()[0], output_hidden_states=True)
    assert len(out.hidden_states) == TINY.n_layer + 1


def test_to_nnx_of_a_loaded_model(tmp_path):
    from conftest import TOKENIZER_DIR
    from gpt2jax.store.model_dir import save_model_dir

    params = random_params(
        gpt2jax.GPT2Config(n_vocab=50257, n_ctx=16, n_embd=8, n_head=2, n_layer=1)
    )
    config = gpt2jax.GPT2Config(n_vocab=50257, n_ctx=16, n_embd=8, n_head=2, n_layer=1)
    save_model_dir(tmp_path / "m", config, params, tokenizer_dir=TOKENIZER_DIR)
    loaded = gpt2jax.load(tmp_path / "m")
    m = gpt2jax.to_nnx(loaded)
    ids = loaded.encode("Hello world")
    np.testing.assert_allclose(m(ids[None])[0], loaded.logits(ids), atol=1e-6)
    with pytest.raises(TypeError):
        gpt2jax.to_nnx("124M")
