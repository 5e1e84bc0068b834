"""The training step: pure, compiled once, data-parallel over devices with ``jax.pmap``.

:func:`make_train_step` returns ``train_step(state, batch) -> (state, metrics)``, a pure function
of a :class:`TrainState` and a batch of token windows; its loss and gradients are Hugging Face's
``GPT2LMHeadModel``'s (tested against ``torch.autograd``), and memory options, which enter only
through ``loss_fn`` and the optimizer (:mod:`gpt2jax.train.memory.build`), leave them unchanged.
:class:`DataParallel` runs it over this process's devices; with several processes
(:mod:`gpt2jax.train.cluster`) ``pmean`` spans every process's devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2jax.errors import ConfigError
from gpt2jax.loss_scale import LossScale, all_finite
from gpt2jax.model import GPT2
from gpt2jax.progress import progress_bar
from gpt2jax.train.layerwise import LayerwiseState, apply_optimizer
from gpt2jax.train.loss import LossFn, make_token_losses
from gpt2jax.train.memory.accumulate import Accumulate

AXIS = "data"
# Dropout masks come from XLA's RngBitGenerator ("rbg"): deterministic on a given backend, and
# far cheaper to compile and run than the default threefry for masks of every activation.
DROPOUT_PRNG = "rbg"
Metrics = dict[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes: ``step`` (updates done), ``params``, ``opt_state``, ``rng``."""

    step: jax.Array  # () int32
    params: Any
    opt_state: Any
    rng: jax.Array  # (4,) uint32: the dropout key's data ("rbg"), fixed for the whole run
    frozen: Any = None  # parameters the loss reads but never trains (LoRA's base model)
    #: float16 training's dynamic loss scale (:mod:`gpt2jax.loss_scale`); None: no scaling
    loss_scale: LossScale | None = None

    @classmethod
    def create(
        cls, params: Any, tx: Any, seed: int, frozen: Any = None, loss_scale: Any = None
    ) -> TrainState:
        params = jax.tree.map(jnp.asarray, params)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(seed, impl=DROPOUT_PRNG)),
            frozen=None if frozen is None else jax.tree.map(jnp.asarray, frozen),
            loss_scale=loss_scale,
        )


