"""Hugging Face GPT-2 directories: export gpt2jax params to one, and import from one.

Export (:func:`export_hf`) writes what ``GPT2LMHeadModel.save_pretrained`` writes, so
``from_pretrained`` and ``AutoTokenizer`` load it offline with no missing or unexpected weights;
import (:func:`read_hf_dir`) reads safetensors, and ``.bin`` only through
``torch.load(weights_only=True)``. Both go through the table in :mod:`gpt2jax.convert.mapping`.

Run as a script from a checkout::

    python convert/hf.py import hf/some-gpt2 ckpt/some-gpt2    # = gpt2jax convert
    python convert/hf.py export ckpt/124M hf/124M               # = gpt2jax export
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from gpt2jax.config import EOT_TOKEN, GPT2Config, read_json
from gpt2jax.convert import mapping
from gpt2jax.convert.hf_tokenizer import (
    HF_NAMES,
    OPENAI_NAMES,
    copy_tokenizer_files,
    openai_tokenizer_dir,
    tokenizer_config,
    write_default_tokenizer_files,
)
from gpt2jax.dtypes import DTYPES, STORAGE
from gpt2jax.errors import CheckpointError, ConfigError, Gpt2JaxError
from gpt2jax.files import check_regular
from gpt2jax.formats.safetensors_io import SafetensorsFile, write_file
from gpt2jax.progress import progress_bar
from gpt2jax.store.atomic import atomic_dir

PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
WEIGHTS = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}
INDEX_SUFFIX = ".index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"


# ---- export ----------------------------------------------------------------------------------


def export_hf(
    params: Any,
    config: GPT2Config,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    fmt: str = "safetensors",
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    show_progress: bool = False,
    on_rounding: Callable[[float], None] | None = None,
    inputs: tuple[str | os.PathLike | None, ...] | list = (),
) -> list[str]:
    """Writes ``params`` as a Hugging Face GPT-2 directory at ``out_dir``; returns its files.

    Args:
        params: our params tree (numpy or jax arrays, any float dtype).
        config: the model's config.
        out_dir: created atomically; an existing non-empty one is refused unless ``overwrite``.
        dtype: ``float32``, ``bfloat16`` or ``float16``: the dtype the weights are stored in.
        fmt: ``safetensors`` (default, no torch needed) or ``bin`` (``pytorch_model.bin``).
        tokenizer_dir: where the tokenizer files come from (OpenAI or HF naming); without
            them, GPT-2's are rebuilt from tiktoken.
        max_shard_size: bytes, or a string like ``"5GB"`` / ``"500MiB"``; more than this and
            the weights are split into shards.
        on_rounding: called with each tensor's largest ``|stored - given|`` (what casting to
            ``dtype`` changed), measured on the tensor as it is cast, so without a second pass.
        inputs: paths the params came from; ``out_dir`` may not be, hold or lie inside one of
            them (nor ``tokenizer_dir``), ``overwrite`` or not.

    What is written, as ``GPT2LMHeadModel.save_pretrained`` writes it in transformers 5:

    * ``config.json`` (:meth:`GPT2Config.to_hf_config` plus the weights' dtype) and
      ``generation_config.json``;
    * ``model.safetensors`` (written in pure numpy, :mod:`gpt2jax.formats.safetensors_io`) with
      the ``GPT2LMHeadModel`` state-dict keys, ``transformer.`` + the ``hf`` column of
      :mod:`gpt2jax.convert.mapping`. ``lm_head.weight`` is left out: it is tied to
      ``transformer.wte.weight``, and transformers drops tied weights when saving and re-ties
      them when loading. Above ``max_shard_size`` the tensors go into
      ``model-0000i-of-0000N.safetensors`` with a ``model.safetensors.index.json`` (total_size
      and total_parameters, as transformers 5 writes it), split as
      ``huggingface_hub.split_torch_state_dict_into_shards`` does (:func:`plan_shards`), except
      that the shards keep the stream's order;
    * or, with ``fmt="bin"``, ``pytorch_model.bin`` (``torch.save`` of a plain state dict);
    * ``vocab.json`` + ``merges.txt`` (byte-for-byte OpenAI's ``encoder.json`` + ``vocab.bpe``)
      and ``tokenizer_config.json``, so ``AutoTokenizer`` works offline.

    The tensors are streamed one at a time from :func:`mapping.to_theirs` and cast one at a
    time, so exporting costs little memory beyond the params themselves.
    """
    if dtype not in STORAGE:
        raise Gpt2JaxError(f"export dtype {dtype!r} is not one of {', '.join(STORAGE)}")
    if fmt not in WEIGHTS:
        raise Gpt2JaxError(f"export format {fmt!r} is not one of {', '.join(WEIGHTS)}")
    np_dtype = DTYPES[dtype]
    limit = parse_size(max_shard_size)
    specs = [(PREFIX + n, np_dtype, s) for n, s in mapping.their_shapes(config, "hf").items()]
    shards = plan_shards(specs, limit)
    names = shard_names(WEIGHTS[fmt], len(shards))
    total = sum(_nbytes(s) for s in specs)

    def cast(value: Any) -> np.ndarray:
        value = np.asarray(value)
        stored = value.astype(np_dtype, copy=False)
        if on_rounding is not None:
            on_rounding(_max_abs_difference(value, stored))
        return stored

    # One tensor at a time: taken from the params tree (a view for numpy), cast, written.
    stream = (
        (PREFIX + name, cast(value)) for name, value in mapping.to_theirs(params, config, "hf")
    )
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs, reads=[tokenizer_dir]) as tmp:
        # Tokenizer first: if it cannot be had (offline, no files) nothing big was written yet.
        if tokenizer_dir is None or not copy_tokenizer_files(tokenizer_dir, tmp, HF_NAMES):
            write_default_tokenizer_files(tmp, HF_NAMES)
        _write_json(os.path.join(tmp, "tokenizer_config.json"), tokenizer_config(config.n_ctx))
        with progress_bar(total, "exporting", unit="B", enabled=show_progress) as bar:
            for shard, name in zip(shards, names, strict=True):
                tensors = _counted(itertools.islice(stream, len(shard)), bar.update)
                path = os.path.join(tmp, name)
                if fmt == "safetensors":
                    write_file(path, shard, tensors, metadata={"format": "pt"})
                else:
                    from gpt2jax.formats.torch_bin import save_state_dict

                    save_state_dict(path, tensors)
        if len(shards) > 1:
            where = {
                spec[0]: name for shard, name in zip(shards, names, strict=True) for spec in shard
            }
            index = {
                "metadata": {"total_parameters": config.num_params(), "total_size": total},
                "weight_map": dict(sorted(where.items())),
            }
            _write_json(os.path.join(tmp, WEIGHTS[fmt] + INDEX_SUFFIX), index)
        _write_json(os.path.join(tmp, "config.json"), hf_config(config, dtype))
        _write_json(
            os.path.join(tmp, "generation_config.json"),
            {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN},
        )
        files = sorted(os.listdir(tmp))
    return files


def _max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b|``, in the wider dtype of the two (at least float32): one tensor's
    temporaries at a time."""
    if a is b:
        return 0.0
    wide = np.promote_types(np.promote_types(a.dtype, b.dtype), np.float32)
    d = a.astype(wide, copy=False) - b.astype(wide, copy=False)
    return float(np.max(np.abs(d, out=d), initial=0.0))


def hf_config(config: GPT2Config, dtype: str) -> dict[str, Any]:
    """``config.json``: the model's HF config plus the stored dtype, under transformers 5's key
    ``dtype`` and 4.x's ``torch_dtype``."""
    return {**config.to_hf_config(), "dtype": dtype, "torch_dtype": dtype}


def plan_shards(specs: list[Any], limit: int) -> list[list[Any]]:
    """Splits ``(name, dtype, shape)`` specs, in order, into shards of at most ``limit`` bytes
    (a tensor bigger than ``limit`` gets a shard of its own), as transformers does."""
    shards: list[list[Any]] = [[]]
    size = 0
    for spec in specs:
        n = _nbytes(spec)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def shard_names(filename: str, n: int) -> list[str]:
    """``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors``... (as transformers
    names them; ``pytorch_model-...bin`` likewise)."""
    if n == 1:
        return [filename]
    stem, ext = os.path.splitext(filename)
    return [f"{stem}-{i:05d}-of-{n:05d}{ext}" for i in range(1, n + 1)]


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB`` (10**9), ``500MiB`` (2**20), ``10KB``, ``1024`` ... as transformers'
    ``convert_file_size_to_int`` reads them."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip()
        units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}
        unit = next((u for u in units if text.upper().endswith(u)), None)
        number = text[: -len(unit)] if unit else text
        try:
            value = int(number) * (units[unit] if unit else 1)
        except ValueError:
            raise ConfigError(
                f"max shard size {size!r} is not a size like 5GB, 500MB or 2GiB"
            ) from None
    if value <= 0:
        raise ConfigError(f"max shard size must be positive, got {size!r}")
    return value


def _nbytes(spec: Any) -> int:
    return int(np.prod(spec[2], dtype=np.int64)) * np.dtype(spec[1]).itemsize


def _counted(items: Iterator[tuple[str, np.ndarray]], update: Callable[[int], Any]):
    for name, value in items:
        yield name, value
        update(value.nbytes)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# ---- import ----------------------------------------------------------------------------------


def read_hf_config(path: str | os.PathLike) -> GPT2Config:
    """Our config of a Hugging Face directory's ``config.json`` (no weights read)."""
    config_path = os.path.join(os.fspath(path), "config.json")
    return GPT2Config.from_hf_config(read_json(config_path), source=config_path)


def read_hf_dir(
    path: str | os.PathLike, dtype: Any = np.float32, show_progress: bool = False
) -> tuple[GPT2Config, dict]:
    """Reads a Hugging Face GPT-2 directory into ``(config, params)`` (numpy, ``dtype``).

    Names and shapes are all checked against ``config.json`` before any weight is read.
    Single or sharded safetensors are read, and ``.bin`` files only through
    ``torch.load(weights_only=True)`` (:mod:`gpt2jax.formats.torch_bin`). The older key layouts
    are accepted: names without the ``transformer.`` prefix (``GPT2Model`` checkpoints, the
    original hub upload) and the ``attn.bias`` / ``attn.masked_bias`` causal-mask buffers, which
    are skipped by their exact names. ``lm_head.weight``, when present, must equal ``wte``:
    GPT-2 ties them.
    """
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    hf = read_json(config_path)
    config = GPT2Config.from_hf_config(hf, source=config_path)
    tensors, source = _open_weights(path)

    # Older layouts: no "transformer." prefix, and the causal-mask buffers saved as weights.
    named: dict[str, _Tensor] = {}
    for raw, entry in tensors.items():
        name = raw[len(PREFIX) :] if raw.startswith(PREFIX) else raw
        if name in named:
            raise CheckpointError(f"{source}: holds {name} both with and without {PREFIX!r}")
        named[name] = entry
    for i in range(config.n_layer):
        named.pop(f"h.{i}.attn.bias", None)
        named.pop(f"h.{i}.attn.masked_bias", None)
    lm_head = named.pop(LM_HEAD, None)

    mapping.check_names(set(named), config, "hf", source)
    mapping.check_shapes({k: v.shape for k, v in named.items()}, config, "hf", source, config_path)
    mapping.check_float({k: v.dtype for k, v in named.items()}, source)
    if lm_head is not None:
        wte = named["wte.weight"]
        if lm_head.shape != wte.shape or not np.array_equal(lm_head.read(), wte.read()):
            raise CheckpointError(
                f"{source}: {LM_HEAD} differs from wte.weight; untied LM heads are not "
                "supported (GPT-2 ties the output projection to the token embedding)"
            )
    elif hf.get("tie_word_embeddings", True) is False:
        raise CheckpointError(
            f"{config_path}: tie_word_embeddings is false but there is no {LM_HEAD}; "
            "untied LM heads are not supported"
        )

    total = sum(t.nbytes for t in named.values())
    with progress_bar(total, "converting", unit="B", enabled=show_progress) as bar:
        params = mapping.from_theirs(
            lambda name: named[name].read(), config, "hf", dtype, bar.update
        )
    return config, params


class _Tensor(NamedTuple):
    """One stored tensor: how to read it (lazily), its shape and its size on disk."""

    read: Callable[[], np.ndarray]
    shape: tuple[int, ...]
    nbytes: int
    dtype: str  # numpy's name for it: "float32", "bfloat16", "int64"...


def weight_files(path: str) -> tuple[str, list[str]]:
    """The weights of an HF directory: ``(kind, files)``, looked for in transformers' order:
    ``model.safetensors``, its sharded index, ``pytorch_model.bin``, its sharded index."""
    for kind in ("safetensors", "bin"):
        single = os.path.join(path, WEIGHTS[kind])
        index_path = single + INDEX_SUFFIX
        for candidate in (single, index_path):
            if os.path.exists(candidate):
                check_regular(candidate, CheckpointError)  # a FIFO or device: said so
                return kind, [candidate]
    raise CheckpointError(
        f"{path}: no weights (expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)"
    )


def _open_weights(path: str) -> tuple[dict[str, _Tensor], str]:
    """Every stored tensor by its name in the files, and a file name for error messages."""
    kind, files = weight_files(path)
    source = files[0]
    weight_map = None
    if source.endswith(INDEX_SUFFIX):
        weight_map = _read_index(source)
        files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    tensors: dict[str, _Tensor] = {}
    for file in files:
        if kind == "safetensors":
            st = SafetensorsFile(file)
            entries = {
                n: _Tensor(_reader(st.get, n), st.shape(n), st.get(n).nbytes, st.dtype(n).name)
                for n in st.names()
            }
        else:
            from gpt2jax.formats.torch_bin import load_state_dict, to_numpy

            state = load_state_dict(file)
            entries = {
                n: _Tensor(
                    _reader(lambda k, s=state: to_numpy(s[k]), n),
                    tuple(t.shape),
                    t.numel() * t.element_size(),
                    str(t.dtype).removeprefix("torch."),
                )
                for n, t in state.items()
            }
        for name, entry in entries.items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name} is also in another shard")
            if weight_map is not None and weight_map.get(name) != os.path.basename(file):
                raise CheckpointError(
                    f"{source}: says {name} is in {weight_map.get(name)}, found in {file}"
                )
            tensors[name] = entry
    if weight_map is not None and set(weight_map) != set(tensors):
        missing = sorted(set(weight_map) - set(tensors))
        raise CheckpointError(f"{source}: lists tensors no shard holds (e.g. {missing[0]})")
    return tensors, source


