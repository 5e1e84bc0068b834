"""FSDP: parameters, gradients and optimizer state sharded over devices with ``jit``.

Fully-sharded data parallelism (ZeRO-3; PyTorch FSDP) in JAX's own terms: a 1-D device mesh,
every large array of the train state split along one dimension (:data:`RULES`), the batch split
along its batch dimension, and ``jax.jit`` with those shardings; XLA's SPMD partitioner inserts
the collectives (:class:`FSDP`). Each device holds ``1/n`` of the state plus one layer's weights.
With several processes (:mod:`gpt2jax.train.cluster`) the mesh spans them all; arrays are global.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2jax.errors import ConfigError
from gpt2jax.model import Conv1D
from gpt2jax.progress import progress_bar

AXIS = "fsdp"
#: Arrays smaller than this are replicated.
MIN_SHARD_ELEMENTS = 2**14

#: (pattern on the leaf's "/"-joined path, axes that must not be sharded). The first match wins;
#: the array is then split along its largest remaining dimension divisible by the device count.
RULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"(^|/)h/", (0,)),  # stacked blocks (params, grads, their optimizer state): not the layers
    (r"(^|/)layers/", (0,)),  # Layerwise's per-layer optimizer state, stacked the same way
    (r"", ()),  # anything else: any dimension
)


def path_name(path: tuple) -> str:
    """``"h/mlp/c_fc/w"``-style name of a ``jax.tree_util`` key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def partition_spec(name: str, shape: tuple[int, ...], n_devices: int) -> PartitionSpec:
    """Where an array of ``shape`` at path ``name`` is split (see :data:`RULES`)."""
    if n_devices == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_ELEMENTS:
        return PartitionSpec()
    fixed = next(axes for pattern, axes in RULES if re.search(pattern, name))
    candidates = [
        (size, axis)
        for axis, size in enumerate(shape)
        if axis not in fixed and size % n_devices == 0
    ]
    if not candidates:
        return PartitionSpec()
    _, axis = max(candidates)
    return PartitionSpec(*(AXIS if a == axis else None for a in range(len(shape))))


