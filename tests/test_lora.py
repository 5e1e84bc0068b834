"""LoRA adapters and freezing: what is trained, and that the maths is the merged model's."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import FIXTURES, TINY, random_params
from gpt2jax import lora
from gpt2jax.errors import ConfigError
from gpt2jax.model import GPT2
from gpt2jax.train.loss import make_token_losses
from gpt2jax.train.memory.freeze import make_prepare as freeze_prepare
from gpt2jax.train.memory.freeze import parse_freeze

RANK = 3


def windows(seed: int = 0) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, TINY.n_vocab, (2, 15)), jnp.int32)


@pytest.fixture(scope="module")
def base():
    return jax.tree.map(jnp.asarray, random_params(TINY))


def random_b(adapters, seed: int = 1):
    """Adapters whose B is random too (a trained adapter)."""
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            0.1 * jax.random.normal(next(keys), x.shape) if path[-1].key == lora.B else x
        ),
        adapters,
    )


def lora_losses(scale: float, model=None):
    return jax.jit(
        make_token_losses(model or GPT2(TINY), prepare=lora.make_prepare(scale), loss_chunk=4)
    )


def test_adapter_shapes_and_init():
    adapters = lora.init_lora(TINY, RANK, seed=0)
    C, L = TINY.n_embd, TINY.n_layer
    fc = adapters["h"]["mlp"]["c_fc"]
    assert fc[lora.A].shape == (L, C, RANK) and fc[lora.B].shape == (L, RANK, 4 * C)
    assert adapters["h"]["mlp"]["c_proj"][lora.A].shape == (L, 4 * C, RANK)
    assert all(not np.any(a[lora.B]) for blk in adapters["h"].values() for a in blk.values())
    assert np.all(np.abs(fc[lora.A]) <= 1 / np.sqrt(C)) and np.std(fc[lora.A]) > 0
    n = sum(x.size for x in jax.tree.leaves(adapters))
    assert n == lora.num_lora_params(TINY, RANK)


def test_zero_b_equals_the_base_model(base):
    w = windows()
    adapters = lora.init_lora(TINY, RANK, seed=0)
    got = lora_losses(2.0)(adapters, w, None, base)
    want = jax.jit(make_token_losses(GPT2(TINY)))(base, w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("remat", ["none", "block"])
def test_adapters_compute_the_merged_weights(base, remat):
    """``W x + s (x A) B`` inside the layer scan == the model with ``W + s A B`` merged in
    (float32, relative 1e-5: the two sum in different orders)."""
    w, scale = windows(1), 0.75
    adapters = random_b(lora.init_lora(TINY, RANK, seed=2))
    model = GPT2(TINY, remat=remat)
    got = lora_losses(scale, model)(adapters, w, None, base)
    merged = lora.merge_lora(base, adapters, scale)
    want = jax.jit(make_token_losses(model))(merged, w)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert not np.allclose(want, jax.jit(make_token_losses(model))(base, w))


def test_only_adapters_get_gradients(base):
    w = windows(2)
    adapters = lora.init_lora(TINY, RANK, seed=0)
    losses = make_token_losses(GPT2(TINY), prepare=lora.make_prepare(1.0))
    grads = jax.jit(jax.grad(lambda a: losses(a, w, None, base).mean()))(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    fc = grads["h"]["mlp"]["c_fc"]
    # B = 0: dL/dA = 0 exactly, dL/dB is not (the usual start of LoRA training).
    assert not np.any(fc[lora.A]) and np.any(fc[lora.B])


def test_merge_is_float32_and_keeps_other_leaves(base):
    """Over a bfloat16 base the merged weights stay float32 (casting back would round small
    deltas away); the leaves LoRA does not adapt are the base's own."""
    adapters = random_b(lora.init_lora(TINY, RANK))
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    merged = lora.merge_lora(half, adapters, 1.0)
    assert all(merged["h"][block][proj]["w"].dtype == jnp.float32 for block, proj in lora.TARGETS)
    assert merged["wte"] is half["wte"]
    assert merged["h"]["attn"]["c_attn"]["b"] is half["h"]["attn"]["c_attn"]["b"]


def test_bad_rank_and_alpha():
    with pytest.raises(ConfigError, match="lora-rank"):
        lora.init_lora(TINY, 0)
    with pytest.raises(ConfigError, match="lora-alpha"):
        lora.lora_scale(4, -1.0)
    assert lora.lora_scale(4, 16.0) == 4.0 and lora.lora_scale(8, None) == 1.0


