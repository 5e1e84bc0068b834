"""Range checks of numeric settings, one function for every flag of every command.

``argparse`` reads ``nan``, ``inf`` and ``-1`` as numbers like any other; a NaN compares false
with everything, so ``x < 0`` checks let it through. :func:`check_number` refuses non-finite
values and values out of range with one message shape, naming the flag.
"""

from __future__ import annotations

import math
from typing import Any

from gpt2jax.errors import ConfigError


def check_number(
    flag: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    hint: str = "",
) -> None:
    """Raises :class:`ConfigError` unless ``value`` is a finite number within the bounds
    (``low``/``high`` inclusive unless ``*_open``); ``integer`` also requires an ``int``.
    ``hint`` is added to the message (e.g. how to turn the feature off)."""
    suffix = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{flag} must be a number, got {value!r}{suffix}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{flag} must be an integer, got {value!r}{suffix}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value}{suffix}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        if low is not None and high is not None:
            want = f"in {lo}, {hi}"
        elif low is not None:
            want = (">" if low_open else ">=") + f" {low:g}"
        else:
            want = ("<" if high_open else "<=") + f" {high:g}"
        raise ConfigError(f"{flag} must be {want}, got {value}{suffix}")