def token_losses(model: GPT2, params: Any, windows: jax.Array, rng: jax.Array | None = None):
    """Cross-entropy of every next-token prediction, ``(B, T)`` float32.

    ``windows`` are ``(B, T + 1)`` token ids: the first ``T`` are the inputs, the last ``T`` the
    targets. ``rng`` (a key) turns dropout on.
    """
    inputs, targets = windows[:, :-1], windows[:, 1:]
    rngs = None if rng is None else {"dropout": rng}
    logits = model.apply({"params": params}, inputs, deterministic=rng is None, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def make_train_step(
    model: GPT2,
    tx: Any,
    *,
    loss_fn: LossFn | None = None,
    schedule: optax.Schedule | None = None,
    skip_nonfinite: bool = False,
    axis_name: str | None = None,
    accumulate: Accumulate | None = None,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, Metrics]]:
    """The pure training step (not yet compiled; see :class:`DataParallel`).

    ``train_step(state, batch)`` is a pure function of a :class:`TrainState` and a batch of
    token windows ``(A, b, T + 1)``: ``A`` micro-batches of ``b`` windows each, whose gradients
    are accumulated by ``lax.scan`` (the gradient of their mean loss, so accumulation changes
    memory, not the maths). The loss is the mean token cross-entropy, computed in float32 from
    float32 logits even when the model computes in bfloat16 (Hugging Face's
    ``GPT2LMHeadModel`` loss; the tests compare loss and every gradient with
    ``torch.autograd``). Memory options (remat, chunked loss, LoRA, freezing, FSDP) enter
    through ``loss_fn`` and ``tx`` (:mod:`gpt2jax.train.memory.build`); none changes these
    maths. Dropout, when the model has any, draws from ``fold_in(fold_in(fold_in(key, step),
    device), micro_batch)``, so it too is a pure function of the state and the step.

    Args:
        model: the module; dropout is on when ``model.config.dropout > 0``.
        tx: the optimizer (clipping included): an optax transformation, or a
            :class:`gpt2jax.train.layerwise.Layerwise` that updates the parameters in place, one
            layer at a time (what ``finetune`` uses, :mod:`gpt2jax.train.memory.build`).
        loss_fn: the per-token loss ``loss_fn(params, windows, rng, frozen)``
            (:func:`gpt2jax.train.loss.make_token_losses`; default: the plain loss of ``model``); it
            is differentiated with respect to ``state.params`` only, ``state.frozen`` (LoRA's
            base model) is a constant.
        schedule: the learning rate schedule inside ``tx``; ``metrics["lr"]`` reports the rate
            this update applied (0 for a skipped one).
        skip_nonfinite: when the loss or gradient norm is NaN/inf, keep the params and optimizer
            state unchanged (the step counter still advances); otherwise the update is applied
            and the caller is expected to stop on ``metrics["finite"] == False``.
        axis_name: the pmapped axis to average gradients and metrics over (None: one device).
        accumulate: with more than one micro-batch, accumulate the gradient in one buffer
            layer by layer (:func:`gpt2jax.train.memory.accumulate.make_accumulate`, full-model
            training only: it differentiates ``state.params`` as the model's own tree) instead of
            adding each micro-batch's whole gradient to a running sum.

    With a ``state.loss_scale`` (float16 training) the loss is multiplied by the scale before
    differentiating and the gradients divided by it; an update whose gradients overflow is
    skipped (``metrics["overflow"]``) and the scale adjusted (:mod:`gpt2jax.loss_scale`).

    Returns ``train_step(state, batch (A, b, T + 1) int32) -> (state, metrics)`` with metrics
    ``loss`` (mean over the global batch), ``grad_norm`` (before clipping), ``finite`` and, given
    the ``schedule``, ``lr``; with loss scaling also ``overflow`` and ``loss_scale``.
    """
    use_dropout = model.config.dropout > 0
    if loss_fn is None:
        loss_fn = make_token_losses(model)

    def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, Metrics]:
        accum = batch.shape[0]
        scaler = state.loss_scale
        factor = 1.0 if scaler is None else scaler.scale  # what the loss is multiplied by
        key = None
        if use_dropout:
            key = jax.random.wrap_key_data(state.rng, impl=DROPOUT_PRNG)
            key = jax.random.fold_in(key, state.step)
            if axis_name is not None:
                key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))

        def loss_and_grads(windows: jax.Array, micro: jax.Array) -> tuple[jax.Array, Any]:
            rng = None if key is None else jax.random.fold_in(key, micro)

            def objective(p: Any) -> tuple[jax.Array, jax.Array]:
                loss = loss_fn(p, windows, rng, state.frozen).mean()
                return loss * factor, loss

            (_, loss), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
            return loss, grads

        if accum == 1:
            loss, grads = loss_and_grads(batch[0], jnp.int32(0))
        elif accumulate is not None:  # one gradient buffer, filled layer by layer in place

            def body(carry, xs):
                loss_sum, acc = carry
                windows, micro = xs
                rng = None if key is None else jax.random.fold_in(key, micro)
                loss, acc = accumulate(state.params, acc, windows, factor / accum, rng)
                return (loss_sum + loss, acc), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (jnp.zeros((), jnp.float32), zeros)
            (loss, grads), _ = jax.lax.scan(body, init, (batch, jnp.arange(accum)))
            loss = loss / factor
        else:

            def body(carry, xs):
                loss_sum, grad_sum = carry
                loss, grads = loss_and_grads(*xs)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (jnp.zeros((), jnp.float32), zeros)
            (loss, grads), _ = jax.lax.scan(body, init, (batch, jnp.arange(accum)))
            loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
        if axis_name is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
        if scaler is not None:
            grads = scaler.unscale(grads)

        grad_norm = optax.tree.norm(grads)
        params, opt_state = apply_optimizer(tx, grads, state.opt_state, state.params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        applied = finite
        metrics = {}
        if scaler is not None:  # an overflow is the scaler's business, not the run's
            metrics["overflow"] = ~all_finite(grads)
            metrics["loss_scale"] = scaler.scale
            finite = jnp.isfinite(loss)
            applied = finite & ~metrics["overflow"]
            state = state.replace(loss_scale=scaler.adjust(~metrics["overflow"]))
        if skip_nonfinite or scaler is not None:
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(applied, new, old),
                (params, opt_state),
                (state.params, state.opt_state),
            )
        metrics.update(loss=loss, grad_norm=grad_norm, finite=finite)
        if schedule is not None:
            # The optimizer evaluates its schedule at its own count of applied updates, which
            # skipped updates do not advance (state.step does). A plain optax tx keeps its count
            # somewhere down its chain: state.step stands in (the same until a skip).
            opt = state.opt_state
            count = opt.count if isinstance(opt, LayerwiseState) else state.step
            lr = jnp.asarray(schedule(count), jnp.float32)
            skipping = skip_nonfinite or scaler is not None
            metrics["lr"] = jnp.where(applied, lr, 0.0) if skipping else lr
        state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return state, metrics

    return train_step