def test_freeze_stops_gradients_where_asked(base):
    w = windows(3)
    freeze = parse_freeze("top:1", TINY)
    losses = make_token_losses(GPT2(TINY), prepare=freeze_prepare(freeze))
    plain = make_token_losses(GPT2(TINY))
    grads = jax.jit(jax.grad(lambda p: losses(p, w).mean()))(base)
    ref = jax.jit(jax.grad(lambda p: plain(p, w).mean()))(base)
    assert not np.any(grads["wte"]) and not np.any(grads["wpe"])
    fc, fc_ref = grads["h"]["mlp"]["c_fc"]["w"], ref["h"]["mlp"]["c_fc"]["w"]
    assert not np.any(fc[:-1])
    np.testing.assert_allclose(fc[-1], fc_ref[-1], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(grads["ln_f"]["g"], ref["ln_f"]["g"], rtol=1e-6, atol=1e-9)


def test_freeze_specs():
    assert parse_freeze(None, TINY) is None
    assert parse_freeze("embeddings", TINY).layers is None
    assert parse_freeze("top:2", TINY).layers == (False, True, True)
    for bad in ("top:0", "top:4", "top:x", "bottom"):
        with pytest.raises(ConfigError, match="--freeze"):
            parse_freeze(bad, TINY)


@pytest.mark.slow
def test_bfloat16_lora_run_exports_its_small_deltas_in_float32(tmp_path, capsys):
    """A LoRA run over a bfloat16 base whose deltas are below bfloat16's resolution: the
    float32 export holds base + scale * A @ B (float64 reference), not the base rounded back;
    a bfloat16 export says how much it rounded away."""
    import gpt2jax
    from gpt2jax.cli.main import main as cli_main
    from gpt2jax.convert import mapping
    from gpt2jax.convert.hf import read_hf_dir
    from gpt2jax.store.runs import read_run, restore_adapters
    from gpt2jax.train.loop import finetune
    from gpt2jax.train.settings import TrainConfig

    tiny_model = str(FIXTURES / "openai_tiny")
    text = tmp_path / "train.txt"
    text.write_text((FIXTURES / "english.txt").read_text(encoding="utf-8"), encoding="utf-8")
    run = tmp_path / "run"
    # One AdamW update of lr 1e-4 moves each B entry by about 1e-4: deltas of ~1e-5 on weights
    # of ~0.2, whose bfloat16 spacing is ~1e-3.
    finetune(
        run,
        TrainConfig(
            model=tiny_model,
            data=[str(text)],
            steps=1,
            batch_size=2,
            seq_len=16,
            lr=1e-4,
            lora_rank=2,
            lora_alpha=3.0,
            param_dtype="bfloat16",
            eval_every=0,
            sample_every=0,
            save_every=1,
        ),  # fmt: skip
        show_progress=False,
    )
    config, train = read_run(str(run))
    adapters = restore_adapters(str(run), config, train, 1)
    base = gpt2jax.load(tiny_model).params
    scale = 3.0 / 2

    assert cli_main(["export", str(run), str(tmp_path / "f32")]) == 0
    assert "rounds the weights" not in capsys.readouterr().err  # nothing rounded
    _, exported = read_hf_dir(tmp_path / "f32")
    for block, proj in lora.TARGETS:
        a = np.asarray(adapters["h"][block][proj][lora.A], np.float64)
        b = np.asarray(adapters["h"][block][proj][lora.B], np.float64)
        w = np.asarray(base["h"][block][proj]["w"]).astype(ml_dtypes.bfloat16).astype(np.float64)
        want = w + scale * np.einsum("lir,lro->lio", a, b)
        got = exported["h"][block][proj]["w"]
        assert np.any(b), "the update left B at zero: nothing to check"
        # Below bfloat16's resolution: rounded back, most weights would be the base's again.
        assert np.mean(want.astype(ml_dtypes.bfloat16).astype(np.float64) == w) > 0.9
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=f"{block}/{proj}")

    assert cli_main(["export", str(run), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    found = re.search(
        r"gpt2jax: bfloat16 export rounds the weights: max \|delta\| (\S+) \(relative to float32\)",
        capsys.readouterr().err,
    )
    assert found, "no rounding line on stderr"
    _, rounded = read_hf_dir(tmp_path / "bf16")
    f32, bf16 = mapping.flatten(exported), mapping.flatten(rounded)
    measured = max(float(np.max(np.abs(f32[k] - bf16[k]))) for k in f32)
    assert measured > 0 and float(found[1]) == pytest.approx(measured, rel=0.06)
