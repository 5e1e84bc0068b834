"""``gpt2jax plan`` and ``finetune --memory``: the fastest settings whose training step fits.

Each candidate's real training step (:mod:`gpt2jax.train.memory.build`) is compiled on abstract
shapes, with nothing allocated, and XLA's buffer assignment gives its peak (:func:`peak_bytes`).
:func:`search` tries the settings that cost speed but not the maths (remat, optimizer state,
micro-batches, chunked loss) in order of expected step time (:func:`expected_cost`); settings
that change what is learned are the user's. Each settings' step is built once, and a candidate
that a compiled one already rules out is not compiled (:func:`_decide`).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt2jax.config import GPT2Config
from gpt2jax.device import needs_loss_scaling, resolve_compute_dtype, resolve_remat
from gpt2jax.errors import ConfigError
from gpt2jax.loss_scale import LossScale
from gpt2jax.train.memory.build import build
from gpt2jax.train.settings import MemorySettings

GiB = 2**30
LOSS_CHUNK = 128  # positions per chunk when the planner chunks the loss
REMAT_COST = {"none": 1.0, "dots": 1.15, "block": 1.35}
STATE_COST = {
    ("adamw", "float32"): 1.0,
    ("adamw", "bfloat16"): 1.01,
    ("adafactor", "float32"): 1.02,
}
SGD_COST = {("sgd", "float32"): 1.0, ("sgd", "bfloat16"): 1.01}
#: FSDP gathers every layer's weights in the forward and backward passes and reduce-scatters the
#: gradients: more traffic than data parallelism's one all-reduce (a rough guess, not measured)
PARALLEL_COST = {"data": 1.0, "fsdp": 1.1}
TOKENS_TO_FILL = 2048  # micro-batch tokens per device below which a device idles noticeably


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One configuration: memory settings plus how the global batch is split."""

    settings: MemorySettings
    batch_size: int  # windows per update, all devices
    grad_accum: int  # micro-batches per update

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def state_name(self) -> str:
        s = self.settings
        return s.optimizer + (" bf16-state" if s.opt_state_dtype == "bfloat16" else "")

    def describe(self) -> str:
        s = self.settings
        state = self.state_name()
        loss = f"loss-chunk {s.loss_chunk}" if s.loss_chunk else "plain loss"
        split = f"batch {self.micro_batch}x{self.grad_accum}"
        fsdp = " fsdp" if s.parallel == "fsdp" else ""
        return f"remat {s.remat:<5} {state:<16} {split:<10} {loss}{fsdp}"


@dataclasses.dataclass
class Row:
    """A candidate and what the planner found out about it."""

    candidate: Candidate
    peak: int | None  # predicted whole-run bytes (per device), None when not compiled
    fits: bool
    why: str
    approximate: tuple[str, ...] = ()  # what the planner changed that changes the maths
    step: int | None = None  # the compiled step's predicted bytes, None when not compiled


def approximations(c: Candidate, base: MemorySettings) -> tuple[str, ...]:
    """What the planner changed in ``base`` (the settings given) that computes something other
    than the given settings do: another optimizer, bfloat16 optimizer state. Remat, chunked loss
    and micro-batches are exact (same numbers up to float rounding)."""
    s, out = c.settings, []
    if s.optimizer != base.optimizer:
        lr = " at --lr / the RMS of the starting weights" if s.optimizer == "adafactor" else ""
        out.append(f"{s.optimizer}{lr} instead of {base.optimizer}")
    if s.opt_state_dtype != base.opt_state_dtype:
        out.append(f"{s.opt_state_dtype} optimizer state instead of {base.opt_state_dtype}")
    return tuple(out)


def approximate_settings(s: MemorySettings) -> list[str]:
    """Every setting of ``s`` whose numbers differ from float32 AdamW training of the whole
    model (the reference; BENCHMARKS.md measures how much)."""
    out = []
    if s.optimizer != "adamw":
        out.append(f"optimizer {s.optimizer}")
    dtypes = {
        "compute_dtype": resolve_compute_dtype(s.compute_dtype),  # "auto": this device's
        "param_dtype": s.param_dtype,
        "opt_state_dtype": s.opt_state_dtype,
    }
    for name, dtype in dtypes.items():
        if dtype != "float32":
            out.append(f"{name.replace('_', '-')} {dtype}")
    if s.lora_rank:
        out.append(f"lora-rank {s.lora_rank}")
    if s.freeze:
        out.append(f"freeze {s.freeze}")
    return out


