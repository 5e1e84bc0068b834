"""The one table that names every GPT-2 tensor in our tree, OpenAI's checkpoints and Hugging Face's.

Each row is ``(ours, openai, hf, conv)``: our path in the params tree (``/``-joined; rows under
``h/`` have a leading layer axis), OpenAI's TF variable name, Hugging Face's ``GPT2Model`` state
dict key (``{i}`` is the layer), and whether OpenAI stores the tensor as a ``conv1d`` weight with
an extra leading axis of size 1 (``(1, nx, nf)`` there, ``(nx, nf)`` here and in Hugging Face,
whose ``Conv1D`` keeps OpenAI's ``(in, out)`` orientation). Nothing is matched by substring: both
directions walk this table, and every conversion checks that the key sets are equal and every
shape is what the config says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from gpt2jax.config import GPT2Config
from gpt2jax.errors import CheckpointError

# (ours, openai, hf, conv)
TABLE: tuple[tuple[str, str, str, bool], ...] = (
    ("wte", "model/wte", "wte.weight", False),
    ("wpe", "model/wpe", "wpe.weight", False),
    ("h/ln_1/g", "model/h{i}/ln_1/g", "h.{i}.ln_1.weight", False),
    ("h/ln_1/b", "model/h{i}/ln_1/b", "h.{i}.ln_1.bias", False),
    ("h/attn/c_attn/w", "model/h{i}/attn/c_attn/w", "h.{i}.attn.c_attn.weight", True),
    ("h/attn/c_attn/b", "model/h{i}/attn/c_attn/b", "h.{i}.attn.c_attn.bias", False),
    ("h/attn/c_proj/w", "model/h{i}/attn/c_proj/w", "h.{i}.attn.c_proj.weight", True),
    ("h/attn/c_proj/b", "model/h{i}/attn/c_proj/b", "h.{i}.attn.c_proj.bias", False),
    ("h/ln_2/g", "model/h{i}/ln_2/g", "h.{i}.ln_2.weight", False),
    ("h/ln_2/b", "model/h{i}/ln_2/b", "h.{i}.ln_2.bias", False),
    ("h/mlp/c_fc/w", "model/h{i}/mlp/c_fc/w", "h.{i}.mlp.c_fc.weight", True),
    ("h/mlp/c_fc/b", "model/h{i}/mlp/c_fc/b", "h.{i}.mlp.c_fc.bias", False),
    ("h/mlp/c_proj/w", "model/h{i}/mlp/c_proj/w", "h.{i}.mlp.c_proj.weight", True),
    ("h/mlp/c_proj/b", "model/h{i}/mlp/c_proj/b", "h.{i}.mlp.c_proj.bias", False),
    ("ln_f/g", "model/ln_f/g", "ln_f.weight", False),
    ("ln_f/b", "model/ln_f/b", "ln_f.bias", False),
)

FORMATS = ("openai", "hf")


def our_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Shape of every leaf of our params tree, keyed by its ``/`` path."""
    V, T, C, L = config.n_vocab, config.n_ctx, config.n_embd, config.n_layer
    layer = {
        "ln_1/g": (C,), "ln_1/b": (C,), "ln_2/g": (C,), "ln_2/b": (C,),
        "attn/c_attn/w": (C, 3 * C), "attn/c_attn/b": (3 * C,),
        "attn/c_proj/w": (C, C), "attn/c_proj/b": (C,),
        "mlp/c_fc/w": (C, 4 * C), "mlp/c_fc/b": (4 * C,),
        "mlp/c_proj/w": (4 * C, C), "mlp/c_proj/b": (C,),
    }  # fmt: skip
    shapes = {"wte": (V, C), "wpe": (T, C), "ln_f/g": (C,), "ln_f/b": (C,)}
    shapes.update({f"h/{k}": (L, *s) for k, s in layer.items()})
    return shapes


def their_shapes(config: GPT2Config, fmt: str) -> dict[str, tuple[int, ...]]:
    """Every tensor name of format ``fmt`` (``openai`` or ``hf``) with its expected shape."""
    ours = our_shapes(config)
    out = {}
    for our, name, _, conv in placements(config, fmt):
        s = ours[our][1:] if our.startswith("h/") else ours[our]
        out[name] = (1, *s) if conv and fmt == "openai" else s
    return out


