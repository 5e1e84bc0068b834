"""Several processes as one run, on JAX's multi-controller runtime (``jax.distributed``).

A TPU pod slice or a GPU cluster runs one process per host, each with the same command and
``GPT2JAX_DISTRIBUTED=1`` (:func:`initialize`); ``jax.devices()`` then spans every process, and
``pmean`` and the sharded ``jit`` reduce across them (through gloo on CPU). On top of JAX's
coordination service (its key-value store) a run gets a :class:`Watchdog` (a lost process stops
the others at once, with one line naming it), :func:`primary_first` (process 0 creates the run,
the others wait for the outcome) and a :class:`StopAgreement` (a signal to any process stops
all of them after the same update).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from gpt2jax import errors
from gpt2jax.errors import ConfigError, Gpt2JaxError

#: Seconds without a heartbeat after which a process counts as lost.
LOST_AFTER = 20
#: JAX's own heartbeat timeout (the coordination service aborts every process after it).
JAX_HEARTBEAT = 45
#: Exit status of a process that stops because another one was lost.
LOST_EXIT = 75
_PREFIX = "gpt2jax/"
_WAIT_MS = 24 * 3600 * 1000  # blocking reads: the watchdog, not a timeout, ends a lost wait


def enabled() -> bool:
    """Whether this process was started as one of several (``GPT2JAX_DISTRIBUTED=1``)."""
    return os.environ.get("GPT2JAX_DISTRIBUTED") == "1"


def initialize() -> None:
    """``jax.distributed.initialize`` once per process when :func:`enabled`, then the
    :class:`Watchdog`. Must run before anything starts JAX's backends.

    The coordinator address, process count and id come from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` when set; on TPU VMs and under Slurm or Open MPI
    JAX finds them itself. JAX's own heartbeat timeout is :data:`JAX_HEARTBEAT`: its
    coordination service aborts every process (with a stack trace) when one stops for that long,
    a backstop behind the :class:`Watchdog`, which speaks first.
    """
    if not enabled() or jax.distributed.is_initialized():
        return
    num, pid = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    try:
        jax.distributed.initialize(
            num_processes=num,
            process_id=pid,
            heartbeat_timeout_seconds=JAX_HEARTBEAT,
            shutdown_timeout_seconds=LOST_AFTER,
        )
    except (RuntimeError, ValueError, TypeError) as e:
        where = os.environ.get("JAX_COORDINATOR_ADDRESS", "the coordinator JAX detected")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Gpt2JaxError(
            f"GPT2JAX_DISTRIBUTED=1: cannot join the run at {where} ({first[:300]})"
        ) from None
    Watchdog(_client(), jax.process_index(), jax.process_count()).start()
    _connect_cpu_collectives()


def _connect_cpu_collectives() -> None:
    """On CPU, one collective over every device right away, while the processes are together
    (``initialize`` returns once all have connected). Gloo connects a group of devices at its
    first collective, and a process that arrives there more than 30 s after another (one
    compiles the step for longer) fails with ``Gloo context initialization failed``; once
    connected, the group is reused by every later collective over the same devices (the
    data-parallel ``pmean`` and FSDP's mesh both span all of them)."""
    if jax.default_backend() != "cpu":
        return
    import jax.numpy as jnp

    ones = jnp.ones((jax.local_device_count(),))
    total = jax.pmap(lambda x: jax.lax.psum(x, "all"), "all")(ones)
    jax.block_until_ready(total)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def _client() -> Any:
    from jax._src import distributed  # the coordination service client JAX connected

    return distributed.global_state.client


class Watchdog:
    """Heartbeats through the coordination service's key-value store; exits with
    :data:`LOST_EXIT` and one line on stderr when another process is lost.

    A process that finished (:meth:`finished`) is no longer watched. Times are this process's
    own monotonic clock (when it last saw another's counter change), so clocks need not agree.
    """

    _current: Watchdog | None = None

    def __init__(self, client: Any, me: int, count: int, interval: float = 1.0) -> None:
        self.client, self.me, self.count, self.interval = client, me, count, interval
        self._stop = threading.Event()
        self._seen: dict[int, tuple[str, float]] = {}
        self._last_ok = time.monotonic()

    def start(self) -> None:
        Watchdog._current = self
        start = time.monotonic()
        self._seen = {p: ("", start) for p in range(self.count) if p != self.me}
        threading.Thread(target=self._beat, name="gpt2jax-heartbeat", daemon=True).start()
        threading.Thread(target=self._watch, name="gpt2jax-watchdog", daemon=True).start()

    @classmethod
    def finished(cls) -> None:
        """Marks this process as done (not lost when it exits) and stops watching."""
        dog = cls._current
        if dog is None:
            return
        dog._stop.set()
        try:
            dog.client.key_value_set(f"{_PREFIX}done/{dog.me}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may be gone already; nothing to tell
            pass
        cls._current = None

    @classmethod
    def abandon(cls) -> None:
        """This process failed on its own: stops its heartbeat (without marking it done), so
        that the others, which may be waiting for it in a collective, stop within
        :data:`LOST_AFTER` seconds instead of waiting for its exit."""
        dog = cls._current
        if dog is not None:
            dog._stop.set()
            cls._current = None
            # Registered after JAX's own clean-up, so it runs before it (atexit runs in reverse
            # order): this process does not wait at JAX's shutdown barrier for the others.
            atexit.register(_exit_now)

    def _beat(self) -> None:
        """Publishes a counter and reads everyone's (one RPC each way per interval)."""
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                self.client.key_value_set(f"{_PREFIX}alive/{self.me}", str(n), allow_overwrite=True)
                beats = dict(self.client.key_value_dir_get(f"{_PREFIX}alive/"))
                done = dict(self.client.key_value_dir_get(f"{_PREFIX}done/"))
            except Exception:  # noqa: BLE001 - the coordinator unreachable: _watch decides
                self._stop.wait(self.interval)
                continue
            now = time.monotonic()
            self._last_ok = now
            for key, value in beats.items():
                p = int(key.rsplit("/", 1)[-1])
                if p in self._seen and self._seen[p][0] != value:
                    self._seen[p] = (value, now)
            for key in done:
                self._seen.pop(int(key.rsplit("/", 1)[-1]), None)
            self._stop.wait(self.interval)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if self.me != 0 and now - self._last_ok > LOST_AFTER:
                self._lost(0, "the coordinator stopped answering")
            for p, (_, seen) in list(self._seen.items()):
                if now - seen > LOST_AFTER:
                    self._lost(p, f"no heartbeat for {LOST_AFTER} s")

    def _lost(self, p: int, why: str) -> None:
        if self._stop.is_set():
            return
        sys.stderr.write(
            f"gpt2jax: error: process {p} of {self.count} was lost ({why}: killed, crashed or "
            f"its host failed); process {self.me} stops too. A finetune run continues from its "
            "last checkpoint with `gpt2jax finetune --resume RUN` on every process\n"
        )
        sys.stderr.flush()
        os._exit(LOST_EXIT)


def primary_first(name: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` on process 0; every other process waits for it and gets the same JSON-able
    result, or raises the same one-line error (a :class:`Gpt2JaxError` of the same class).
    One process: just ``fn()``."""
    if jax.process_count() == 1:
        return fn()
    client, key = _client(), f"{_PREFIX}once/{name}"
    if jax.process_index() == 0:
        try:
            result = fn()
        except Gpt2JaxError as e:
            client.key_value_set(key, json.dumps({"error": str(e), "class": type(e).__name__}))
            raise
        except BaseException as e:
            client.key_value_set(key, json.dumps({"error": f"process 0: {e!r}"[:500]}))
            raise
        client.key_value_set(key, json.dumps({"result": result}))
        return result
    outcome = json.loads(client.blocking_key_value_get(key, _WAIT_MS))
    if "error" in outcome:
        cls = getattr(errors, outcome.get("class", ""), Gpt2JaxError)
        cls = cls if isinstance(cls, type) and issubclass(cls, Gpt2JaxError) else Gpt2JaxError
        raise cls(outcome["error"])
    return outcome["result"]


class StopAgreement:
    """Makes a stop request (a signal) reaching any process stop every process after the same
    update, so that they save one checkpoint together, without adding a collective.

    :meth:`after` is called right after each update is dispatched, with the number of updates
    dispatched, ``done``. One process stops right there when it had a signal. With several, the
    first process with a signal publishes ``stop at done + LEAD`` in the coordination service,
    and every process reads it after each update (one key-value read, no waiting). None can be
    past that update when it reads it: every loop iteration first waits for the metrics of the
    update before last, which needs every process's dispatch of that update, so no process gets
    more than two updates ahead of another's dispatches; and the one that published dispatches
    its next update only after publishing. No process ever waits here, so none can be waiting
    for a request while another waits for it in a collective (an evaluation, a save).
    """

    #: Updates between a request and the stop: the most any process can have run ahead, plus 1.
    LEAD = 3

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.several = jax.process_count() > 1
        self._stop_at: int | None = None
        self._signal: int | None = None

    def after(self, done: int, signum: int | None) -> int | None:
        """The signal to stop on if the run stops after update ``done``, else None."""
        if self._stop_at is None:
            self._stop_at = self._stop(done, signum)
        return self._signal if self._stop_at is not None and done >= self._stop_at else None

    def _stop(self, done: int, signum: int | None) -> int | None:
        """The update to stop after, once a request is known."""
        if not self.several:
            self._signal = signum
            return None if signum is None else done
        client, key = _client(), f"{_PREFIX}stop"
        if signum is not None:
            proposal = f"{min(done + self.LEAD, self.steps)} {signum}"
            try:  # the first request wins; a later one reads it
                client.key_value_set(key, proposal, allow_overwrite=False)
            except Exception:  # noqa: BLE001 - ALREADY_EXISTS
                pass
        request = _try_get(client, key)
        if request is None:
            return None
        stop_at, sig = (int(x) for x in request.split())
        self._signal = sig
        return stop_at


def _try_get(client: Any, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception:  # noqa: BLE001 - NOT_FOUND
        return None


def _exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