def parse_memory(text: str) -> int:
    """Bytes of a budget like ``16GB`` (16 x 10^9), ``15GiB`` (15 x 2^30) or ``800MB``: SI
    units are decimal, ``KiB``/``MiB``/``GiB``/``TiB`` binary; a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])(i?)B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--memory {text!r} is not a size like 16GB, 15.5GiB or 800MB")
    unit, binary = (m.group(2) or "").upper(), bool(m.group(3))
    power = "_KMGT".index(unit or "_")
    value = float(m.group(1)) * (1024 if binary else 1000) ** power
    if not value > 0 or not np.isfinite(value):
        raise ConfigError(f"--memory must be a positive size, got {text!r}")
    return int(value)


def resolve_memory(text: str) -> tuple[int, str]:
    """``(bytes, how it was read)`` of ``--memory``: a size (:func:`parse_memory`), or ``auto``:
    the first device's ``bytes_limit`` where the backend reports one (GPUs, TPUs), else the
    machine's physical memory (the CPU backend)."""
    if text.strip().lower() != "auto":
        n = parse_memory(text)
        return n, f"{text.strip()} = {format_bytes(n)}"
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        n = int(stats["bytes_limit"])
        return n, f"auto = {format_bytes(n)} ({device.device_kind}'s bytes_limit)"
    import os

    n = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return n, f"auto = {format_bytes(n)} (this machine's physical memory)"


def format_bytes(n: float) -> str:
    """``n`` bytes in both units, e.g. ``16.00 GB (14.90 GiB)``."""
    return f"{n / 1e9:.2f} GB ({n / GiB:.2f} GiB)"


