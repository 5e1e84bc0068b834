"""Progress bars for long work (conversion, tokenizing, training), on stderr via tqdm."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm


@contextmanager
def progress_bar(
    total: int | None, desc: str, unit: str = "it", enabled: bool = True, **kwargs: Any
) -> Iterator[tqdm]:
    """A tqdm bar (bytes are scaled to kB/MB/GB when ``unit="B"``); silent when not ``enabled``."""
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        **kwargs,
    )
    try:
        yield bar
    finally:
        bar.close()
