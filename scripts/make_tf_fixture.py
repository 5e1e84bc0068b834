"""Write the TensorFlow-made test fixtures. Run once, with TensorFlow installed (not a dependency):

    python scripts/make_tf_fixture.py [--fixtures DIR] [--tokenizer DIR] [--seed N]

It uses real TensorFlow (``tf.compat.v1``, graph mode, ``tf.compat.v1.train.Saver``) so that the
reader in :mod:`gpt2jax.formats.tf_bundle` and the OpenAI-checkpoint converter are tested on files
TensorFlow itself wrote, never on files our own writer made. Outputs, under ``tests/fixtures/``:

* ``openai_tiny/``: an OpenAI-format GPT-2 model directory (``checkpoint``, ``hparams.json``,
  ``model.ckpt.{index,data-00000-of-00001,meta}``, ``encoder.json``, ``vocab.bpe``) with the real
  50257-token vocabulary but tiny odd sizes, every variable created under OpenAI's exact name and
  shape (openai/gpt-2 ``src/model.py``) and filled with random values -- LayerNorm gains and
  biases too, scaled so the logits are far from uniform.
* ``openai_tiny_reference.npz``: every saved variable under its TF name (the exact arrays given
  to TF), the input ids ``__tokens__`` (int32 [rows, seq]) and ``__logits__`` (float32
  [rows, seq, n_vocab]) from OpenAI's forward pass re-built op for op in ``tf.compat.v1``.
* ``tf_bundle_dtypes/model.ckpt.*`` and ``tf_bundle_dtypes_reference.npz``: small variables of
  many dtypes, a scalar and a zero-size tensor, to test the reader beyond float32. NumPy has no
  bfloat16, so the npz holds bfloat16 arrays as their raw ``uint16`` bits (names listed in
  ``__bfloat16_as_uint16__``).

The token count is small on purpose: full-vocabulary float32 logits cost 200 KB per position.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HPARAMS = {"n_vocab": 50257, "n_ctx": 29, "n_embd": 12, "n_head": 3, "n_layer": 2}


# ---- OpenAI's variables and their random values ------------------------------------------------


def openai_shapes(hp: dict) -> dict[str, list[int]]:
    """OpenAI's variable names and shapes, in the order ``model()`` creates them."""
    e = hp["n_embd"]
    shapes = {"model/wpe": [hp["n_ctx"], e], "model/wte": [hp["n_vocab"], e]}
    for i in range(hp["n_layer"]):
        p = f"model/h{i}/"
        shapes.update(
            {
                p + "ln_1/g": [e],
                p + "ln_1/b": [e],
                p + "attn/c_attn/w": [1, e, 3 * e],
                p + "attn/c_attn/b": [3 * e],
                p + "attn/c_proj/w": [1, e, e],
                p + "attn/c_proj/b": [e],
                p + "ln_2/g": [e],
                p + "ln_2/b": [e],
                p + "mlp/c_fc/w": [1, e, 4 * e],
                p + "mlp/c_fc/b": [4 * e],
                p + "mlp/c_proj/w": [1, 4 * e, e],
                p + "mlp/c_proj/b": [e],
            }
        )
    shapes.update({"model/ln_f/g": [e], "model/ln_f/b": [e]})
    return shapes