def make_eval_step(
    model: GPT2, axis_name: str | None = None, loss_fn: LossFn | None = None
) -> Callable[..., Metrics]:
    """``eval_step(params, windows (N, T+1), weights (N, T)) -> {"loss_sum", "count"}``.

    Sums (over the devices too) of the weighted token losses and of the weights, so that any
    number of batches combine into one exact mean. With a run's ``loss_fn``
    (:mod:`gpt2jax.train.memory.build`), ``params`` is the pair ``(state.params, state.frozen)``.
    """

    def eval_step(params: Any, windows: jax.Array, weights: jax.Array) -> Metrics:
        if loss_fn is None:
            losses = token_losses(model, params, windows)
        else:
            losses = loss_fn(params[0], windows, None, params[1])
        out = {"loss_sum": (losses * weights).sum(), "count": weights.sum()}
        return out if axis_name is None else jax.lax.psum(out, axis_name)

    return eval_step


class DataParallel:
    """Data parallelism with ``jax.pmap`` over this process's devices.

    The state is replicated: every leaf is one array with a full copy on each device
    (``in_axes=None``, sharding ``PartitionSpec()``), not a stack of copies on a leading device
    axis; the step's outputs come back the same way (``out_axes=None``: after ``pmean`` every
    device holds the same values). Kept unstacked, the donated state aliases the new state in
    place, as under a plain ``jit``; a stacked state makes XLA copy the optimizer moments
    every step (measured: BENCHMARKS.md, Training).

    On several devices the gradients and metrics are averaged with ``lax.pmean`` over the named
    axis ``"data"`` (``axis_name``; on one device there is nothing to average, and ``finetune``
    passes None); every device then applies the same update. With the same global batch the
    result equals the single-device one up to float32 summation order (the tests check 8 fake
    CPU devices against 1).

    A global batch of ``B`` windows is split by process (rows ``[p B / P, (p + 1) B / P)``),
    then by device, then into ``A`` micro-batches: device ``d`` gets ``(A, B / (P D A), T+1)``.

    Several processes (:mod:`gpt2jax.train.cluster`): each one's ``pmap`` runs over its own
    devices and ``pmean`` spans all processes' devices; each process reads only its rows. The
    state stays process-local; checkpoints see it as one global replicated array
    (:meth:`checkpoint_view`), which orbax writes once for all processes.
    ``tests/test_multihost.py`` runs 2 processes x 2 CPU devices against 1 process x 4.
    """

    def __init__(self, devices: list[Any] | None = None) -> None:
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.num_devices = len(self.devices)
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()
        mesh = Mesh(np.array(self.devices), (AXIS,))
        self.sharding = NamedSharding(mesh, PartitionSpec(AXIS))  # batches: split
        self.replicated = NamedSharding(mesh, PartitionSpec())  # state: a copy on each device
        # The same state seen as one array over every process's devices (checkpoints).
        everywhere = Mesh(np.array(jax.devices()), (AXIS,))
        self.global_replicated = NamedSharding(everywhere, PartitionSpec())
        # pmap takes an explicit device list only within one process.
        self._pmap_devices = self.devices if self.process_count == 1 else None

    def check_batch(self, batch_size: int, grad_accum: int) -> int:
        """Windows per device per micro-batch; a clear error if ``batch_size`` does not split."""
        parts = self.process_count * self.num_devices * grad_accum
        if batch_size <= 0 or grad_accum <= 0 or batch_size % parts:
            raise ConfigError(
                f"--batch-size {batch_size} must be a positive multiple of processes "
                f"({self.process_count}) x devices ({self.num_devices}) x --grad-accum "
                f"({grad_accum}) = {parts}"
            )
        return batch_size // parts

    def process_rows(self, batch_size: int, grad_accum: int = 1) -> slice:
        """This process's rows of a global batch (a contiguous share, split further over its
        devices and micro-batches by :meth:`shard`)."""
        share = batch_size // self.process_count
        return slice(self.process_index * share, (self.process_index + 1) * share)

    def compile_train_step(self, train_step: Callable) -> Callable:
        """pmapped over the ``"data"`` axis: state replicated and donated, batch split."""
        return jax.pmap(
            train_step, AXIS, in_axes=(None, 0), out_axes=None, devices=self._pmap_devices,
            donate_argnums=(0,),
        )  # fmt: skip

    def compile_eval_step(self, eval_step: Callable) -> Callable:
        """pmapped: params replicated, windows and weights split, the sums replicated."""
        return jax.pmap(
            eval_step, AXIS, in_axes=(None, 0, 0), out_axes=None, devices=self._pmap_devices
        )

    def replicate(self, tree: Any) -> Any:
        """Every leaf copied to each device (one array, replicated sharding).

        Always a copy, never the caller's buffers: the train step donates (deletes) its input.
        """
        return jax.tree.map(lambda x: jax.device_put(x, self.replicated, may_alias=False), tree)

    def local_view(self, tree: Any) -> Any:
        """The first device's copy of every leaf, not copied: valid until the arrays are
        donated to the next step."""
        return jax.tree.map(lambda x: x.addressable_shards[0].data, tree)

    def sample_params(self, tree: Any) -> Any:
        """What process 0 samples from (:meth:`local_view`); None on the other processes,
        which write no samples."""
        return self.local_view(tree) if self.process_index == 0 else None

    def to_devices(self, tree: dict) -> None:
        """Replaces every host leaf of the nested dict ``tree`` by a device array, in place, so
        that each host array can be freed as soon as it is copied (:meth:`init` then replicates
        them)."""
        for key, value in tree.items():
            if isinstance(value, dict):
                self.to_devices(value)
            else:
                tree[key] = jnp.asarray(value)

    def checkpoint_view(self, tree: Any) -> Any:
        """The state as orbax saves it, without copies. One process: the first device's copy
        of every leaf. Several: every leaf as one global array replicated over all processes'
        devices (made of the local copies), so that orbax writes it once for all processes,
        not once per process into the same files."""
        if self.process_count == 1:
            return self.local_view(tree)
        return jax.tree.map(
            lambda x: jax.make_array_from_single_device_arrays(
                x.shape, self.global_replicated, [s.data for s in x.addressable_shards]
            ),
            tree,
        )

    def restore_target(self, shapes: Any) -> Any:
        """Abstract leaves to restore a checkpoint onto: as saved with one process, global
        replicated arrays with several (:meth:`from_checkpoint` makes them local again)."""
        if self.process_count == 1:
            return shapes
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.global_replicated),
            shapes,
        )

    def from_checkpoint(self, tree: Any) -> Any:
        """Restored arrays as this process's arrays (the same buffers)."""
        if self.process_count == 1:
            return tree
        return jax.tree.map(
            lambda x: jax.make_array_from_single_device_arrays(
                x.shape, self.replicated, [s.data for s in x.addressable_shards]
            ),
            tree,
        )

    def init(self, fn: Callable[..., Any], *args: Any, donate: bool = False) -> Any:
        """``fn(*args)`` computed straight into the replicated sharding (e.g. the train state);
        with ``donate``, ``args``' buffers are consumed (reused for the outputs)."""
        donated = ()
        if donate:  # placed first, so that their buffers can become the outputs'
            args, donated = jax.device_put(args, self.replicated), tuple(range(len(args)))
        return jax.jit(fn, out_shardings=self.replicated, donate_argnums=donated)(*args)

    def shard(self, rows: np.ndarray, grad_accum: int = 1) -> jax.Array:
        """This process's rows ``(n, ...)`` as ``(devices, grad_accum, n / (devices A), ...)``."""
        d = self.num_devices
        split = rows.reshape(d, grad_accum, rows.shape[0] // (d * grad_accum), *rows.shape[1:])
        return jax.device_put(split, self.sharding)

    def evaluate(
        self,
        eval_step: Callable,
        params: Any,
        windows: np.ndarray,
        weights: np.ndarray,
        per_device: int,
        show_progress: bool = False,
    ) -> tuple[float, float]:
        """``(mean loss, tokens)`` of ``windows`` with the pmapped ``eval_step``, in batches.

        ``params`` are replicated. Every process passes the same windows and evaluates its
        share; padding windows (weight 0) fill the last batch.
        """
        chunk = per_device * self.num_devices * self.process_count
        n = -(-len(windows) // chunk) * chunk
        windows = np.concatenate(
            [windows, np.zeros((n - len(windows), *windows.shape[1:]), windows.dtype)]
        )
        weights = np.concatenate(
            [weights, np.zeros((n - len(weights), *weights.shape[1:]), weights.dtype)]
        )
        loss_sum, count = 0.0, 0.0
        with progress_bar(n // chunk, "evaluating", unit="batch", enabled=show_progress) as bar:
            for i in range(0, n, chunk):
                rows = self.process_rows(chunk)
                w = windows[i : i + chunk][rows].reshape(self.num_devices, per_device, -1)
                m = weights[i : i + chunk][rows].reshape(self.num_devices, per_device, -1)
                out = eval_step(
                    params, jax.device_put(w, self.sharding), jax.device_put(m, self.sharding)
                )
                out = jax.device_get(out)
                loss_sum += float(out["loss_sum"])
                count += float(out["count"])
                bar.update(1)
        return loss_sum / max(count, 1.0), count
