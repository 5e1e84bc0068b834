"""``finetune --report-to tensorboard,wandb``: the run's metrics and samples, also sent there.

Both are optional extras (``pip install "gpt2jax[tensorboard]"`` / ``"gpt2jax[wandb]"``).
What is sent is what ``metrics.jsonl`` and ``samples.txt`` hold: per update ``train/loss``,
``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``; per evaluation ``val/loss``,
``val/perplexity``; every sample as text (``samples``).
"""

from __future__ import annotations

import os
import secrets
import string
import time
from typing import Any

from gpt2jax.errors import ConfigError

#: metrics.jsonl key -> the name it is reported under.
SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "val_loss": "val/loss",
    "val_ppl": "val/perplexity",
}
SAMPLE_TAG = "samples"
_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to name -> module


def check_available(names: list[str] | tuple[str, ...]) -> None:
    """A one-line :class:`ConfigError` before any work for an unknown reporter or one whose
    package is missing."""
    import importlib.util

    unknown = sorted(set(names) - set(_EXTRAS))
    if unknown:
        raise ConfigError(
            f"--report-to: unknown {', '.join(unknown)} (choose from {', '.join(_EXTRAS)})"
        )
    for name in names:
        if importlib.util.find_spec(_EXTRAS[name]) is None:
            raise ConfigError(
                f"--report-to {name} needs the {_EXTRAS[name]} package: "
                f'pip install "gpt2jax[{name}]"'
            )


class Reporters:
    """The reporters a run asked for; ``enabled=False`` (not the first process) sends nothing.

    ``start_step``: the step a resumed run continues from (None for a new run).

    - **tensorboard**: event files in ``RUN/tensorboard``, written with the ``tensorboard``
      package alone (no TensorFlow or torch). A resumed run first writes TensorBoard's restart
      marker, so the steps it redoes replace the first attempt's in the charts.
    - **wandb**: one W&B run per gpt2jax run (its id is kept in ``RUN/wandb/run_id``, so a resume
      continues it), project ``$WANDB_PROJECT`` or ``gpt2jax``, named after the run directory,
      with every setting as its config. ``WANDB_MODE=offline`` writes only under ``RUN/wandb``
      (``wandb sync`` uploads it later).
    """

    def __init__(
        self,
        names: list[str],
        run_dir: str,
        settings: dict[str, Any],
        start_step: int | None = None,
        enabled: bool = True,
    ) -> None:
        self._sinks: list[Any] = []
        if not enabled:
            return
        check_available(names)
        for name in names:
            if name == "tensorboard":
                self._sinks.append(_TensorBoard(os.path.join(run_dir, "tensorboard"), start_step))
            elif name == "wandb":
                self._sinks.append(_Wandb(run_dir, settings))

    def write(self, record: dict[str, Any]) -> None:
        """Sends the scalars of a ``metrics.jsonl`` record (finite numbers only)."""
        if not self._sinks:
            return
        values = {
            SCALARS[k]: float(v)
            for k, v in record.items()
            if k in SCALARS and isinstance(v, (int, float)) and v == v and abs(v) != float("inf")
        }
        if values:
            for sink in self._sinks:
                sink.scalars(int(record["step"]), values)

    def sample(self, step: int, text: str) -> None:
        for sink in self._sinks:
            sink.text(step, text)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []


class _TensorBoard:
    """Event files through ``tensorboard``'s own writer and protos."""

    def __init__(self, logdir: str, start_step: int | None) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._pb = event_pb2
        self._writer = EventFileWriter(logdir)
        if start_step is not None:  # TensorBoard drops the old events after start_step
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._event(step=start_step + 1, session_log=start)

    def _event(self, **fields: Any) -> None:
        self._writer.add_event(self._pb.Event(wall_time=time.time(), **fields))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        )
        self._event(step=step, summary=summary)
        self._writer.flush()

    def text(self, step: int, text: str) -> None:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
        )
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]
            ),
        )
        value = summary_pb2.Summary.Value(tag=SAMPLE_TAG, metadata=metadata, tensor=tensor)
        self._event(step=step, summary=summary_pb2.Summary(value=[value]))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _Wandb:
    """One W&B run, resumed by the id kept in ``RUN/wandb/run_id``."""

    def __init__(self, run_dir: str, settings: dict[str, Any]) -> None:
        import wandb

        folder = os.path.join(run_dir, "wandb")
        os.makedirs(folder, exist_ok=True)
        id_file = os.path.join(folder, "run_id")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            alphabet = string.ascii_lowercase + string.digits  # as W&B's own run ids
            run_id = "".join(secrets.choice(alphabet) for _ in range(8))
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "gpt2jax"),
            name=os.path.basename(os.path.normpath(run_dir)),
            id=run_id,
            resume="allow",
            dir=run_dir,  # wandb writes under dir/wandb
            config=settings,
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def text(self, step: int, text: str) -> None:
        self._run.log({SAMPLE_TAG: text}, step=step)

    def close(self) -> None:
        self._run.finish()
