"""Batches of token windows: a seeded order that is a pure function of ``(seed, step)``.

Any training batch can be recomputed from ``(seed, step)`` alone, so a run resumed at step ``k``
sees exactly the batches an uninterrupted run would have (:class:`WindowSampler`).
:func:`eval_windows` covers a stream once for evaluation, and :class:`Prefetcher` prepares the
next batches on a background thread so the host never stalls the accelerator.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from gpt2jax.errors import DataError


class WindowSampler:
    """Random windows of ``seq_len + 1`` tokens, ``batch_size`` per step, from ``tokens``.

    The token stream is gone through in *epochs*. Each epoch cuts it into ``W = (N - 1) // T``
    windows of ``T + 1`` tokens (``T`` inputs, the same shifted by one as targets) with stride
    ``T``, starting at a random offset in ``[0, N - 1 - W*T]`` (so that window edges move between
    epochs), and visits them in a random permutation. Both come from
    ``numpy.random.default_rng([seed, epoch])``. Batch ``step`` holds samples ``step * B ..
    step * B + B - 1`` of that endless sequence, so any batch can be recomputed from ``(seed,
    step)`` alone. :meth:`state` is the small dict that checkpoints record about it.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        n = len(tokens)
        if n < seq_len + 1:
            raise DataError(
                f"{n} training tokens are fewer than one window of seq_len + 1 = {seq_len + 1} "
                f"tokens; use --seq-len {max(1, n - 1)} or less, or more text"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.windows_per_epoch = (n - 1) // seq_len
        self._slack = (n - 1) - self.windows_per_epoch * seq_len  # in [0, seq_len)
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}  # the last two epochs' orders

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        """``(offset, permutation)`` of one epoch."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self._slack + 1))
            self._epochs[epoch] = (offset, rng.permutation(self.windows_per_epoch))
            for old in sorted(self._epochs)[:-2]:
                del self._epochs[old]
        return self._epochs[epoch]

    def starts(self, step: int) -> np.ndarray:
        """Start positions ``(B,)`` of batch ``step``'s windows in the token stream."""
        samples = step * self.batch_size + np.arange(self.batch_size)
        starts = np.empty(self.batch_size, np.int64)
        for i, sample in enumerate(samples):
            epoch, j = divmod(int(sample), self.windows_per_epoch)
            offset, perm = self._epoch(epoch)
            starts[i] = offset + perm[j] * self.seq_len
        return starts

    def batch(self, step: int, rows: slice = slice(None)) -> np.ndarray:
        """Batch ``step`` as ``(B, T + 1)`` int32; ``rows`` selects this process's share."""
        T = self.seq_len
        return np.stack([self.tokens[s : s + T + 1] for s in self.starts(step)[rows]]).astype(
            np.int32
        )

    def state(self, step: int) -> dict[str, Any]:
        """Where batch ``step`` is in the data, as checkpoints record it."""
        sample = step * self.batch_size
        return {
            "seed": self.seed,
            "step": step,
            "sample": sample,
            "epoch": sample / self.windows_per_epoch,
            "windows_per_epoch": self.windows_per_epoch,
        }


def eval_windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(windows (N, T+1) int32, weights (N, T) float32)`` covering ``tokens`` once.

    Window ``k`` is ``tokens[k*T : k*T + T + 1]``; the last is zero-padded with weight 0 there.
    Consecutive and non-overlapping: every token after the first is predicted exactly once.
    """
    n = len(tokens)
    if n < 2:
        return np.zeros((0, seq_len + 1), np.int32), np.zeros((0, seq_len), np.float32)
    count = -(-(n - 1) // seq_len)
    windows = np.zeros((count, seq_len + 1), np.int32)
    weights = np.zeros((count, seq_len), np.float32)
    for k in range(count):
        chunk = np.asarray(tokens[k * seq_len : k * seq_len + seq_len + 1])
        windows[k, : len(chunk)] = chunk
        weights[k, : len(chunk) - 1] = 1.0
    return windows, weights


def spread(windows: np.ndarray, weights: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` of the windows, evenly spaced over the stream (all when fewer)."""
    if len(windows) <= limit:
        return windows, weights
    pick = np.linspace(0, len(windows) - 1, limit).round().astype(int)
    return windows[pick], weights[pick]


class Prefetcher:
    """Produces ``make(step)`` for ``step = start .. stop - 1`` on a background thread.

    Keeps ``depth`` results ready; an exception in ``make`` is raised by :meth:`next`.
    """

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2) -> None:
        self._make = make
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start, stop), daemon=True)
        self._thread.start()

    def _run(self, step: int, stop: int) -> None:
        while step < stop and not self._stop.is_set():
            try:
                item = (step, self._make(step), None)
            except BaseException as e:  # handed to the consumer, which re-raises it
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def next(self) -> Any:
        """The next step's result, in order."""
        _, value, error = self._queue.get()
        if error is not None:
            raise error
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
