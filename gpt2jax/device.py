"""The accelerator this process computes on, and the defaults that follow from it.

* **Compute dtype** (:func:`default_compute_dtype`): bfloat16 on TPUs and on NVIDIA GPUs with
  bfloat16 tensor cores (compute capability 8.0 or newer: A100, L4, H100, ...); float16 with
  dynamic loss scaling (:mod:`gpt2jax.loss_scale`) on older GPUs (T4, V100), which have float16
  tensor cores only; float32 on CPUs. Parameters stay float32 (the master copy), and
  LayerNorm statistics, the softmax, the logits and the loss are float32 whatever the compute.
* **Rematerialisation** (:func:`default_remat`): ``dots`` on CPUs, ``none`` elsewhere.
* **KV cache dtype** (:func:`kv_cache_dtype`): the compute dtype, except float32 on a CPU.
* **Persistent compile cache** (:func:`enable_compile_cache`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from gpt2jax.dtypes import dtype


@dataclasses.dataclass(frozen=True)
class Device:
    """What :func:`describe` found: ``platform`` (cpu, gpu, tpu), ``kind`` (e.g. "NVIDIA
    H100 80GB HBM3", "TPU v5 lite"), ``count`` local devices, GPU ``compute_capability``."""

    platform: str
    kind: str
    count: int
    compute_capability: float | None = None


def describe() -> Device:
    """The first local device (all of a process's devices are of one kind)."""
    devices = jax.local_devices()
    d = devices[0]
    capability = getattr(d, "compute_capability", None)
    return Device(
        platform=d.platform,
        kind=d.device_kind,
        count=len(devices),
        compute_capability=float(capability) if capability else None,
    )


def default_compute_dtype(device: Device | None = None) -> str:
    """The compute dtype this device runs fastest without losing the model (module docstring)."""
    device = device or describe()
    if device.platform == "tpu":
        return "bfloat16"
    if device.platform == "gpu":
        capability = device.compute_capability
        return "bfloat16" if capability is None or capability >= 8.0 else "float16"
    return "float32"


def resolve_compute_dtype(name: str | None, device: Device | None = None) -> str:
    """``name``, or the device's default for ``None``/``"auto"``."""
    return default_compute_dtype(device) if name in (None, "auto") else name


def default_remat(device: Device | None = None) -> str:
    """What training blocks keep for the backward pass here by default.

    On a CPU, ``dots``: keeping only the matmul outputs and recomputing the elementwise work made
    the 124M step 9-13% faster than keeping everything (XLA zero-fills and copies every stacked
    activation of the layer scan; BENCHMARKS.md). Elsewhere ``none``, which was never measured
    against ``dots`` on an accelerator.
    """
    device = device or describe()
    return "dots" if device.platform == "cpu" else "none"


def resolve_remat(name: str | None, device: Device | None = None) -> str:
    """``name``, or the device's default for ``None``/``"auto"``."""
    return default_remat(device) if name in (None, "auto") else name


def needs_loss_scaling(compute_dtype: str) -> bool:
    """float16's 5 exponent bits underflow small gradients: training scales the loss."""
    return compute_dtype == "float16"


def kv_cache_dtype(compute_dtype: Any, platform: str | None = None) -> Any:
    """The decoding cache's dtype: float32 on a CPU (XLA's CPU backend converts 16-bit batched
    matmuls, so a 16-bit cache is slower there), else the compute dtype (a bfloat16 cache
    halves the bytes each new token reads)."""
    platform = platform or jax.default_backend()
    return jnp.float32 if platform == "cpu" else jnp.dtype(compute_dtype)


def summary(device: Device | None = None, attention: str = "auto") -> dict[str, Any]:
    """What training and generation choose here by default (``gpt2jax info``, the run log)."""
    from gpt2jax.attention import choose

    device = device or describe()
    compute = default_compute_dtype(device)
    train_attention = choose(
        attention, dtype=dtype(compute), queries=1024, keys=1024, causal_only=True,
        cached=False, dropout=False, backend=device.platform,
    )  # fmt: skip
    return {
        "platform": device.platform,
        "device": device.kind,
        "count": device.count,
        "compute_capability": device.compute_capability,
        "compute_dtype": compute,
        "loss_scaling": needs_loss_scaling(compute),
        "attention_train_1024": train_attention,
        "kv_cache_dtype": jnp.dtype(kv_cache_dtype(dtype(compute), device.platform)).name,
        "compile_cache": jax.config.jax_compilation_cache_dir,
    }


def enable_compile_cache(directory: str | os.PathLike | None = None) -> str | None:
    """Keeps XLA's compiled programs in ``directory``, so that the next process with the same
    shapes (a resumed run, a second ``generate``) loads them instead of compiling (minutes for
    the big models on a TPU). Returns the directory, or None when left off.

    Without ``directory``: ``$JAX_COMPILATION_CACHE_DIR`` if set, else, on accelerators only,
    ``<gpt2jax cache>/jax`` (``$GPT2JAX_CACHE``, default ``~/.cache/gpt2jax``). On a CPU it stays
    off by default: compiling is quick there, and a CPU program is built for the host's
    instruction set, which a cache in a home directory shared between machines would not
    respect. Colab users point it at Google Drive, so that a runtime reset keeps it.
    """
    if directory is None:
        directory = os.environ.get("JAX_COMPILATION_CACHE_DIR")
        if directory is None and jax.default_backend() != "cpu":
            from gpt2jax.train.data import cache_root

            directory = os.path.join(cache_root(), "jax")
    if directory is None:
        return None
    directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory
