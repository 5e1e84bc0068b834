"""A run's ``metrics.jsonl`` (one JSON object per line) and its loss-curve plot.

Training steps log ``{"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"}``
(plus ``"skipped": true`` for a non-finite update that was skipped); evaluations log
``{"step", "val_loss", "val_ppl", "val_tokens"}``. ``step`` counts optimizer updates, so the
entry with ``step`` k describes the k-th update.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from gpt2jax.errors import Gpt2JaxError

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends metrics to ``path``, one line each, flushed at once (a crash loses nothing).

    ``resume_step``: first drop the entries after it (a resumed run redoes those steps).
    ``enabled=False`` (every process but the first of a multi-host run) writes nothing.
    """

    def __init__(self, path: str, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path = path
        self._file = None
        if enabled:
            if resume_step is not None:
                self._truncate(resume_step)
            self._file = open(path, "a")  # noqa: SIM115 - closed in close()

    def _truncate(self, step: int) -> None:
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Appends ``record``; NaN and infinities become null (JSON has no such numbers)."""
        if self._file is None:
            return
        clean = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()
        }
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: one clear line, not a traceback from the loop
            raise Gpt2JaxError(f"{self.path}: cannot write ({e.strerror})") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line, from a killed run, is ignored)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_losses(metrics_path: str, png_path: str) -> bool:
    """Writes the training and validation loss curves to ``png_path``.

    Returns False (and logs why) when matplotlib, an optional extra, is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed: no %s (pip install 'gpt2jax[plot]')", png_path)
        return False
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(png_path)
    except OSError as e:  # the run itself is saved; a missing plot is no reason to fail it
        log.warning("%s: cannot write the loss plot (%s)", png_path, e.strerror)
        return False
    return True
