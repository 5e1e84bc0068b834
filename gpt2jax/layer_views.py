"""Per-layer views of the stacked parameter tree, and the exact inverse.

The model scans its blocks, so ``params["h"]`` holds every block's weights stacked on a leading
axis of size ``n_layer`` (``params["h"]["attn"]["c_attn"]["w"][5]`` is layer 5's q, k and v
projections side by side). :func:`layers` gives one tree per block, optionally with q, k, v
and the output projection split per head; :func:`stack_layers` puts such trees back, bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def layers(params: dict, *, n_head: int | None = None) -> list[dict]:
    """One parameter tree per block, from a model's params (or their ``"h"`` subtree).

    The layers are views where the arrays allow: numpy arrays are sliced without copying, and
    so are jax arrays on the CPU (their buffers are 64-byte aligned); elsewhere, and under
    ``jit``, each layer is sliced once. With ``n_head`` (``config.n_head``) the attention is
    split per head (see the module docstring). :func:`stack_layers` is the inverse.

    Per-layer tree (``split_heads=False``, OpenAI's names)::

        ln_1/{g, b} (C,)   attn/c_attn/{w (C, 3C), b (3C,)}   attn/c_proj/{w (C, C), b (C,)}
        ln_2/{g, b} (C,)   mlp/c_fc/{w (C, 4C), b (4C,)}      mlp/c_proj/{w (4C, C), b (C,)}

    With ``split_heads=True``, ``attn`` holds ``q``, ``k``, ``v``: ``w (C, H, D)``, ``b (H, D)``,
    and ``o`` (``c_proj`` by head): ``w (H, D, C)``, ``b (C,)``; head ``h`` of layer ``i`` reads
    ``x @ q.w[:, h] + q.b[h]`` and adds ``y_h @ o.w[h]`` to the residual stream.
    """
    h = params["h"] if "h" in params else params
    if "c_attn" not in h.get("attn", {}):
        raise ValueError("layers() expects a stacked params tree (with h/attn/c_attn)")
    n_layer = jax.tree.leaves(h)[0].shape[0]
    leaves, treedef = jax.tree.flatten(h)
    per_leaf = [_split(x, n_layer) for x in leaves]
    out = [jax.tree.unflatten(treedef, [p[i] for p in per_leaf]) for i in range(n_layer)]
    return out if n_head is None else [_split_heads(layer, n_head) for layer in out]


def stack_layers(layer_trees: Sequence[dict]) -> dict:
    """The stacked ``"h"`` subtree of per-layer trees (split per head or not): the exact
    inverse of :func:`layers`, bitwise and in the same dtypes. The full tree is then
    ``{**params, "h": stack_layers(trees)}``. numpy layers stack into numpy arrays, anything
    else into jax arrays.
    """
    if not layer_trees:
        raise ValueError("stack_layers needs at least one layer")
    merged = [_merge_heads(t) if "q" in t["attn"] else t for t in layer_trees]
    leaves = jax.tree.leaves(merged)
    stack = np.stack if all(isinstance(x, np.ndarray) for x in leaves) else jnp.stack
    return jax.tree.map(lambda *xs: stack(xs), *merged)


def _split(x: Any, n: int) -> list:
    if isinstance(x, np.ndarray):
        return [x[i] for i in range(n)]  # numpy views
    if isinstance(x, jax.core.Tracer) or {d.platform for d in x.devices()} != {"cpu"}:
        return [x[i] for i in range(n)]
    host = np.asarray(x)  # a view of a CPU jax.Array's buffer, not a copy
    return [jax.device_put(host[i]) for i in range(n)]


def _split_heads(layer: dict, n_head: int) -> dict:
    """``c_attn`` -> ``q``, ``k``, ``v`` and ``c_proj`` -> ``o``, per head."""
    attn = layer["attn"]
    w, b = attn["c_attn"]["w"], attn["c_attn"]["b"]  # (C, 3C), (3C,)
    C = w.shape[0]
    if C % n_head:
        raise ValueError(f"n_head={n_head} does not divide the width {C}")
    D = C // n_head
    split = {
        name: {
            "w": w[:, j * C : (j + 1) * C].reshape(C, n_head, D),
            "b": b[j * C : (j + 1) * C].reshape(n_head, D),
        }
        for j, name in enumerate("qkv")
    }
    proj = attn["c_proj"]
    split["o"] = {"w": proj["w"].reshape(n_head, D, C), "b": proj["b"]}
    return {**layer, "attn": split}


def _merge_heads(layer: dict) -> dict:
    attn = layer["attn"]
    n_head, D, C = attn["o"]["w"].shape
    cat = np.concatenate if isinstance(attn["q"]["w"], np.ndarray) else jnp.concatenate
    c_attn = {
        "w": cat([attn[n]["w"].reshape(C, C) for n in "qkv"], axis=1),
        "b": cat([attn[n]["b"].reshape(C) for n in "qkv"], axis=0),
    }
    c_proj = {"w": attn["o"]["w"].reshape(n_head * D, C), "b": attn["o"]["b"]}
    return {**layer, "attn": {"c_attn": c_attn, "c_proj": c_proj}}
