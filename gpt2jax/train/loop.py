"""The fine-tuning loop behind ``gpt2jax finetune``: ``finetune(out, TrainConfig(...))``.

One run: tokenize the data once (:mod:`gpt2jax.train.data`), build the model, optimizer and
loss from the memory settings (:mod:`gpt2jax.train.memory.build`), compile the step
(:mod:`gpt2jax.train.step`, or :mod:`gpt2jax.train.sharding` with ``--parallel fsdp``), then
loop, checkpointing into the run directory (:mod:`gpt2jax.store.runs`). Batches and dropout keys
are pure functions of ``(seed, step)``, so a resumed run continues exactly (see :func:`finetune`).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import device, lora
from gpt2jax.config import GPT2Config, get_preset
from gpt2jax.errors import ConfigError, DataError, Gpt2JaxError
from gpt2jax.host_malloc import HUGE_PAGES_NOTE, huge_pages_on, return_freed_memory
from gpt2jax.loader import Pretrained, base_record, describe, load, run_base_params
from gpt2jax.loss_scale import LossScale
from gpt2jax.model import init_params
from gpt2jax.progress import progress_bar
from gpt2jax.store import runs
from gpt2jax.store.sizes import resolve_model
from gpt2jax.tokenizer import Tokenizer
from gpt2jax.train import cluster
from gpt2jax.train.batches import Prefetcher, WindowSampler, eval_windows, spread
from gpt2jax.train.data import check_vocab, load_tokens, split_tail
from gpt2jax.train.memory.build import build
from gpt2jax.train.memory.freeze import parse_freeze
from gpt2jax.train.metrics import MetricsLog, plot_losses
from gpt2jax.train.optim import adafactor_scale, learning_rate_schedule
from gpt2jax.train.reporting import Reporters
from gpt2jax.train.reporting import check_available as check_reporters
from gpt2jax.train.settings import TrainConfig
from gpt2jax.train.step import (
    AXIS,
    DataParallel,
    TrainState,
    make_eval_step,
    make_train_step,
)

log = logging.getLogger(__name__)

SAMPLE_TOP_K = 40  # as in OpenAI's interactive_conditional_samples.py


class NonFiniteLossError(Gpt2JaxError):
    """The loss or gradient became NaN/inf; ``step`` is the update that produced it."""

    def __init__(
        self,
        step: int,
        loss: float,
        checkpoint: int | None,
        run_dir: str,
        grad_norm: float | None = None,
    ) -> None:
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        self.grad_norm = grad_norm
        kept = (
            f"the last good checkpoint is step {checkpoint} ({run_dir}/checkpoints/{checkpoint})"
            if checkpoint is not None
            else "no checkpoint had been saved"
        )
        if math.isfinite(loss) and grad_norm is not None and not math.isfinite(grad_norm):
            what = f"the gradient norm is {grad_norm} (not finite; the loss was {loss})"
        else:
            what = f"the loss is {loss} (not finite)"
        super().__init__(
            f"{run_dir}: step {step}: {what}; training stopped and "
            f"{kept}. Lower --lr, or resume with --skip-nonfinite to skip such updates"
        )


@dataclasses.dataclass
class FinetuneResult:
    """How a run ended: the last completed ``step``, its training loss, the last validation
    loss, the signal that interrupted it (None if it finished) and skipped non-finite updates."""

    run_dir: str
    step: int
    loss: float | None
    val_loss: float | None
    interrupted: int | None
    skipped: int


def finetune(
    out: str | os.PathLike,
    train: TrainConfig | None = None,
    *,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    allow_changed_base: bool = False,
) -> FinetuneResult:
    """Fine-tunes (or trains from scratch) into the run directory ``out``.

    One process at a time writes a run: a second one (new or resumed) on the same directory
    refuses at once, naming the first.

    Args:
        out: the run directory; created for a new run, read for ``resume``.
        train: the settings of a new run (``model`` or ``init``, ``data``, ...).
        resume: continue the run in ``out`` from its latest checkpoint with its recorded settings.
        overrides: for ``resume``, new values of :attr:`TrainConfig.RESUMABLE` fields (e.g. more
            ``steps``).
        cache_dir: where tokenized data is cached (default
        :func:`gpt2jax.train.data.default_cache_dir`). show_progress: progress bars on stderr.
        allow_changed_base: resume a LoRA run whose base model's weights changed since the run
            started (recording the new ones); refused otherwise.

    The loop never waits for the device just to log: it dispatches step ``k`` and then reads
    step ``k - 1``'s metrics, which are ready by then, so the device always has the next step
    queued; batches are prepared on a background thread
    (:class:`gpt2jax.train.batches.Prefetcher`).

    Every ``save_every`` steps, at the end, and on Ctrl-C / SIGTERM, the params, optimizer
    state, step, data position and RNG are checkpointed (asynchronously;
    :class:`gpt2jax.store.runs.Checkpoints`); a LoRA run checkpoints its adapters, and loads as
    the base model with them merged in. Because the batches and the dropout keys are pure
    functions of ``(seed, step)``, ``finetune(out, resume=True)`` continues exactly: N steps
    straight give bitwise the parameters of N/2 steps, a resume, and N/2 more (float32 on CPU;
    the tests check it).

    A NaN or infinite loss stops the run with :class:`NonFiniteLossError`, which names the step
    and the last good checkpoint (nothing is saved after the bad step); with ``skip_nonfinite``
    such updates are skipped instead and counted.
    """
    cluster.initialize()
    out = os.path.abspath(os.fspath(out))
    try:
        # one writer: the process that writes the run's files holds its lock
        with runs.writer_lock(out, resume, enabled=jax.process_index() == 0):
            result = _prepare(out, train, resume, overrides or {}, cache_dir, show_progress,
                              allow_changed_base).run()  # fmt: skip
    except BaseException:
        cluster.Watchdog.abandon()  # the other processes stop too (if any)
        raise
    cluster.Watchdog.finished()
    return result


def _prepare(
    out: str,
    train: TrainConfig | None,
    resume: bool,
    overrides: dict[str, Any],
    cache_dir: Any,
    show_progress: bool,
    allow_changed_base: bool = False,
) -> _Run:
    """The run, ready to loop: settings checked, data loaded, steps compiled, state on the
    devices (the starting weights' host copy is gone when this returns)."""
    if resume:
        config, train = _resumed_settings(out, overrides or {})
        fit_host_malloc(train)
        check_reporters(train.logging.report_to)
        tokenizer = Tokenizer.from_dir(out)
        params = None  # from the checkpoint, or the starting model if there is none yet
    else:
        if train is None:
            raise ConfigError("finetune needs a TrainConfig for a new run")
        train = _absolute_paths(train)
        train.validate()
        fit_host_malloc(train)  # before the starting weights are read
        check_reporters(train.logging.report_to)
        # Process 0 alone writes the run's own files (run.json, metrics, samples, plot).
        cluster.primary_first("check-new-run", lambda: runs.check_new_run(out, _inputs(train)))
        config, params, tokenizer, tokenizer_dir = _starting_model(train, allow_changed_base)
        # a LoRA run's base: fingerprinted once, so that a later change of it is noticed
        model, lora_rank = train.source.model, train.memory_settings.lora_rank
        base = base_record(model, params) if lora_rank and model else None
        train = _resolve_seq_len(train, config)
        train = _adafactor_lr(train, config, params)
        # recorded, so that a resume keeps the lr's horizon
        if train.schedule.schedule_steps is None:
            train = train.replace(schedule_steps=train.schedule.steps)
        # "auto" becomes this device's choice, recorded so that a resume computes the same way
        train = train.replace(
            compute_dtype=device.resolve_compute_dtype(train.memory_settings.compute_dtype),
            remat=device.resolve_remat(train.memory_settings.remat),
        )
    run = _Run(out, config, train, tokenizer, cache_dir, show_progress, allow_changed_base)
    if not resume:  # only once the data and settings have proved usable
        create = lambda: runs.create_run(out, config, train, tokenizer_dir, base=base)  # noqa: E731
        cluster.primary_first("create-run", create)  # the others wait for the directory
    run.start_state(params, resume)
    return run


def _absolute_paths(train: TrainConfig) -> TrainConfig:
    def absolute(p: str) -> str:
        # Globs stay globs; only their directory part is anchored.
        return os.path.abspath(os.path.expanduser(p))

    # A size name ("355M") is resolved to its download cache here, so run.json records a path.
    model = absolute(resolve_model(train.source.model)) if train.source.model is not None else None
    return train.replace(
        model=model,
        data=[absolute(p) for p in train.dataset.data],
        val_data=[absolute(p) for p in train.dataset.val_data],
    )


def _inputs(train: TrainConfig) -> tuple[str | None, ...]:
    """What a new run reads, which its directory must not lie in: the starting model, and the
    data's directories (a glob's fixed part), where the run's own text files would become
    training data."""
    folders = []
    for spec in [*train.dataset.data, *train.dataset.val_data]:
        while glob.has_magic(spec):
            spec = os.path.dirname(spec)
        folders.append(spec if os.path.isdir(spec) else None)
    return (train.source.model, *folders)


def _resolve_seq_len(train: TrainConfig, config: GPT2Config) -> TrainConfig:
    seq_len = train.dataset.seq_len or min(1024, config.n_ctx)
    if seq_len > config.n_ctx:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context of {config.n_ctx}")
    return train.replace(seq_len=seq_len)


def _adafactor_lr(train: TrainConfig, config: GPT2Config, params: Any) -> TrainConfig:
    """A new Adafactor run's own rate when ``--adafactor-lr`` was not given: ``--lr`` (AdamW's)
    divided by :func:`gpt2jax.train.optim.adafactor_scale` of the weights it starts training
    (with ``--init``, drawn here once to be measured), so that its steps are as large as
    AdamW's. Logged before training, and recorded in ``run.json`` for resuming."""
    m, u = train.memory_settings, train.update
    if m.optimizer != "adafactor" or u.adafactor_lr is not None:
        return train
    freeze = parse_freeze(m.freeze, config)
    if m.lora_rank:  # the adapters are what it trains (as the recipe draws them)
        trained = lora.init_lora(config, m.lora_rank, train.run.seed)
    else:
        trained = params if params is not None else init_params(config, train.run.seed)
    scale = adafactor_scale(
        trained,
        frozen=freeze.leaves if freeze else (),
        trainable_layers=freeze.trainable_layers if freeze else None,
    )
    del trained
    lr = u.lr / scale
    log.info(
        "adafactor: peak lr %.4g = --lr %.4g / %.4f, the RMS of the starting weights (its steps "
        "are lr x each matrix's RMS: this makes them as large as AdamW's at --lr; "
        "--adafactor-lr X sets it directly)", lr, u.lr, scale,
    )  # fmt: skip
    return train.replace(adafactor_lr=lr)


def _resumed_settings(out: str, overrides: dict[str, Any]) -> tuple[GPT2Config, TrainConfig]:
    config, train = runs.read_run(out)
    runs.check_writable(out)  # before the data and the compiler take their time
    fixed = sorted(k for k in overrides if k not in TrainConfig.RESUMABLE)
    if fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise ConfigError(
            f"{out}: {flags} cannot change when resuming (only "
            f"{', '.join('--' + k.replace('_', '-') for k in TrainConfig.RESUMABLE)} can)"
        )
    if train.schedule.schedule_steps is None:
        # A run.json from before schedule_steps existed: its lr decayed over the steps it
        # records, which more --steps must not stretch either.
        train = train.replace(schedule_steps=train.schedule.steps)
    if train.memory_settings.optimizer == "adafactor" and train.update.adafactor_lr is None:
        # A run.json from before adafactor_lr existed: Adafactor was given --lr as it was.
        train = train.replace(adafactor_lr=train.update.lr)
    if overrides:
        train = train.replace(**overrides)
        train.validate()
        _check_not_behind(out, train.schedule.steps)
        if jax.process_index() == 0:
            runs.write_run_json(out, config, train)
    return config, train


def _check_not_behind(out: str, steps: int) -> None:
    """``--steps`` below the step a run has reached would rewrite its record of a longer run."""
    try:
        reached = runs.latest_step(out)
    except Gpt2JaxError:
        return  # no checkpoint yet
    if steps < reached:
        raise ConfigError(
            f"{out}: the run is at step {reached} already; --steps {steps} would end it before "
            f"that (give --steps {reached} or more)"
        )


def _starting_model(
    train: TrainConfig, allow_changed_base: bool = False
) -> tuple[GPT2Config, Any, Tokenizer, str | None]:
    """``(config, params, tokenizer, tokenizer_dir)`` of the model the run starts from."""
    if train.source.init is not None:
        config = get_preset(train.source.init)
        return config, None, Tokenizer.default(), None  # params: drawn from the seed later
    source = describe(train.source.model)
    # FSDP shards the model over the devices from host memory: it may not fit on one device
    where = jax.devices("cpu")[0] if train.memory_settings.parallel == "fsdp" else None
    model = load(source, allow_changed_base=allow_changed_base, device=where)
    has_files = source.tokenizer is not None and source.tokenizer[0] == "encoder.json"
    return model.config, model.params, model.tokenizer, source.path if has_files else None


@contextmanager
def _stop_signals() -> Iterator[dict[str, int]]:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop; a second SIGINT
    interrupts at once. Yields a dict whose ``"signal"`` is set when one arrived."""
    flag: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _Run:
    """One session of a run: set up data, model, state and compiled steps, then loop."""

    def __init__(
        self,
        out: str,
        config: GPT2Config,
        train: TrainConfig,
        tokenizer: Tokenizer,
        cache_dir: Any,
        show_progress: bool,
        allow_changed_base: bool = False,
    ) -> None:
        self.out, self.config, self.train, self.tokenizer = out, config, train, tokenizer
        self.allow_changed_base = allow_changed_base
        if train.memory_settings.parallel == "fsdp":
            from gpt2jax.train.sharding import FSDP

            self.dp = FSDP()
        else:
            self.dp = DataParallel()
        self.primary = self.dp.process_index == 0
        self.show_progress = show_progress and self.primary
        self.per_device = self.dp.check_batch(train.dataset.batch_size, train.dataset.grad_accum)
        self._setup_data(cache_dir)
        self._setup_model()
        self.skipped = 0
        self.overflows = 0  # float16 updates the loss scaler skipped
        self.loss: float | None = None
        self.val_loss: float | None = None

    # -- setup ---------------------------------------------------------------------------------

    def _setup_data(self, cache_dir: Any) -> None:
        t = self.train
        data = load_tokens(
            t.dataset.data,
            self.tokenizer,
            column=t.dataset.column,
            field=t.dataset.field,
            cache_dir=cache_dir,
            show_progress=self.show_progress,
        )
        self.data_key = data.key
        if t.dataset.val_data:
            val = load_tokens(
                t.dataset.val_data,
                self.tokenizer,
                column=t.dataset.column,
                field=t.dataset.field,
                cache_dir=cache_dir,
                show_progress=self.show_progress,
            )
            train_tokens, val_tokens = data.tokens, val.tokens
            check_vocab(val.tokens, self.config.n_vocab, val.name)
        else:
            train_tokens, val_tokens = split_tail(data.tokens, t.dataset.val_fraction)
        check_vocab(data.tokens, self.config.n_vocab, data.name)
        try:
            self.sampler = WindowSampler(
                train_tokens, t.dataset.seq_len, t.dataset.batch_size, t.run.seed
            )
        except DataError as e:
            held = (
                f" after holding out --val-fraction {t.dataset.val_fraction}"
                if len(val_tokens)
                else ""
            )
            raise DataError(f"{data.name}: {e}{held}") from None
        windows, weights = eval_windows(val_tokens, t.dataset.seq_len)
        limit = (
            t.logging.eval_batches * self.per_device * self.dp.num_devices * self.dp.process_count
        )
        self.val_windows, self.val_weights = spread(windows, weights, limit)
        if len(val_tokens) < 2 and (t.dataset.val_data or t.dataset.val_fraction > 0):
            log.warning("no validation: only %d tokens were held out", len(val_tokens))
        log.info(
            "data: %s: %d tokens in %d document(s), %d for training (%.2f epochs of windows "
            "in %d steps), %d held out",
            data.name,
            len(data.tokens),
            data.n_documents,
            len(train_tokens),
            t.schedule.steps * t.dataset.batch_size / self.sampler.windows_per_epoch,
            t.schedule.steps,
            len(val_tokens),
        )

    def _setup_model(self) -> None:
        """Model, optimizer and loss from the run's memory settings
        (:mod:`gpt2jax.train.memory.build`)."""
        t, config = self.train, self.config
        horizon = t.schedule.schedule_steps or t.schedule.steps
        if t.schedule.steps > horizon and t.schedule.schedule != "constant":
            log.warning(
                "the %s lr schedule decays over %d updates and the run has %d: the lr is 0 "
                "after step %d (--schedule-steps N stretches the schedule)",
                t.schedule.schedule, horizon, t.schedule.steps, horizon,
            )  # fmt: skip
        self.schedule = learning_rate_schedule(
            t.peak_lr(), t.schedule.warmup, horizon, t.schedule.schedule
        )
        settings = t.memory_settings
        extra = None
        if settings.parallel == "fsdp":
            from gpt2jax.train.sharding import make_prepare

            extra = make_prepare(self.dp.mesh)

        def recipe(dropout: float):
            return build(
                dataclasses.replace(config, dropout=dropout), settings, self.schedule,
                weight_decay=t.update.weight_decay, clip=t.update.clip, extra_prepare=extra,
            )  # fmt: skip

        self.recipe, evaluation = recipe(t.update.dropout), recipe(0.0)
        ms = t.memory_settings
        self.loss_scaling = device.needs_loss_scaling(ms.compute_dtype)
        here = device.describe()
        huge = here.platform == "cpu" and huge_pages_on()
        log.info(
            "%s (%d x %s): computing in %s%s with %s parameters; attention %s; remat %s%s",
            here.platform, here.count, here.kind, ms.compute_dtype,
            " with dynamic loss scaling" if self.loss_scaling else "", ms.param_dtype,
            _attention_choice(t, self.recipe.model), self.recipe.model.remat,
            f"; {HUGE_PAGES_NOTE}" if huge else "",
        )  # fmt: skip
        self.eval_model, self.tx = evaluation.model, self.recipe.tx
        # One device in all: nothing to average, and the all-reduce would write the gradients
        # into a second full-size buffer (measured: +0.9 GB at 355M), so no collective at all.
        several = self.dp.num_devices * self.dp.process_count > 1
        axis = AXIS if settings.parallel == "data" and several else None
        step = make_train_step(
            self.recipe.model,
            self.tx,
            loss_fn=self.recipe.loss_fn,
            schedule=self.schedule,
            skip_nonfinite=t.update.skip_nonfinite,
            axis_name=axis,
            accumulate=self.recipe.accumulate,
        )
        self.p_train_step = self.dp.compile_train_step(step)
        eval_step = make_eval_step(self.eval_model, axis, loss_fn=evaluation.loss_fn)
        self.p_eval_step = self.dp.compile_eval_step(eval_step)
        # pmap over several processes takes only concrete arrays (it makes them global): there
        # the steps compile on their first call.
        if isinstance(self.dp, DataParallel) and self.dp.process_count == 1:
            self._compile_ahead()

    def _compile_ahead(self) -> None:
        """Compiles the step and the evaluation before the train state exists, so that the
        compiler's own memory never adds to the state's (what ``gpt2jax plan`` assumes)."""
        t, d, b = self.train, self.dp.num_devices, self.per_device
        trained, frozen = self.recipe.abstract_params()
        state = jax.eval_shape(
            lambda p, f: TrainState.create(p, self.tx, 0, frozen=f, loss_scale=self._scaler()),
            trained, frozen,
        )  # fmt: skip
        batch = jax.ShapeDtypeStruct((d, t.dataset.grad_accum, b, t.dataset.seq_len + 1), jnp.int32)
        self.p_train_step = self.p_train_step.lower(state, batch).compile()
        windows = jax.ShapeDtypeStruct((d, b, t.dataset.seq_len + 1), jnp.int32)
        weights = jax.ShapeDtypeStruct((d, b, t.dataset.seq_len), jnp.float32)
        params = (state.params, state.frozen)
        self.p_eval_step = self.p_eval_step.lower(params, windows, weights).compile()

    def start_state(self, params: Any, resume: bool) -> None:
        """Puts the train state on the devices: the latest checkpoint's when resuming (if there
        is one), else a fresh one from ``params`` (or the starting model's)."""
        shapes, _ = self.recipe.abstract_params()
        largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
        self.ckpts = runs.Checkpoints(
            self.out, self.train.logging.keep, largest_leaf=largest, primary=self.primary
        )
        self.start = self._restore() if resume else None
        self.last_saved = self.start
        if self.start is None:
            self.state = self._new_state(params)
            self.start = 0

    def _new_state(self, params: Any) -> TrainState:
        """The starting train state, built on the devices without a second copy of the model:
        host weights move to the devices one leaf at a time (each host leaf is released as it
        goes), and the state is made from them by a compiled function that consumes them."""
        t, recipe, tx = self.train, self.recipe, self.tx

        def create(params: Any) -> TrainState:
            trained, frozen = recipe.split(params, t.run.seed)
            return TrainState.create(trained, tx, t.run.seed, frozen=frozen,
                                     loss_scale=self._scaler())  # fmt: skip

        if params is None and t.source.init is not None:  # random weights, drawn on the devices
            return self.dp.init(lambda: create(init_params(self.config, t.run.seed)))
        if params is None:
            params = self._base_params()
        self.dp.to_devices(params)
        return self.dp.init(create, params, donate=True)

    def _base_params(self) -> Any:
        """The parameters the run started from (a LoRA run's base, checked against the
        fingerprint its run.json recorded)."""
        return run_base_params(
            self.out, self.train, self.config, allow_changed_base=self.allow_changed_base,
            update_record=self.primary,
        )  # fmt: skip

    def _restore(self) -> int | None:
        """Restores the newest checkpoint that restores onto the devices (a damaged newer one
        is reported and moved aside); its step, or None if there is none."""
        shapes, _ = self.recipe.abstract_params()
        opt_shapes = jax.eval_shape(self.tx.init, shapes)
        shapes, opt_shapes = self.dp.restore_target((shapes, opt_shapes))
        restored = self.ckpts.restore_newest(shapes, opt_shapes)
        if restored is None:
            return None
        step, params, opt_state, meta = restored
        params, opt_state = self.dp.from_checkpoint((params, opt_state))
        frozen = None
        # the base model is not checkpointed: it never changes
        if self.train.memory_settings.lora_rank:
            frozen = self.recipe.split(self._base_params(), 0)[1]
        if meta.get("data_key") != self.data_key:
            log.warning(
                "%s: the training data changed since step %d was saved; the run continues on "
                "the new data, so it is no longer an exact continuation", self.out, step,
            )  # fmt: skip
        state = TrainState(
            step=np.asarray(step, np.int32),
            params=params,
            opt_state=opt_state,
            rng=np.asarray(meta["rng"], np.uint32),
            frozen=frozen,
            loss_scale=self._scaler(meta.get("loss_scale")),
        )
        self.state = self.dp.init(lambda s: s, state, donate=True)
        log.info("resuming %s from step %d", self.out, step)
        return step

    def _scaler(self, saved: dict | None = None) -> LossScale | None:
        """float16's loss scale: a new one, or the one a checkpoint saved; None without."""
        if not self.loss_scaling:
            return None
        return LossScale.create(**saved) if saved else LossScale.create()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> FinetuneResult:
        t = self.train
        rows = self.dp.process_rows(
            t.dataset.batch_size, t.dataset.grad_accum
        )  # only this process's windows
        agreement = cluster.StopAgreement(t.schedule.steps)
        prefetch = Prefetcher(
            lambda s: self.dp.shard(self.sampler.batch(s, rows), t.dataset.grad_accum),
            self.start,
            t.schedule.steps,
        )
        metrics = MetricsLog(os.path.join(self.out, runs.METRICS), self.start, self.primary)
        resumed = self.start if self.start > 0 else None
        self.report = Reporters(t.logging.report_to, self.out, t.to_dict(), resumed, self.primary)
        if self.start >= t.schedule.steps:
            log.info("%s is at step %d of %d already; --steps N trains further", self.out,
                     self.start, t.schedule.steps)  # fmt: skip
        self.metrics = metrics
        self.tokens_per_step = t.dataset.batch_size * t.dataset.seq_len
        interrupted = None
        try:
            with (
                _stop_signals() as stop,
                progress_bar(
                    t.schedule.steps,
                    "finetune",
                    unit="step",
                    enabled=self.show_progress,
                    initial=self.start,
                ) as bar,
            ):
                self.bar = bar
                self.clock = time.perf_counter()
                self.started = self.clock
                pending = None
                done = self.start
                for step in range(self.start, t.schedule.steps):
                    batch = prefetch.next()
                    self.state, step_metrics = self.p_train_step(self.state, batch)
                    done = step + 1
                    # Every process stops after the same update (before any collective below)
                    signum = agreement.after(done, stop.get("signal"))
                    if pending is not None:
                        self._record(*pending)
                    pending = (step + 1, step_metrics)
                    last = done == t.schedule.steps
                    stopping = signum is not None
                    due = (
                        _due(done, t.logging.eval_every) and len(self.val_windows),
                        _due(done, t.logging.sample_every) or (last and t.logging.sample_every > 0),
                        _due(done, t.logging.save_every) or last or stopping,
                    )
                    if any(due) or last:
                        self._record(*pending)
                        pending = None
                    if due[0] or (last and len(self.val_windows)):
                        self._evaluate(done)
                    if due[1]:
                        self._sample(done)
                    if due[2]:
                        self._save(done)
                    if stopping:
                        interrupted = signum
                        log.info(
                            "%s at step %d: checkpoint saved; continue with "
                            "gpt2jax finetune --resume %s",
                            signal.Signals(interrupted).name, done, self.out,
                        )  # fmt: skip
                        break
                if pending is not None:
                    self._record(*pending)
            self.ckpts.wait()
            self.state = None  # saved: what follows (the loss plot) needs none of it
        finally:
            prefetch.close()
            metrics.close()
            self.report.close()
            self.ckpts.close()
        if self.primary and plot_losses(metrics.path, os.path.join(self.out, runs.PLOT)):
            log.info("loss curve: %s", os.path.join(self.out, runs.PLOT))
        if self.skipped:
            log.warning("%d update(s) with a non-finite loss were skipped", self.skipped)
        if self.overflows:
            log.info("%d update(s) skipped by the float16 loss scaler (gradient overflow, "
                     "the scale lowered)", self.overflows)  # fmt: skip
        return FinetuneResult(self.out, done, self.loss, self.val_loss, interrupted, self.skipped)

    def _record(self, step: int, step_metrics: dict[str, jax.Array]) -> None:
        """Logs the metrics of update ``step`` (waits for it); stops on a non-finite loss."""
        # Data parallel and FSDP may hand metrics back with a leading device axis; they are
        # averaged over devices already, so every entry is the same.
        m = jax.tree.map(lambda x: np.asarray(x).reshape(-1)[0], jax.device_get(step_metrics))
        now = time.perf_counter()
        elapsed, self.clock = now - self.clock, now
        loss = float(m["loss"])
        record = {
            "step": step,
            "loss": loss,
            "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]),
            "tokens": step * self.tokens_per_step,
            "tokens_per_s": round(self.tokens_per_step / max(elapsed, 1e-9), 1),
            "elapsed": round(now - self.started, 3),
        }
        finite = bool(m["finite"])
        if "loss_scale" in m:
            record["loss_scale"] = float(m["loss_scale"])
        if bool(m.get("overflow", False)) and finite:  # skipped by the loss scaler
            self.overflows += 1
            record["skipped"] = True
        if finite:
            self.loss = loss
        elif self.train.update.skip_nonfinite:
            self.skipped += 1
            record["skipped"] = True
        self.metrics.write(record)  # a non-finite loss is logged as null
        self.report.write(record)
        if not finite and not self.train.update.skip_nonfinite:
            raise NonFiniteLossError(step, loss, self.last_saved, self.out, record["grad_norm"])
        postfix = {"loss": f"{loss:.4f}", "lr": f"{record['lr']:.2e}"}
        if self.val_loss is not None:
            postfix["val"] = f"{self.val_loss:.4f}"
        postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def _evaluate(self, step: int) -> None:
        loss, count = self.dp.evaluate(
            self.p_eval_step, (self.state.params, self.state.frozen), self.val_windows,
            self.val_weights, self.per_device,
        )  # fmt: skip
        self.val_loss = loss
        ppl = math.exp(min(loss, 700.0))
        record = {"step": step, "val_loss": loss, "val_ppl": ppl, "val_tokens": count}
        self.metrics.write(record)
        self.report.write(record)
        log.info(
            "step %d: validation loss %.4f, perplexity %.2f (%d tokens)", step, loss, ppl, count
        )

    def _sample(self, step: int) -> None:
        from gpt2jax.generation.host import generate

        t = self.train
        # The state's own arrays on one process (read only; sampling ends before the next step
        # donates them); with several, process 0 samples alone (see sample_params).
        params = self.dp.sample_params((self.state.params, self.state.frozen))
        if params is None:
            return
        model = Pretrained(
            config=self.config,
            params=self.recipe.merged(*params),
            tokenizer=self.tokenizer,
            path=self.out,
            kind="run",
            compute_dtype=self.eval_model.dtype,
            attention=t.memory_settings.attention,
        )
        text = generate(
            model,
            t.logging.sample_prompt or None,
            max_new_tokens=min(t.logging.sample_length, self.config.n_ctx),
            top_k=SAMPLE_TOP_K,
            seed=t.run.seed + step,
            truncate_prompt=True,
            include_prompt=True,
        )[0].text
        if self.primary:
            banner = f"======== sample at step {step} ========"
            path = os.path.join(self.out, runs.SAMPLES)
            try:
                with open(path, "a") as f:
                    f.write(f"{banner}\n{text}\n\n")
            except OSError as e:
                raise Gpt2JaxError(f"{path}: cannot write ({e.strerror})") from None
            self.bar.write(f"{banner}\n{text}\n")
            self.report.sample(step, text)

    def _save(self, step: int) -> None:
        if self.last_saved == step:
            return
        # Not the frozen part (LoRA's base model): it is the starting model's, never changed.
        tree = (self.state.params, self.state.opt_state)
        # The save must not read arrays the next step donates. On the CPU the "host copy" orbax
        # takes is a view of the same memory, so the save completes before training goes on;
        # elsewhere the arrays are copied to host memory (not device memory) and saved in the
        # background.
        # With several processes the arrays go to orbax as they are (global arrays: orbax copies
        # them to host memory before save returns, and each process writes its own shards).
        on_cpu = jax.default_backend() == "cpu"
        several = self.dp.process_count > 1
        if on_cpu or several:
            params, opt_state = self.dp.checkpoint_view(tree)
        else:
            params, opt_state = jax.device_get(tree)
        scaler = self.state.loss_scale  # replicated: this process's first copy
        if scaler is not None:
            scaler = jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), scaler)
        meta = {
            "step": step,
            "rng": np.asarray(self.state.rng.addressable_shards[0].data).tolist(),
            "loss_scale": None if scaler is None else scaler.to_json(),
            "data": self.sampler.state(step),
            "data_key": self.data_key,
            "loss": self.loss,
            "val_loss": self.val_loss,
        }
        self.ckpts.save(step, params, opt_state, meta)
        if on_cpu:
            self.ckpts.wait()
        self.last_saved = step


def _attention_choice(train: TrainConfig, model: Any) -> str:
    """What the attention setting means for this run's training step (``gpt2jax.attention``)."""
    from gpt2jax.attention import choose

    name, seq_len = train.memory_settings.attention, train.dataset.seq_len
    chosen = choose(
        name, dtype=model.dtype, queries=seq_len, keys=seq_len, causal_only=True, cached=False,
        dropout=train.update.dropout > 0,
    )  # fmt: skip
    return chosen if name == chosen else f"{name}: {chosen}"


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def fit_host_malloc(train: TrainConfig) -> None:
    """A run planned to a memory budget (``--memory``) gives freed buffers back to the system
    (:func:`gpt2jax.host_malloc.return_freed_memory`; the whole-run figures of BENCHMARKS.md
    and the planner's margins were measured so). Any other run keeps glibc's adaptive
    defaults, which keep freed step buffers for reuse instead of faulting new ones in each
    step (the difference is measured in BENCHMARKS.md)."""
    if train.plan.memory is not None and jax.default_backend() == "cpu":
        return_freed_memory()