class FSDP:
    """Fully-sharded data parallelism over ``devices`` (default: all of them).

    Fully-sharded data parallelism (ZeRO-3, Rajbhandari et al. 2020; PyTorch FSDP): a 1-D device
    mesh with axis ``"fsdp"``, every large array of the train state split along one dimension
    over that axis (:data:`RULES`, :func:`partition_spec`), the batch split along its batch
    dimension, and ``jax.jit`` with those ``NamedSharding``s as ``in_shardings`` and
    ``out_shardings``. XLA's SPMD partitioner then inserts the collectives: inside the layer scan
    it all-gathers one layer's weights before use, the gradients come out reduce-scattered to
    the parameters' sharding, and the optimizer updates each device's shard. Each device holds
    ``1/n`` of the parameters, gradients and optimizer state, plus one layer's gathered weights
    and its share of the activations.

    The layer axis of the stacked block weights ``h/...`` is never sharded: the layer scan (and
    the layer-by-layer optimizer, :mod:`gpt2jax.train.layerwise`) slices it, and a sharded slice
    axis would turn every slice into communication. Tensors under :data:`MIN_SHARD_ELEMENTS`
    (biases, LayerNorm, step counters) are replicated: splitting them saves nothing and costs a
    collective each.

    Checkpoints: orbax saves sharded arrays as they are (each device writes its shards) and
    restores onto whatever shardings the abstract target names, so a state saved on 8 devices
    restores onto 1 or 4 (:meth:`abstract`; the tests do exactly that).

    Several processes (:mod:`gpt2jax.train.cluster`): the mesh spans every process's devices and
    every array is global. Each process builds only its own rows of a batch
    (``jax.make_array_from_process_local_data``, :meth:`process_rows`) and puts only its own
    shards of the starting weights (:meth:`to_devices`); orbax writes each shard from the
    process that holds it. ``tests/test_multihost.py`` runs 2 processes x 2 CPU devices against
    1 process x 4 devices, and moves checkpoints between the two.
    """

    def __init__(self, devices: list[Any] | None = None) -> None:
        self.devices = list(devices) if devices is not None else jax.devices()
        self.num_devices = len(self.devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        #: a batch ``(A, b, T + 1)``: the ``b`` windows of each micro-batch split over devices
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(None, AXIS))

        self.process_count = jax.process_count()
        self.process_index = jax.process_index()
        self._gather = jax.jit(lambda x: x, out_shardings=self.replicated)

    def check_batch(self, batch_size: int, grad_accum: int) -> int:
        """Windows per device per micro-batch; a clear error if the batch does not split."""
        parts = self.num_devices * grad_accum
        if batch_size <= 0 or grad_accum <= 0 or batch_size % parts:
            raise ConfigError(
                f"--batch-size {batch_size} must be a positive multiple of devices "
                f"({self.num_devices}) x --grad-accum ({grad_accum}) = {parts} with --parallel fsdp"
            )
        return batch_size // parts

    def shardings(self, tree: Any) -> Any:
        """A ``NamedSharding`` for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s)."""

        def one(path: tuple, x: Any) -> NamedSharding:
            spec = partition_spec(path_name(path), tuple(np.shape(x)), self.num_devices)
            return NamedSharding(self.mesh, spec)

        return jax.tree_util.tree_map_with_path(one, tree)

    def abstract(self, tree: Any) -> Any:
        """``tree``'s leaves as ``ShapeDtypeStruct``s carrying their FSDP sharding (a target for
        ``jit`` lowering and for orbax restores)."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
            tree,
            self.shardings(tree),
        )

    def place(self, tree: Any) -> Any:
        """Puts host or device arrays onto the devices, sharded."""
        return jax.device_put(tree, self.shardings(tree))

    def init(self, fn: Callable[..., Any], *args: Any, donate: bool = False) -> Any:
        """``fn(*args)`` computed straight into its sharding (never whole on one device), e.g.
        the optimizer state: ``fsdp.init(tx.init, params)``; ``args`` are arrays, consumed with
        ``donate``."""
        args = tuple(self._global(a) for a in args)
        shapes = jax.eval_shape(fn, *args)
        # Placed first, sharded: arrays committed to one device (a loaded model's) cannot meet
        # the outputs' sharding over all devices inside one jit.
        args = self.place(args)
        donated = tuple(range(len(args))) if donate else ()
        return jax.jit(fn, out_shardings=self.shardings(shapes), donate_argnums=donated)(*args)

    def _global(self, tree: Any) -> Any:
        """With several processes, host values and this process's own arrays (a step counter,
        LoRA's base weights) put onto their sharding, which a computation over every process
        needs; the same values on every process."""
        if self.process_count == 1:
            return tree

        def put(x: Any, sharding: NamedSharding) -> Any:
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return x
            return jax.device_put(np.asarray(x), sharding)

        return jax.tree.map(put, tree, self.shardings(tree))

    def local_view(self, tree: Any) -> Any:
        """The arrays themselves (sharded; jit gathers what it needs): valid until donated."""
        return tree

    def sample_params(self, tree: Any) -> Any:
        """What process 0 samples from: one process, the sharded arrays themselves; several
        (whose arrays no single process can read), a host copy gathered one leaf at a time on
        process 0, None on the others (every process takes part in each gather)."""
        if self.process_count == 1:
            return tree

        def gather(x: jax.Array) -> np.ndarray | None:
            whole = self._gather(x)
            host = np.array(whole.addressable_shards[0].data) if self.process_index == 0 else None
            whole.delete()
            return host

        leaves, treedef = jax.tree.flatten(tree)
        gathered = [gather(x) for x in leaves]
        return jax.tree.unflatten(treedef, gathered) if self.process_index == 0 else None

    def to_devices(self, tree: dict) -> None:
        """Replaces every host leaf of the nested dict ``tree`` by its shards on the devices,
        in place (this process's shards only), so that each host array can be freed as soon as
        it is placed and no device ever holds a whole leaf."""

        def place(node: dict, shardings: dict) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    place(value, shardings[key])
                else:
                    node[key] = jax.device_put(np.asarray(value), shardings[key])

        place(tree, self.shardings(tree))

    def checkpoint_view(self, tree: Any) -> Any:
        """The arrays themselves: orbax writes each shard from the process that holds it."""
        return tree

    def restore_target(self, shapes: Any) -> Any:
        """Restored straight into the FSDP shards (:meth:`abstract`)."""
        return self.abstract(shapes)

    def from_checkpoint(self, tree: Any) -> Any:
        return tree

    def compile_train_step(self, train_step: Callable, state_shapes: Any = None) -> Callable:
        """``train_step(state, batch) -> (state, metrics)`` jitted with the state sharded (and
        donated), the batch split over devices, the metrics replicated and, like
        :class:`gpt2jax.train.step.DataParallel`'s, with a leading axis (of 1: one SPMD program).
        Without ``state_shapes`` the shardings are read off the first state it is called with.
        """

        def with_axis(state: Any, batch: jax.Array) -> tuple[Any, Any]:
            state, metrics = train_step(state, batch)
            return state, jax.tree.map(lambda m: m[None], metrics)

        def compile(shapes: Any) -> Callable:
            sharding = self.shardings(shapes)
            return jax.jit(
                with_axis,
                in_shardings=(sharding, self.batch_sharding),
                out_shardings=(sharding, self.replicated),
                donate_argnums=(0,),
            )

        if state_shapes is not None:
            return compile(state_shapes)
        compiled: list[Callable] = []

        def step(state: Any, batch: jax.Array) -> tuple[Any, Any]:
            if not compiled:
                compiled.append(compile(state))
            return compiled[0](state, batch)

        return step

    def shard(self, rows: np.ndarray, grad_accum: int = 1) -> jax.Array:
        """This process's rows of a global batch (:meth:`process_rows`) as the global batch
        ``(grad_accum, B / grad_accum, ...)``, split over devices along its second axis."""
        split = rows.reshape(grad_accum, rows.shape[0] // grad_accum, *rows.shape[1:])
        if self.process_count == 1:
            return jax.device_put(split, self.batch_sharding)
        shape = (grad_accum, split.shape[1] * self.process_count, *rows.shape[1:])
        return jax.make_array_from_process_local_data(self.batch_sharding, split, shape)

    def _local_block(self, n: int) -> slice:
        """The rows ``[start, stop)`` of ``n`` that this process's devices hold when rows are
        split over the mesh (contiguous: the mesh lists each process's devices together)."""
        rows = NamedSharding(self.mesh, PartitionSpec(AXIS))
        slices = [i[0] for i in rows.addressable_devices_indices_map((n,)).values()]
        start, stop = min(s.start for s in slices), max(s.stop for s in slices)
        if stop - start != sum(s.stop - s.start for s in slices):
            raise ConfigError("this process's devices are not contiguous in the FSDP mesh")
        return slice(start, stop)

    def process_rows(self, batch_size: int, grad_accum: int = 1) -> np.ndarray:
        """Indices of this process's windows in a global batch: in each of the ``grad_accum``
        micro-batches, the block of rows its devices hold."""
        micro = batch_size // grad_accum
        block = self._local_block(micro)
        offsets = np.arange(grad_accum)[:, None] * micro
        return (offsets + np.arange(block.start, block.stop)[None, :]).reshape(-1)

    def replicate(self, tree: Any) -> Any:
        """The train state (or any tree) put on the devices, sharded (the name is
        :class:`~gpt2jax.train.step.DataParallel`'s, whose state is replicated)."""
        return self.place(tree)

    def compile_eval_step(self, eval_step: Callable) -> Callable:
        """``eval_step(params, windows, weights)`` jitted with the rows split over devices."""
        rows = NamedSharding(self.mesh, PartitionSpec(AXIS))
        return jax.jit(eval_step, in_shardings=(None, rows, rows), out_shardings=self.replicated)

    def evaluate(
        self,
        eval_step: Callable,
        params: Any,
        windows: np.ndarray,
        weights: np.ndarray,
        per_device: int,
        show_progress: bool = False,
    ) -> tuple[float, float]:
        """``(mean loss, tokens)`` of ``windows`` in batches of ``per_device`` x devices rows
        (padding rows of weight 0 fill the last one)."""
        chunk = per_device * self.num_devices
        n = -(-len(windows) // chunk) * chunk
        pad = ((0, n - len(windows)), (0, 0))
        windows, weights = np.pad(windows, pad), np.pad(weights, pad)
        rows = NamedSharding(self.mesh, PartitionSpec(AXIS))
        mine = self._local_block(chunk)  # every process evaluates only its rows

        def put(x: np.ndarray) -> Any:
            if self.process_count == 1:
                return x
            return jax.make_array_from_process_local_data(rows, x[mine], x.shape)

        loss_sum, count = 0.0, 0.0
        with progress_bar(n // chunk, "evaluating", unit="batch", enabled=show_progress) as bar:
            for i in range(0, n, chunk):
                out = jax.device_get(
                    eval_step(params, put(windows[i : i + chunk]), put(weights[i : i + chunk]))
                )
                loss_sum += float(out["loss_sum"])
                count += float(out["count"])
                bar.update(1)
        return loss_sum / max(count, 1.0), count


@contextlib.contextmanager
def batch_sharded_activations(mesh: Mesh) -> Iterator[None]:
    """Within this context every projection's input and output stay split along the batch.

    Left alone, XLA's partitioner may prefer to all-gather the activations and keep each weight
    split (tensor parallelism: per-device activation memory of the whole batch); pinning the
    activations to the batch sharding makes it all-gather one layer's weights instead, which is
    FSDP. Used by the loss (:func:`gpt2jax.train.loss.make_token_losses`'s ``prepare``) under FSDP.
    """
    batch = NamedSharding(mesh, PartitionSpec(AXIS))

    def interceptor(next_fun, args, kwargs, context):
        if not (isinstance(context.module, Conv1D) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        x = jax.lax.with_sharding_constraint(args[0], batch)
        return jax.lax.with_sharding_constraint(next_fun(x, *args[1:], **kwargs), batch)

    with nn.intercept_methods(interceptor):
        yield


def make_prepare(mesh: Mesh):
    """The :func:`gpt2jax.train.loss.make_token_losses` hook under FSDP: activations pinned to the
    batch sharding (:func:`batch_sharded_activations`), and ``wte`` gathered whole once per step.

    ``wte`` is ``(50257, C)``: the vocabulary does not split over 8 devices, so it is sharded
    along ``C``, and the LM head would then produce partial logits to all-reduce, ``B x T x V``
    floats per chunk; gathering ``V x C`` floats once is far less traffic.
    """
    whole = NamedSharding(mesh, PartitionSpec())

    def prepare(params: Any, frozen: Any) -> tuple[Any, contextlib.AbstractContextManager]:
        tree = {**params, "wte": jax.lax.with_sharding_constraint(params["wte"], whole)}
        return tree, batch_sharded_activations(mesh)

    return prepare