def usable_bytes(budget: int) -> int:
    """What a candidate's predicted peak may use of ``budget``: all but 1/16 (>= 256 MiB) left
    for the runtime and fragmentation."""
    return max(0, budget - max(budget // 16, 256 * 2**20))


def expected_cost(c: Candidate, seq_len: int, n_devices: int) -> float:
    """Relative time per token (lower is faster), a rough model.

    Block remat recomputes the forward pass (+35%), dots-saveable remat less (+15%); small
    micro-batches use a device less well (below :data:`TOKENS_TO_FILL` tokens per device);
    chunking the loss costs one more LM-head matmul (+2%); Adafactor's and bfloat16 state's
    extra arithmetic +1-2% (:data:`REMAT_COST`, :data:`STATE_COST`, :data:`SGD_COST`).
    """
    s = c.settings
    tokens = c.micro_batch * seq_len / n_devices  # per device per micro-batch
    fill = 1.0 + TOKENS_TO_FILL / (TOKENS_TO_FILL + 4 * tokens)
    state = {**STATE_COST, **SGD_COST}[(s.optimizer, s.opt_state_dtype)]
    cost = REMAT_COST[s.remat] * state * fill * PARALLEL_COST[s.parallel]
    return cost * (1.02 if s.loss_chunk else 1.0)


#: The settings the search varies (any of them can be fixed by the user; ``parallel`` is
#: searched when the planner can plan both, :class:`EitherParallel`).
SEARCHED = ("remat", "optimizer", "opt_state_dtype", "loss_chunk", "grad_accum", "parallel")


def candidates(
    base: MemorySettings,
    batch_size: int,
    n_devices: int,
    fixed: Collection[str] = (),
    grad_accum: int = 1,
    seq_len: int = 1024,
    parallels: Collection[str] = (),
) -> list[Candidate]:
    """Every configuration the search may try. Settings named in ``fixed`` keep ``base``'s value
    (``grad_accum``'s is the argument). The loss is chunked only for sequences longer than a
    chunk. ``parallels``: the modes to try besides ``base.parallel`` (unless fixed)."""
    states = list(SGD_COST) if base.optimizer == "sgd" else list(STATE_COST)
    if base.lora_rank and "optimizer" not in fixed:
        # LoRA's optimizer state is small already, and Adafactor's steps on its zero-initialised
        # B matrices are lr x 1e-3 (its floor on a matrix's RMS): they would hardly move.
        states = [(o, d) for o, d in states if o != "adafactor"]
    if "optimizer" in fixed:
        states = [(o, d) for o, d in states if o == base.optimizer]
    if "opt_state_dtype" in fixed:
        states = [(o, d) for o, d in states if d == base.opt_state_dtype]
    if not states:
        raise ConfigError(f"--opt-state-dtype {base.opt_state_dtype} does not apply to adafactor")
    remats = [resolve_remat(base.remat)] if "remat" in fixed else list(REMAT_COST)
    chunks = [0, LOSS_CHUNK] if seq_len > LOSS_CHUNK else [0]
    if "loss_chunk" in fixed:
        chunks = [base.loss_chunk]
    splits = [a for a in range(1, batch_size + 1) if batch_size % (a * n_devices) == 0]
    if "grad_accum" in fixed:
        splits = [a for a in splits if a == grad_accum]
    if not splits:
        raise ConfigError(
            f"--batch-size {batch_size} does not split over {n_devices} device(s)"
            + (f" and --grad-accum {grad_accum}" if "grad_accum" in fixed else "")
        )
    modes = [base.parallel]
    if "parallel" not in fixed:
        modes += [p for p in parallels if p != base.parallel]
    return [
        Candidate(
            dataclasses.replace(
                base, remat=r, optimizer=o, opt_state_dtype=d, loss_chunk=ch, parallel=p
            ),
            batch_size,
            a,
        )
        for r in remats
        for o, d in states
        for a in splits
        for ch in chunks
        for p in modes
    ]


def _memory_rank(c: Candidate) -> tuple:
    """Per respect, how much memory a candidate needs (higher: at least as much)."""
    s = c.settings
    order = [("adafactor", "float32"), ("sgd", "bfloat16"), ("sgd", "float32")]
    order += [("adamw", "bfloat16"), ("adamw", "float32")]
    return (
        -list(REMAT_COST).index(s.remat),
        order.index((s.optimizer, s.opt_state_dtype)),
        c.micro_batch,
        c.grad_accum > 1,
        -bool(s.loss_chunk),
        s.parallel == "data",  # a whole copy of the state on every device
    )


def _needs_at_least(a: Candidate, b: Candidate) -> bool:
    return all(x >= y for x, y in zip(_memory_rank(a), _memory_rank(b), strict=True))


class Planner:
    """Compiles candidates of one model and sequence length and predicts their peaks.

    ``fsdp``: an :class:`gpt2jax.train.sharding.FSDP` to predict per-device peaks of the sharded
    step (``settings.parallel == "fsdp"``); otherwise one device's share of a data-parallel step
    over
    ``n_devices`` devices.
    """

    def __init__(
        self,
        config: GPT2Config,
        seq_len: int,
        *,
        weight_decay: float = 0.01,
        clip: float = 1.0,
        n_devices: int = 1,
        fsdp: Any = None,
        sample_length: int = 64,
        runtime: int | None = None,
    ) -> None:
        if not 1 <= seq_len <= config.n_ctx:
            raise ConfigError(f"--seq-len must be in [1, {config.n_ctx}], got {seq_len}")
        self.config, self.seq_len = config, seq_len
        self.weight_decay, self.clip = weight_decay, clip
        self.fsdp = fsdp
        self.n_devices = fsdp.num_devices if fsdp is not None else n_devices
        self.sample_length = sample_length
        self._runtime = runtime
        self._eval_temp: dict[tuple, int] = {}
        self._built: dict[MemorySettings, tuple[Callable, Any]] = {}

    @property
    def parallels(self) -> tuple[str, ...]:
        """The parallel mode this planner plans (:class:`EitherParallel` plans both)."""
        return ("fsdp",) if self.fsdp is not None else ("data",)

    @property
    def runtime(self) -> int:
        """The process's own share of the budget (:func:`runtime_bytes`), measured once the
        compiler has run (its code stays resident), unless given."""
        return runtime_bytes() if self._runtime is None else self._runtime

    def _step(self, c: Candidate) -> tuple[Callable, Any, Any]:
        """``(jitted step, abstract state, abstract batch)`` of a candidate. The step and the
        state depend on the settings only, and are built once per settings (tracing the
        optimizer's init for the state's shapes is most of the cost)."""
        if c.settings not in self._built:
            self._built[c.settings] = self._build(c.settings)
        step, state = self._built[c.settings]
        T1 = self.seq_len + 1
        if self.fsdp is not None:
            batch = jax.ShapeDtypeStruct(
                (c.grad_accum, c.micro_batch, T1), jnp.int32, sharding=self.fsdp.batch_sharding
            )
            return step, state, batch
        per_device = c.micro_batch // self.n_devices
        return step, state, jax.ShapeDtypeStruct((c.grad_accum, per_device, T1), jnp.int32)

    def _build(self, settings: MemorySettings) -> tuple[Callable, Any]:
        """``(jitted step, abstract state)`` of ``settings`` (FSDP: sharded)."""
        from gpt2jax.train.sharding import make_prepare
        from gpt2jax.train.step import TrainState, make_train_step

        extra = make_prepare(self.fsdp.mesh) if self.fsdp is not None else None
        schedule = optax.constant_schedule(1e-4)
        recipe = build(
            self.config, settings, schedule, weight_decay=self.weight_decay, clip=self.clip,
            extra_prepare=extra,
        )  # fmt: skip
        step = make_train_step(
            recipe.model, recipe.tx, loss_fn=recipe.loss_fn, schedule=schedule,
            accumulate=recipe.accumulate,
        )  # fmt: skip
        trained, frozen = recipe.abstract_params()
        scaling = needs_loss_scaling(resolve_compute_dtype(settings.compute_dtype))
        state = jax.eval_shape(
            lambda p, f: TrainState.create(
                p, recipe.tx, 0, frozen=f, loss_scale=LossScale.create() if scaling else None
            ),
            trained, frozen,
        )  # fmt: skip
        if self.fsdp is not None:
            return self.fsdp.compile_train_step(step, state), self.fsdp.abstract(state)
        return jax.jit(step, donate_argnums=(0,)), state

    def state_bytes(self, c: Candidate) -> int:
        """Parameters, optimizer state and gradients (twice with accumulation), per device: a
        lower bound of the peak, known without compiling."""
        _, state, _ = self._step(c)
        total = _bytes(state, self.fsdp)
        grads = _bytes(state.params, self.fsdp)
        summed = c.grad_accum > 1 and not in_place_accumulation(c.settings)
        return total + grads * (2 if summed else 1)

    def compile(self, c: Candidate) -> tuple[Any, float]:
        """``(compiled step, seconds it took)``, from abstract inputs (nothing allocated)."""
        step, state, batch = self._step(c)
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        return compiled, time.perf_counter() - start

    def predict(self, c: Candidate) -> tuple[int, dict[str, float]]:
        """``(peak bytes, details)`` from the compiled step's memory analysis."""
        compiled, seconds = self.compile(c)
        return peak_bytes(compiled), {**memory_details(compiled), "compile_s": seconds}

    def whole_run(self, c: Candidate) -> tuple[int, dict[str, int]]:
        """``(peak bytes, parts)`` of a whole ``finetune`` run of ``c``, per device: the runtime
        (on the CPU the process's own resident memory, measured when the planner was made), plus
        the largest of what is alive at once during a step (compiled), an evaluation (the train
        state plus the compiled evaluation's temporaries) and a sample (the train state plus the
        decoding cache and logits) and a save (the state plus what the checkpoint writer holds
        while writing). Start-up adds no copy of the state (:mod:`gpt2jax.train.loop`)."""
        step, details = self.predict(c)
        _, state, _ = self._step(c)
        state_bytes = _bytes(state, self.fsdp)
        if self._runtime is None:  # now that the compiler has run
            self._runtime = runtime_bytes()
        # A save on the CPU: orbax / TensorStore hold copies and compressed chunks of what they
        # write until the save is done, whatever save_concurrent_gb says: measured 0.9x the
        # state at 67M (scripts/bench_save.py, BENCHMARKS.md), counted as 1x. On an accelerator
        # the state is copied to host memory, which the budget does not cover.
        writing = state_bytes if jax.default_backend() == "cpu" else 0
        if self.fsdp is None and self.n_devices > 1:  # the all-reduce's copy of the gradients
            step += _bytes(state.params, None)
        parts = {
            "runtime": self._runtime,
            "step": step,
            "eval": state_bytes + self.eval_temporaries(c),
            "sample": state_bytes + self.sample_bytes(c),
            "save": state_bytes + writing,
            "state": state_bytes,
            **{k: int(v) for k, v in details.items() if k != "compile_s"},
        }
        phases = ("step", "eval", "sample", "save")
        return self._runtime + max(parts[k] for k in phases), parts

    def eval_temporaries(self, c: Candidate) -> int:
        """Temporaries of the compiled evaluation step (the run evaluates ``micro_batch`` windows
        per call, spread over the devices)."""
        from gpt2jax.train.step import make_eval_step

        s = c.settings
        key = (c.micro_batch, s.loss_chunk, s.compute_dtype, s.param_dtype, s.lora_rank,
               s.attention)  # fmt: skip
        if key not in self._eval_temp:
            recipe = build(self.config, s, optax.constant_schedule(1e-4))
            params = recipe.abstract_params()
            rows = max(1, c.micro_batch // self.n_devices)
            windows = jax.ShapeDtypeStruct((rows, self.seq_len + 1), jnp.int32)
            weights = jax.ShapeDtypeStruct((rows, self.seq_len), jnp.float32)
            step = make_eval_step(recipe.model, None, loss_fn=recipe.loss_fn)
            if self.fsdp is not None:  # global arrays: every device's rows
                windows, weights = (
                    jax.ShapeDtypeStruct((rows * self.n_devices, *x.shape[1:]), x.dtype)
                    for x in (windows, weights)
                )
                params = self.fsdp.abstract(params)
                compiled = self.fsdp.compile_eval_step(step).lower(params, windows, weights)
            else:
                compiled = jax.jit(step).lower(params, windows, weights)
            m = compiled.compile().memory_analysis()
            self._eval_temp[key] = int(m.temp_size_in_bytes + m.output_size_in_bytes)
        return self._eval_temp[key]

    def sample_bytes(self, c: Candidate) -> int:
        """What sampling adds to the state (an estimate from shapes, prompts up to 64 tokens):
        the float32 KV cache, the prompt's logits, and on accelerators one layer's weights
        sliced at a time (on the CPU the sampler reads the state's own buffers)."""
        from gpt2jax.generation.host import cache_bucket, prompt_bucket

        cfg = self.config
        prompt = prompt_bucket(64, cfg.n_ctx)
        slots = min(cache_bucket(prompt + self.sample_length), cfg.n_ctx + 64)
        rows = 2  # the sampler decodes 16-bit weights two rows at a time on the CPU
        cache = 2 * cfg.n_layer * rows * slots * cfg.n_embd * 4
        logits = rows * prompt * cfg.n_vocab * 4 * 2  # logits and their softmax
        layer = 0 if jax.default_backend() == "cpu" else 12 * cfg.n_embd**2 * 4
        return cache + logits + layer + rows * prompt * 4 * cfg.n_embd * 4 * 4


class EitherParallel:
    """Plans data parallelism and FSDP over the same devices, each candidate by its own
    ``settings.parallel``: with more than one device the search tries both (FSDP costs more
    traffic, so it is chosen when data parallelism does not fit exactly)."""

    parallels = ("data", "fsdp")

    def __init__(self, data: Planner, fsdp: Planner) -> None:
        self._planners = {"data": data, "fsdp": fsdp}
        self.n_devices, self.seq_len = data.n_devices, data.seq_len

    @property
    def runtime(self) -> int:
        return self._planners["data"].runtime

    def state_bytes(self, c: Candidate) -> int:
        return self._planners[c.settings.parallel].state_bytes(c)

    def whole_run(self, c: Candidate) -> tuple[int, dict[str, int]]:
        return self._planners[c.settings.parallel].whole_run(c)


def runtime_bytes() -> int:
    """What the process itself occupies in the memory the budget covers: on the CPU its
    resident memory now (Python, JAX and the compiler, the libraries a run loads); on an
    accelerator nothing (the budget's reserve covers the runtime's buffers there)."""
    if jax.default_backend() != "cpu":
        return 0
    import orbax.checkpoint  # noqa: F401  (resident during a run: its share counts)

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def in_place_accumulation(s: MemorySettings) -> bool:
    """Whether micro-batch gradients go into one buffer layer by layer
    (:mod:`gpt2jax.train.memory.build` decides the same way: full-model training with block remat,
    data parallel)."""
    return s.remat == "block" and not s.lora_rank and s.freeze is None and s.parallel == "data"


def peak_bytes(compiled: Any) -> int:
    """``arguments + outputs + temporaries - aliased`` of a compiled function.

    The training step is lowered and compiled on abstract inputs (``jax.ShapeDtypeStruct`` for
    the train state and the batch: nothing is allocated), and ``compiled.memory_analysis()``
    reads back XLA's buffer assignment: the bytes of the arguments (train state and batch), the
    outputs (new state, metrics), the temporaries (every intermediate: gradients, activations,
    the optimizer's scratch, all placed by XLA's heap simulator with reuse) and the aliased
    bytes (outputs written into donated argument buffers). The state is donated, so the new
    state costs nothing beyond the old one. Under FSDP the figures are per device. Not
    included: the runtime's own buffers and fragmentation, hence a budget's reserve
    (:func:`usable_bytes`). The tests check the prediction against the measured peak RSS of a
    real step on CPU (:mod:`gpt2jax.train.memory.probe`).
    """
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def memory_details(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
    }


def _bytes(tree: Any, fsdp: Any) -> int:
    """Bytes of an abstract tree per device (sharded leaves split ``n`` ways under FSDP)."""
    shardings = fsdp.shardings(tree) if fsdp is not None else None
    total = 0
    leaves = jax.tree.leaves(tree)
    specs = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
    for x, sh in zip(leaves, specs, strict=True):
        n = int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
        if sh is not None and any(a is not None for a in sh.spec):
            n //= fsdp.num_devices
        total += n
    return total


def search(
    planner: Planner,
    base: MemorySettings,
    budget: int,
    batch_size: int,
    *,
    batch_given: bool = True,
    fixed: Collection[str] = (),
    grad_accum: int = 1,
    show: Callable[[Row], None] | None = None,
) -> tuple[Candidate | None, list[Row]]:
    """The fastest candidate whose predicted peak fits ``usable_bytes(budget)``, and every row
    considered on the way (``show`` is called with each as it is decided). ``fixed`` names
    settings of :data:`SEARCHED` the user chose (see :func:`candidates`).

    Candidates vary what costs speed but not the maths: rematerialisation, the optimizer's
    state (AdamW float32, AdamW bfloat16 moments, Adafactor; or SGD float32/bfloat16 when
    ``--optimizer sgd`` is given), the split of the batch into micro-batches, and the chunked
    loss. The leanest candidates are compiled first (if they do not fit, nothing at that batch
    size does); then the rest in order of :func:`expected_cost`, and the first that fits wins.
    Candidates are skipped without compiling when their parameters, optimizer state and
    gradients alone exceed the budget, or when a candidate needing no more memory in any
    respect already did not fit. Settings that change what is learned (batch size, parameter
    dtype, LoRA, freezing) are the user's; only when no ``--batch-size`` was given
    (``batch_given=False``) and nothing fits at the default is the batch halved.
    """
    limit = usable_bytes(budget)
    rows: list[Row] = []
    for size in _batch_sizes(batch_size, batch_given, planner.n_devices):
        failed: list[Row] = []
        # Exact candidates first (approximations only when nothing exact fits), then by speed.
        found = candidates(
            base, size, planner.n_devices, fixed, grad_accum, planner.seq_len, planner.parallels
        )
        order = sorted(
            found,
            key=lambda c: (
                len(approximations(c, base)),
                expected_cost(c, planner.seq_len, planner.n_devices),
            ),
        )
        # The leanest candidates first (with and without accumulation: neither needs less
        # memory in every respect): when they do not fit, nothing at this batch size does.
        groups = ([c for c in order if c.grad_accum == 1], [c for c in order if c.grad_accum > 1])
        leanest = [min(g, key=_memory_rank) for g in groups if g]
        decided: dict[Candidate, Row] = {}
        for c in leanest:
            decided[c] = row = _decide(planner, c, limit, failed, base)
            _record(rows, row, show)
            if not row.fits:
                failed.append(row)
        if not any(decided[c].fits for c in leanest):
            continue
        for c in order:
            row = decided.get(c) or _decide(planner, c, limit, failed, base)
            if row is None:
                continue
            if c not in decided:
                _record(rows, row, show)
            if row.fits:
                return c, rows
            failed.append(row)
    return None, rows


def _record(rows: list[Row], row: Row, show: Callable[[Row], None] | None) -> None:
    rows.append(row)
    if show is not None:
        show(row)


def _batch_sizes(batch_size: int, given: bool, n_devices: int) -> Iterator[int]:
    yield batch_size
    if not given:
        size = batch_size // 2
        while size >= n_devices and size % n_devices == 0:
            yield size
            size //= 2


def _decide(
    planner: Planner, c: Candidate, limit: int, failed: list[Row], base: MemorySettings
) -> Row | None:
    """A row for ``c``, or None when it is implied by a candidate that already did not fit."""
    if any(_needs_at_least(c, f.candidate) for f in failed):
        return None
    approx = approximations(c, base)
    state = planner.state_bytes(c)
    floor = state + planner.runtime
    if floor > limit:
        why = f"runtime + state + gradients alone need {format_bytes(floor)}"
        return Row(c, None, False, why, approx)
    bound = _step_floor(planner, c, state, failed)
    if bound is not None and planner.runtime + bound[0] > limit + limit // 10:
        why = (
            f"its step needs at least {bound[0] / GiB:.2f} GiB (that of "
            f"{bound[1].state_name()} less the state it saves), not compiled"
        )
        return Row(c, None, False, why, approx)
    peak, d = planner.whole_run(c)
    parts = (
        f"runtime {d['runtime'] / GiB:.2f} + max(step {d['step'] / GiB:.2f}, eval "
        f"{d['eval'] / GiB:.2f}, sample {d['sample'] / GiB:.2f}, save {d['save'] / GiB:.2f}) GiB"
    )
    return Row(c, peak, peak <= limit, parts, approx, step=d["step"])


def _step_floor(
    planner: Planner, c: Candidate, state: int, failed: list[Row]
) -> tuple[int, Candidate] | None:
    """The most a compiled candidate that did not fit says about ``c``'s step without compiling
    it: one that differs only in the optimizer's state has the same activations and gradients,
    so ``c`` needs its step less the state ``c`` saves (its per-layer optimizer temporaries
    may differ a little more: the caller keeps a margin). ``(bytes, that candidate)``."""
    same = [
        f
        for f in failed
        if f.step is not None
        and dataclasses.replace(f.candidate.settings, optimizer=c.settings.optimizer,
                                opt_state_dtype=c.settings.opt_state_dtype) == c.settings
        and (f.candidate.batch_size, f.candidate.grad_accum) == (c.batch_size, c.grad_accum)
    ]  # fmt: skip
    if not same:
        return None
    best = max(same, key=lambda f: f.step - (planner.state_bytes(f.candidate) - state))
    return best.step - (planner.state_bytes(best.candidate) - state), best.candidate


def format_row(row: Row) -> str:
    peak = "-" if row.peak is None else f"{row.peak / GiB:6.2f} GiB"
    verdict = "fits" if row.fits else "too big"
    exact = "approx" if row.approximate else "exact"
    return f"{row.candidate.describe():<58} {exact:<6} {peak:>10}  {verdict:<7}  {row.why}"


def header(budget: int) -> str:
    limit = usable_bytes(budget)
    return (
        f"budget {format_bytes(budget)}, of which {format_bytes(limit)} for the whole run "
        f"(the rest is reserve); peak = runtime + the largest of a step (arguments + outputs + "
        f"temporaries - aliased, compiled), an evaluation, a sample and a save, per device\n"
        f"{'configuration':<58} {'maths':<6} {'peak':>10}  {'verdict':<7}  why"
    )


def chosen_line(row: Row, base: MemorySettings) -> str:
    """``chosen: --flags ...`` and, on its own line, what in it is approximate."""
    c = row.candidate
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in describe_choice(c).items())
    text = f"chosen: {flags}\n"
    peak = "" if row.peak is None else f", whole run {format_bytes(row.peak)}"
    if row.approximate:
        text += (
            f"APPROXIMATE{peak}: nothing exact fits, so the planner chose "
            f"{'; '.join(row.approximate)} (an approximation of the settings given; "
            f"BENCHMARKS.md has the measured effect on quality)"
        )
    else:
        text += f"exact{peak}: the same maths as the settings given (up to float rounding)"
    given = approximate_settings(base)
    if given:
        text += f"\nsettings given that are approximate: {', '.join(given)}"
    return text


def describe_choice(c: Candidate) -> dict[str, Any]:
    """The finetune settings of a chosen candidate (TrainConfig field names)."""
    s = c.settings
    return {
        "remat": s.remat,
        "optimizer": s.optimizer,
        "opt_state_dtype": s.opt_state_dtype,
        "loss_chunk": s.loss_chunk,
        "batch_size": c.batch_size,
        "grad_accum": c.grad_accum,
        "parallel": s.parallel,
    }