def _reader(get: Callable[[str], np.ndarray], name: str) -> Callable[[], np.ndarray]:
    return lambda: get(name)


def _read_index(index_path: str) -> dict[str, str]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map")
    for name, file in weight_map.items():
        # Shard files must sit beside the index: never follow a path out of the directory.
        if not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: {name} points at {file!r}, not a file name")
        if not os.path.isfile(os.path.join(os.path.dirname(index_path), file)):
            raise CheckpointError(f"{index_path}: shard {file} is missing")
    return weight_map


def convert_hf_dir(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: Any = np.float32,
    overwrite: bool = False,
    show_progress: bool = False,
) -> GPT2Config:
    """Converts a Hugging Face GPT-2 directory into a gpt2jax model directory at ``dst``.

    ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``) become ``encoder.json`` +
    ``vocab.bpe``, checked to be a valid GPT-2 BPE.
    """
    from gpt2jax.files import check_destination
    from gpt2jax.store.model_dir import save_model_dir
    from gpt2jax.tokenizer import Tokenizer

    check_destination(dst, overwrite=overwrite, inputs=[src], utf8=True)  # before any work
    config = read_hf_config(src)
    with openai_tokenizer_dir(src) as tokenizer_dir:
        if tokenizer_dir is not None:  # a vocabulary of another size: refused now
            tokenizer = Tokenizer.from_files(
                *(os.path.join(tokenizer_dir, n) for n in OPENAI_NAMES)
            )
            tokenizer.source = os.path.abspath(os.fspath(src))
            where = os.path.join(os.fspath(src), "config.json")
            tokenizer.check_model_vocab(config.n_vocab, where, "vocab_size")
        config, params = read_hf_dir(src, dtype=dtype, show_progress=show_progress)
        save_model_dir(
            dst,
            config,
            params,
            tokenizer_dir=tokenizer_dir,
            source={"format": "hf", "path": os.path.abspath(os.fspath(src))},
            overwrite=overwrite,
            inputs=[src],
        )
    return config


def describe_hf_dir(path: str | os.PathLike) -> dict[str, Any]:
    """``config`` (ours), stored ``dtype`` and weight ``files`` of an HF directory, read
    without loading any weight (for ``gpt2jax info``)."""
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    hf = read_json(config_path)
    config = GPT2Config.from_hf_config(hf, source=config_path)
    kind, files = weight_files(path)
    if files[0].endswith(INDEX_SUFFIX):
        files += [os.path.join(path, f) for f in sorted(set(_read_index(files[0]).values()))]
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "unknown"
    if kind == "safetensors":
        st = SafetensorsFile(files[-1])
        dtypes = {st.dtype(n).name for n in st.names()}
        dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
    return {"config": config, "dtype": dtype, "files": [os.path.basename(f) for f in files]}


if __name__ == "__main__":  # run as a file, this is the CLI's module __main__, not a library one
    from gpt2jax.cli.main import script_main

    sys.exit(script_main("hf", sys.argv[1:]))