def random_values(shapes: dict[str, list[int]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every tensor random. Weights are scaled ~1/sqrt(fan_in) (wte larger, so that logits =
    h @ wte^T have a spread of a few units), gains ~1 + 0.1 N, biases ~0.1 N."""
    values = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape)
        if name.endswith("/g"):
            x = 1.0 + 0.1 * x
        elif name.endswith("/b"):
            x = 0.1 * x
        elif name == "model/wte":
            x = 0.3 * x
        elif name == "model/wpe":
            x = 0.1 * x
        else:  # conv1d weights [1, nx, nf]
            x = x / np.sqrt(shape[1])
        values[name] = x.astype(np.float32)
    return values


# ---- OpenAI's forward pass, following openai/gpt-2 src/model.py op for op -----------------------


def build_model(tf, hp: dict, X):  # noqa: ANN001 - tf is the module, imported late
    v1 = tf.compat.v1

    def shape_list(x):
        static = x.shape.as_list()
        dynamic = tf.shape(x)
        return [dynamic[i] if s is None else s for i, s in enumerate(static)]

    def softmax(x, axis=-1):
        x = x - tf.reduce_max(x, axis=axis, keepdims=True)
        ex = tf.exp(x)
        return ex / tf.reduce_sum(ex, axis=axis, keepdims=True)

    def gelu(x):
        return 0.5 * x * (1 + tf.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * tf.pow(x, 3))))

    def norm(x, scope, *, axis=-1, epsilon=1e-5):
        with v1.variable_scope(scope):
            n_state = x.shape.as_list()[-1]
            g = v1.get_variable("g", [n_state], initializer=v1.constant_initializer(1))
            b = v1.get_variable("b", [n_state], initializer=v1.constant_initializer(0))
            u = tf.reduce_mean(x, axis=axis, keepdims=True)
            n = x - u
            s = tf.reduce_mean(tf.square(n), axis=axis, keepdims=True)
            x = n * tf.math.rsqrt(s + epsilon)
            return x * g + b

    def split_states(x, n):
        *start, m = shape_list(x)
        return tf.reshape(x, start + [n, m // n])

    def merge_states(x):
        *start, a, b = shape_list(x)
        return tf.reshape(x, start + [a * b])

    def conv1d(x, scope, nf, *, w_init_stdev=0.02):
        with v1.variable_scope(scope):
            *start, nx = shape_list(x)
            w = v1.get_variable(
                "w", [1, nx, nf], initializer=v1.random_normal_initializer(stddev=w_init_stdev)
            )
            b = v1.get_variable("b", [nf], initializer=v1.constant_initializer(0))
            c = tf.matmul(tf.reshape(x, [-1, nx]), tf.reshape(w, [-1, nf])) + b
            return tf.reshape(c, start + [nf])

    def attention_mask(nd, ns, *, dtype):
        i = tf.range(nd)[:, None]
        j = tf.range(ns)
        m = i >= j - ns + nd
        return tf.cast(m, dtype)

    def attn(x, scope, n_state):
        def split_heads(x):  # [batch, seq, features] -> [batch, heads, seq, features]
            return tf.transpose(split_states(x, hp["n_head"]), [0, 2, 1, 3])

        def merge_heads(x):
            return merge_states(tf.transpose(x, [0, 2, 1, 3]))

        def mask_attn_weights(w):  # w: [batch, heads, dst_seq, src_seq]
            _, _, nd, ns = shape_list(w)
            b = tf.reshape(attention_mask(nd, ns, dtype=w.dtype), [1, 1, nd, ns])
            return w * b - tf.cast(1e10, w.dtype) * (1 - b)

        def multihead_attn(q, k, v):
            w = tf.matmul(q, k, transpose_b=True)
            w = w * tf.math.rsqrt(tf.cast(v.shape.as_list()[-1], w.dtype))
            w = softmax(mask_attn_weights(w))
            return tf.matmul(w, v)

        with v1.variable_scope(scope):
            c = conv1d(x, "c_attn", n_state * 3)
            q, k, v = map(split_heads, tf.split(c, 3, axis=2))
            a = merge_heads(multihead_attn(q, k, v))
            return conv1d(a, "c_proj", n_state)

    def mlp(x, scope, n_state):
        with v1.variable_scope(scope):
            nx = x.shape.as_list()[-1]
            return conv1d(gelu(conv1d(x, "c_fc", n_state)), "c_proj", nx)

    def block(x, scope):
        with v1.variable_scope(scope):
            nx = x.shape.as_list()[-1]
            x = x + attn(norm(x, "ln_1"), "attn", nx)
            return x + mlp(norm(x, "ln_2"), "mlp", nx * 4)

    with v1.variable_scope("model"):
        batch, sequence = shape_list(X)
        wpe = v1.get_variable(
            "wpe", [hp["n_ctx"], hp["n_embd"]], initializer=v1.random_normal_initializer(0.01)
        )
        wte = v1.get_variable(
            "wte", [hp["n_vocab"], hp["n_embd"]], initializer=v1.random_normal_initializer(0.02)
        )
        positions = tf.tile(tf.expand_dims(tf.range(sequence), 0), [batch, 1])
        h = tf.gather(wte, X) + tf.gather(wpe, positions)
        for layer in range(hp["n_layer"]):
            h = block(h, f"h{layer}")
        h = norm(h, "ln_f")
        h_flat = tf.reshape(h, [batch * sequence, hp["n_embd"]])
        logits = tf.matmul(h_flat, wte, transpose_b=True)
        return tf.reshape(logits, [batch, sequence, hp["n_vocab"]])


# ---- writers -----------------------------------------------------------------------------------


def write_openai_tiny(tf, fixtures: Path, tokenizer: Path, seed: int, rows: int, seq: int) -> None:  # noqa: ANN001
    v1 = tf.compat.v1
    out = fixtures / "openai_tiny"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shapes = openai_shapes(HPARAMS)
    values = random_values(shapes, rng)
    tokens = rng.integers(0, HPARAMS["n_vocab"], size=(rows, seq)).astype(np.int32)

    graph = tf.Graph()
    with graph.as_default():
        X = v1.placeholder(tf.int32, [None, None], name="X")
        logits = build_model(tf, HPARAMS, X)
        variables = v1.global_variables()
        made = {v.op.name: v.shape.as_list() for v in variables}
        if made != shapes:
            raise SystemExit(f"variables do not match OpenAI's: {made} != {shapes}")
        saver = v1.train.Saver(var_list=variables, save_relative_paths=True)
        with v1.Session(graph=graph) as sess:
            for v in variables:
                v.load(values[v.op.name], sess)
            for v in variables:  # TF holds exactly the arrays we will store as reference
                assert np.array_equal(sess.run(v), values[v.op.name]), v.op.name
            tf_logits = sess.run(logits, {X: tokens}).astype(np.float32)
            saver.save(sess, str(out / "model.ckpt"), write_meta_graph=True)

    (out / "hparams.json").write_text(json.dumps(HPARAMS, indent=2) + "\n")
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(tokenizer / name, out / name)
    np.savez_compressed(
        fixtures / "openai_tiny_reference.npz",
        __tokens__=tokens,
        __logits__=tf_logits,
        **values,
    )
    assert np.isfinite(tf_logits).all()
    print(f"openai_tiny: logits {tf_logits.shape}, std {tf_logits.std():.3f}")


def dtype_values(tf, rng: np.random.Generator) -> dict[str, tuple[object, np.ndarray]]:  # noqa: ANN001
    """name -> (tf dtype, value) of the dtypes fixture; special values where the dtype has them."""
    bf16 = tf.bfloat16.as_numpy_dtype
    f16 = rng.standard_normal((3, 5)).astype(np.float16)
    f16.flat[:5] = [np.nan, np.inf, -np.inf, -0.0, np.float16(6e-8)]  # 6e-8: a subnormal
    f64 = rng.standard_normal((2, 3))
    f64.flat[:2] = [np.nan, 5e-324]
    i64 = np.array([[np.iinfo(np.int64).min, -1], [0, np.iinfo(np.int64).max]], np.int64)
    i32 = np.array([np.iinfo(np.int32).min, -7, 0, 1, 12345, -99999, np.iinfo(np.int32).max])
    return {
        "dtypes/bfloat16": (tf.bfloat16, rng.standard_normal((4, 3)).astype(bf16)),
        "dtypes/bool": (tf.bool, rng.random((3, 3)) > 0.5),
        "dtypes/complex64": (tf.complex64, (rng.standard_normal(2) + 1j).astype(np.complex64)),
        "dtypes/empty": (tf.float32, np.zeros((0, 4), np.float32)),
        "dtypes/float16": (tf.float16, f16),
        "dtypes/float64": (tf.float64, f64),
        "dtypes/int16": (tf.int16, np.array([-32768, -1, 0, 32767], np.int16)),
        "dtypes/int32": (tf.int32, i32.astype(np.int32)),
        "dtypes/int64": (tf.int64, i64),
        "dtypes/int8": (tf.int8, np.array([[-128, -1, 0, 1, 127], [5, -5, 64, -64, 3]], np.int8)),
        "dtypes/scalar": (tf.float32, np.array(-2.75, np.float32)),
        "dtypes/uint8": (tf.uint8, np.array([0, 1, 127, 128, 254, 255], np.uint8)),
    }


def write_dtypes(tf, fixtures: Path, seed: int) -> None:  # noqa: ANN001
    v1 = tf.compat.v1
    out = fixtures / "tf_bundle_dtypes"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    items = dtype_values(tf, np.random.default_rng(seed + 1))
    graph = tf.Graph()
    with graph.as_default():
        variables = {
            name: v1.get_variable(name, value.shape, dtype, initializer=v1.zeros_initializer())
            for name, (dtype, value) in items.items()
        }
        saver = v1.train.Saver(var_list=list(variables.values()))
        with v1.Session(graph=graph) as sess:
            for name, v in variables.items():
                v.load(items[name][1], sess)
                got = sess.run(v)
                assert got.tobytes() == items[name][1].tobytes(), name
            saver.save(sess, str(out / "model.ckpt"), write_meta_graph=False, write_state=False)
    reference = {}
    bf16_names = []
    for name, (dtype, value) in items.items():
        if dtype == tf.bfloat16:
            value = value.view(np.uint16)
            bf16_names.append(name)
        reference[name] = value
    np.savez_compressed(
        fixtures / "tf_bundle_dtypes_reference.npz",
        __bfloat16_as_uint16__=np.array(bf16_names),
        __note__=np.array("bfloat16 arrays are stored as their raw uint16 bits"),
        **reference,
    )
    print(f"tf_bundle_dtypes: {len(items)} variables")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--fixtures", type=Path, default=ROOT / "tests" / "fixtures")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=ROOT.parent / "shared" / "gpt2-tokenizer",
        help="directory with OpenAI's encoder.json and vocab.bpe",
    )
    parser.add_argument("--seed", type=int, default=20190214)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=7)
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # plain Eigen kernels: steadier numerics
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    args.fixtures.mkdir(parents=True, exist_ok=True)
    write_openai_tiny(tf, args.fixtures, args.tokenizer, args.seed, args.rows, args.seq_len)
    write_dtypes(tf, args.fixtures, args.seed)
    (args.fixtures / "README.md").write_text(
        "# Test fixtures\n\n"
        "`openai_tiny/`, `openai_tiny_reference.npz`, `tf_bundle_dtypes/` and "
        "`tf_bundle_dtypes_reference.npz` were written by `scripts/make_tf_fixture.py` "
        f"(seed {args.seed}) with TensorFlow {tf.__version__} (`tf.compat.v1` graph mode, "
        f"`tf.compat.v1.train.Saver`), NumPy {np.__version__}, Python "
        f"{sys.version.split()[0]}. `encoder.json` and `vocab.bpe` are OpenAI's GPT-2 "
        "tokenizer files, copied unchanged.\n"
    )


if __name__ == "__main__":
    main()
