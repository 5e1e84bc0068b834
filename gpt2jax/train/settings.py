"""A fine-tuning run's settings: nested frozen sections, each setting owned by one of them.

Users see them flat (the ``gpt2jax finetune`` flags, ``run.json``'s ``"train"`` object and the
``TrainConfig(steps=..., lr=...)`` keywords): every flat name belongs to exactly one section, by
the table :data:`SECTION_OF`, built from the sections' fields and checked for clashes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gpt2jax.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from gpt2jax.config import REMAT_CHOICES
from gpt2jax.dtypes import COMPUTE, TRAINING
from gpt2jax.errors import ConfigError
from gpt2jax.validate import check_number

PARALLEL = ("data", "fsdp")
#: The optimizers and learning-rate schedules (:mod:`gpt2jax.train.optim` builds them).
OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class SourceSettings:
    """Where the weights start: a model directory, or random weights of a preset size."""

    model: str | None = None  # the starting model directory...
    init: str | None = None  # ...or a preset name (124M, ...): random weights, from scratch


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """What the run reads and how it cuts it into batches.

    ``batch_size`` is the global batch: windows per optimizer update, over all devices and
    micro-batches together (``grad_accum`` splits it further, to save memory, without changing
    the update). ``seq_len`` defaults to the model's context (at most 1024).
    """

    data: tuple[str, ...] = ()
    val_data: tuple[str, ...] = ()
    val_fraction: float = 0.05
    column: str | None = None
    field: str | None = None
    seq_len: int | None = None
    batch_size: int = 8
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class ScheduleSettings:
    """How many updates, and the learning-rate schedule over them."""

    steps: int = 1000
    # Updates the lr schedule decays over. None until a new run records its `steps` here, so
    # that a resume with more steps keeps the horizon instead of re-stretching a decayed
    # schedule (and raising the lr); run.json files written before it existed hold no value.
    schedule_steps: int | None = None
    warmup: int = 0
    schedule: str = "cosine"


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """The optimizer's hyperparameters and the rest of what one update does. Which optimizer
    runs is a memory choice (:attr:`MemorySettings.optimizer`): ``--memory`` may pick it."""

    lr: float = 1e-4  # AdamW's peak rate; Adafactor gets its own, see adafactor_lr
    # Adafactor's own peak rate (transformers' lr); None: a new run sets it to lr divided by the
    # starting weights' gpt2jax.train.optim.adafactor_scale (steps as large as AdamW's at lr)
    adafactor_lr: float | None = None
    weight_decay: float = 0.01
    clip: float = 1.0
    dropout: float = 0.0
    skip_nonfinite: bool = False


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    """How a run trades memory for speed or exactness (:mod:`gpt2jax.train.memory.build` applies
    them; :mod:`gpt2jax.train.memory.planner` searches them); defaults: all off.

    ==================  =======================================================================
    ``remat``           ``none`` / ``dots`` / ``block`` (:class:`gpt2jax.model.GPT2`), or
                        ``auto``: the device's (:func:`gpt2jax.device.default_remat`)
    ``compute_dtype``   what matmuls run in (``auto``: the device's, :mod:`gpt2jax.device`;
                        float16 trains with loss scaling); LayerNorm statistics, softmax,
                        logits and the loss stay float32
    ``attention``       the attention implementation (:mod:`gpt2jax.attention`)
    ``param_dtype``     what the parameters are stored in (bfloat16: stochastic rounding of
                        every update, :mod:`gpt2jax.train.layerwise`; with LoRA, the frozen
                        base's dtype)
    ``optimizer``       ``adamw`` / ``adafactor`` / ``sgd`` (:mod:`gpt2jax.train.optim`)
    ``opt_state_dtype`` AdamW's moments / SGD's momentum in float32 or bfloat16
                        (:mod:`gpt2jax.train.memory.precision`)
    ``loss_chunk``      0, or sequence positions per chunk of the loss (:mod:`gpt2jax.train.loss`)
    ``lora_rank``       0, or train rank-r adapters only (:mod:`gpt2jax.lora`), ``lora_alpha``
    ``freeze``          None, ``embeddings`` or ``top:N`` (:mod:`gpt2jax.train.memory.freeze`)
    ``parallel``        ``data`` (pmap, replicated state) or ``fsdp``
                        (:mod:`gpt2jax.train.sharding`)
    ==================  =======================================================================
    """

    # "auto": the device's (gpt2jax.device.default_remat), resolved when a run starts
    remat: str = "auto"
    # "auto": the device's (gpt2jax.device.default_compute_dtype), resolved when a run starts
    compute_dtype: str = "auto"
    param_dtype: str = "float32"
    optimizer: str = "adamw"
    opt_state_dtype: str = "float32"
    loss_chunk: int = 0
    lora_rank: int = 0
    lora_alpha: float | None = None
    freeze: str | None = None
    parallel: str = "data"
    attention: str = "auto"

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the flag of an impossible setting."""
        choices = {
            "remat": REMAT_CHOICES,
            "compute_dtype": COMPUTE,
            "attention": IMPLEMENTATIONS,
            "param_dtype": TRAINING,
            "opt_state_dtype": TRAINING,
            "optimizer": OPTIMIZERS,
            "parallel": PARALLEL,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        check_number("--loss-chunk", self.loss_chunk, low=0, integer=True, hint="0: off")
        check_number("--lora-rank", self.lora_rank, low=0, integer=True, hint="0: off")
        if self.lora_alpha is not None:
            check_number("--lora-alpha", self.lora_alpha, low=0, low_open=True)
        if self.lora_alpha is not None and self.lora_rank == 0:
            raise ConfigError("--lora-alpha needs --lora-rank")
        if self.lora_rank and self.freeze:
            raise ConfigError("--freeze and --lora-rank exclude each other (LoRA freezes all)")
        if self.optimizer == "adafactor" and self.opt_state_dtype != "float32":
            raise ConfigError(
                "--opt-state-dtype applies to adamw and sgd; adafactor's factored statistics "
                "are already small and stay float32"
            )


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    """When the run evaluates, samples and saves, and how much it keeps."""

    eval_every: int = 200
    eval_batches: int = 16
    sample_every: int = 500
    sample_length: int = 64
    sample_prompt: str = ""
    save_every: int = 500
    keep: int = 3
    report_to: tuple[str, ...] = ()  # tensorboard, wandb (gpt2jax.train.reporting)


@dataclasses.dataclass(frozen=True)
class PlanRecord:
    """What ``--memory`` planned, as the run records it."""

    memory: str | None = None  # the budget the settings were planned for, as given
    # what in the settings approximates float32 AdamW of the whole model (set by --memory)
    approximate: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Settings of the run as a whole."""

    seed: int = 0


#: Section attribute of :class:`TrainConfig` -> its class.
SECTIONS: dict[str, type] = {
    "source": SourceSettings,
    "dataset": DataSettings,
    "schedule": ScheduleSettings,
    "update": UpdateSettings,
    "memory_settings": MemorySettings,
    "logging": LoggingSettings,
    "plan": PlanRecord,
    "run": RunSettings,
}


def _section_of() -> dict[str, str]:
    table: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in table, f"{f.name} is in both {table.get(f.name)} and {section}"
            table[f.name] = section
    return table


#: Flat setting name (flag, ``run.json`` key, keyword) -> the section that owns it.
SECTION_OF: dict[str, str] = _section_of()
_TUPLES = ("data", "val_data", "approximate", "report_to")  # lists in JSON and at the keyword


@dataclasses.dataclass(frozen=True, init=False)
class TrainConfig:
    """Every setting of a fine-tuning run (the CLI flags of ``gpt2jax finetune``), in sections.

    Built from flat keywords, the flags' names: ``TrainConfig(model="124M", data=["a.txt"],
    steps=2000)``; read by section: ``train.schedule.steps``, ``train.update.lr``. See
    :data:`SECTION_OF` for who owns which name, :meth:`to_dict` for ``run.json``.
    """

    source: SourceSettings
    dataset: DataSettings
    schedule: ScheduleSettings
    update: UpdateSettings
    memory_settings: MemorySettings
    logging: LoggingSettings
    plan: PlanRecord
    run: RunSettings

    #: Fields a resumed run may change; anything else would make it a different run.
    RESUMABLE = (
        "steps",
        "schedule_steps",
        "eval_every",
        "eval_batches",
        "sample_every",
        "sample_length",
        "sample_prompt",
        "save_every",
        "keep",
        "skip_nonfinite",
        "report_to",
        "attention",  # the same maths on another device's kernel
    )

    def __init__(self, **flat: Any) -> None:
        unknown = sorted(set(flat) - set(SECTION_OF))
        if unknown:
            raise TypeError(f"TrainConfig: unknown settings {', '.join(unknown)}")
        grouped: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for name, value in flat.items():
            if name in _TUPLES and value is not None:
                value = tuple(value)
            grouped[SECTION_OF[name]][name] = value
        for section, cls in SECTIONS.items():
            object.__setattr__(self, section, cls(**grouped[section]))

    def replace(self, **flat: Any) -> TrainConfig:
        """A copy with the flat settings ``flat`` changed."""
        return TrainConfig(**{**self.to_dict(), **flat})

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the flag when a setting is impossible: every
        number finite and in range (a NaN compares false with everything, so ``x < 0`` alone
        let it through)."""
        src, d, s, lg, u = self.source, self.dataset, self.schedule, self.logging, self.update
        if (src.model is None) == (src.init is None):
            raise ConfigError("give either a starting MODEL directory or --init SIZE, not both")
        if not d.data:
            raise ConfigError("no training data: pass --data FILE ...")
        positive = {
            "steps": s.steps,
            "batch_size": d.batch_size,
            "grad_accum": d.grad_accum,
            "eval_batches": lg.eval_batches,
            "sample_length": lg.sample_length,
            "keep": lg.keep,
        }
        for name, value in positive.items():
            check_number(_flag(name), value, low=1, integer=True)
        for name, value in {
            "warmup": s.warmup,
            "eval_every": lg.eval_every,
            "sample_every": lg.sample_every,
            "save_every": lg.save_every,
            "seed": self.run.seed,
        }.items():
            check_number(_flag(name), value, low=0, integer=True)
        for name, value in {"seq_len": d.seq_len, "schedule_steps": s.schedule_steps}.items():
            if value is not None:
                check_number(_flag(name), value, low=1, integer=True)
        check_number("--lr", u.lr, low=0)
        if u.adafactor_lr is not None:
            check_number("--adafactor-lr", u.adafactor_lr, low=0, low_open=True)
            # --memory may choose Adafactor, so the flag is kept for it
            if self.memory_settings.optimizer != "adafactor" and self.plan.memory is None:
                raise ConfigError("--adafactor-lr applies to --optimizer adafactor only")
        check_number("--weight-decay", u.weight_decay, low=0)
        check_number("--clip", u.clip, low=0, hint="0 turns clipping off")
        check_number("--dropout", u.dropout, low=0, high=1, high_open=True)
        check_number("--val-fraction", d.val_fraction, low=0, high=1, high_open=True)
        self.memory_settings.validate()

    def peak_lr(self) -> float:
        """The peak rate the optimizer is given: ``adafactor_lr`` for Adafactor (once a run has
        set it), ``lr`` otherwise."""
        if self.memory_settings.optimizer == "adafactor" and self.update.adafactor_lr is not None:
            return self.update.adafactor_lr
        return self.update.lr

    def to_dict(self) -> dict[str, Any]:
        """Every setting, flat, as ``run.json`` records it under ``"train"`` (see
        ``from_dict``)."""
        flat: dict[str, Any] = {}
        for section in SECTIONS:
            for name, value in dataclasses.asdict(getattr(self, section)).items():
                flat[name] = list(value) if name in _TUPLES else value
        return flat

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "run.json") -> TrainConfig:
        """The settings ``to_dict`` wrote; an unknown key is a :class:`ConfigError` naming
        ``source``."""
        unknown = sorted(set(d) - set(SECTION_OF))
        if unknown:
            raise ConfigError(f"{source}: unknown training settings {', '.join(unknown)}")
        return cls(**d)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