def placements(config: GPT2Config, fmt: str) -> Iterator[tuple[str, str, Any, bool]]:
    """``(ours, theirs, layer or None, conv)`` for every tensor, layers expanded: tensor
    ``theirs`` is leaf ``ours`` (its ``layer``'s slice of it, for the stacked ``h/`` leaves)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    col = 1 if fmt == "openai" else 2
    for row in TABLE:
        ours, theirs, conv = row[0], row[col], row[3]
        if "{i}" in theirs:
            for i in range(config.n_layer):
                yield ours, theirs.format(i=i), i, conv
        else:
            yield ours, theirs, None, conv


def check_names(names: set[str], config: GPT2Config, fmt: str, source: str) -> None:
    """Raises a clear error unless ``names`` are exactly the tensors of ``config`` in ``fmt``."""
    expected = set(their_shapes(config, fmt))
    missing, extra = sorted(expected - names), sorted(names - expected)
    if missing or extra:
        parts = []
        # repr(): a hostile tensor name with a newline must not break the one-line error
        if missing:
            parts.append(
                f"missing {len(missing)} tensors (e.g. {', '.join(map(repr, missing[:3]))})"
            )
        if extra:
            parts.append(
                f"unexpected {len(extra)} tensors (e.g. {', '.join(map(repr, extra[:3]))})"
            )
        raise CheckpointError(
            f"{source}: does not match a GPT-2 with n_layer={config.n_layer}: {'; '.join(parts)}"
        )


def check_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    config: GPT2Config,
    fmt: str,
    source: str,
    config_source: str,
) -> None:
    """Raises a clear error naming both files when a tensor's shape disagrees with the config."""
    for name, want in their_shapes(config, fmt).items():
        have = tuple(shapes[name])
        if have != want:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {have} but {config_source} implies {want} "
                f"(n_vocab={config.n_vocab}, n_ctx={config.n_ctx}, n_embd={config.n_embd})"
            )


def check_float(dtypes: Mapping[str, str], source: str) -> None:
    """Raises a clear error when a tensor is not floating point (``dtypes``: numpy names, e.g.
    ``"int32"``): GPT-2's weights are floats, and casting integers would pass silently."""
    for name, dtype in sorted(dtypes.items()):
        if "float" not in dtype:  # float16/32/64, bfloat16, float8_*
            raise CheckpointError(
                f"{source}: tensor {name} has dtype {dtype}; GPT-2 weights are floating point"
            )


def from_theirs(
    get: Callable[[str], np.ndarray],
    config: GPT2Config,
    fmt: str,
    dtype: Any = np.float32,
    progress: Callable[[int], Any] | None = None,
    read_into: Callable[[str, np.ndarray], bool] | None = None,
) -> dict[str, Any]:
    """Builds our nested params tree (numpy, ``dtype``) from tensors read one at a time by ``get``.

    The caller has checked names and shapes (:func:`check_names`, :func:`check_shapes`). The
    stacked layer arrays are allocated once and filled layer by layer, so peak memory stays one
    copy of the model plus one tensor. ``read_into(name, out)``, when given, fills ``out`` (the
    tensor's slice of its leaf) and returns True where it can (a tensor stored in ``dtype``:
    read straight into place, no copy in between), else returns False and ``get`` is used.
    """
    want = np.dtype(dtype)
    flat = {path: np.empty(shape, want) for path, shape in our_shapes(config).items()}
    for ours, name, layer, conv in placements(config, fmt):
        target = flat[ours] if layer is None else flat[ours][layer]
        if read_into is not None and read_into(name, target):  # (1, nx, nf) too: same bytes
            nbytes = target.nbytes
        else:
            value = get(name)
            if conv and fmt == "openai":
                value = value[0]
            target[...] = value
            nbytes = value.nbytes
            del value
        if progress is not None:
            progress(nbytes)
    return unflatten(flat)


def to_theirs(
    params: Mapping[str, Any], config: GPT2Config, fmt: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Streams ``(name, array)`` in format ``fmt`` from our params tree, one tensor at a time."""
    flat = flatten(params)
    shapes = our_shapes(config)
    if set(flat) != set(shapes):
        raise CheckpointError(
            f"params tree does not match the config: keys {sorted(set(flat) ^ set(shapes))}"
        )
    for path, shape in shapes.items():
        if tuple(flat[path].shape) != shape:
            raise CheckpointError(f"params {path} has shape {flat[path].shape}, expected {shape}")
    for ours, name, layer, conv in placements(config, fmt):
        value = np.asarray(flat[ours] if layer is None else flat[ours][layer])
        yield name, (value[None] if conv and fmt == "openai" else value)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"h": {"ln_1": {"g": x}}}`` -> ``{"h/ln_1/g": x}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out
