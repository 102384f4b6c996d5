"""Hard time limits on reward functions, in every calling context.

A reward function reads untrusted model output: a pathological response (tens of thousands of spaces, braces
nested a thousand deep, a power tower) can keep answer extraction or math-verify's sympy parse busy for
minutes. Two mechanisms bound it:

- `time_limit(seconds)`: SIGALRM (setitimer) in the main thread of a process, raising `RewardTimeout`. Costs
  a few microseconds; interrupts Python code and the `re` module; not a C call that never checks signals.
  `RewardTimeout` is a BaseException, so libraries' `except Exception` (math-verify has many) cannot swallow it.
- `RewardPool`: worker processes that score items one by one under `time_limit`. A worker that does not
  answer within the limit plus a grace period is killed and replaced, so the limit holds whatever the reward
  function does, from any thread of the caller. Workers are fresh interpreters (`python -c`, a socket pair
  to talk over): no fork of a threaded parent, and unlike multiprocessing's spawn no re-import of the
  caller's main module, so a script without a `__main__` guard works. The reward function travels pickled
  (by reference: a module-level function, not one defined in `__main__`).

A timed-out response scores `None` here; callers score it as their worst outcome (math: `-format_penalty`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Callable, Iterator

IN_WORKER = False  # True inside a RewardPool worker: it already enforces the limit around each call
LOAD_TIMEOUT_S = 120.0  # a fresh worker's start-up and job loading (imports) may take this long on a busy machine


class RewardTimeout(BaseException):
    """A reward call ran past its time limit (BaseException: `except Exception` in libraries lets it through)."""


class RewardError(RuntimeError):
    """The reward function raised; the message names the response and carries the original traceback."""


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise RewardTimeout in the body after `seconds` (main thread only: signals are delivered there). An
    outer timer (e.g. the caller's own alarm) is restored afterwards with its remaining time."""
    if not in_main_thread():
        raise RuntimeError("time_limit needs the main thread (SIGALRM); elsewhere use RewardPool")

    def on_alarm(signum, frame):
        raise RewardTimeout(f"reward call exceeded {seconds} s")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, old_handler)
            if old_delay:
                signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3))


def _worker_main(fd: int) -> None:
    """A pool worker: for each job (fn, kwargs, timeout_s, items) send back (index, score | None | error text)
    per item as soon as it is scored."""
    global IN_WORKER
    IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(fd)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        except Exception:  # noqa: BLE001 - e.g. the reward function cannot be imported here
            conn.send((-1, traceback.format_exc()))
            continue
        if job is None:
            return
        conn.send((-2, None))  # loaded (imports done): the per-item clock starts now
        fn, kwargs, timeout_s, items = job
        for i, response, truth in items:
            try:
                with time_limit(timeout_s):
                    result: float | None | str = float(fn(response, truth, timeout_s=timeout_s, **kwargs))
            except RewardTimeout:
                result = None
            except Exception:  # noqa: BLE001 - the parent raises it as a RewardError
                result = traceback.format_exc()
            conn.send((i, result))


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection  # the parent's end of the socket pair
    pending: deque = field(default_factory=deque)  # item indices sent and not yet answered, in order
    last_progress: float = 0.0  # when it last answered (or loaded its job, or was sent it)
    loaded: bool = False  # it has unpickled its current job (imports of a fresh worker can take seconds)


class RewardPool:
    """`workers` processes scoring `fn(response, truth, timeout_s=..., **kwargs)` with a hard per-item limit."""

    def __init__(self, workers: int = 2, grace_s: float = 1.0):
        self.grace_s = grace_s
        self.workers = [self._start() for _ in range(max(workers, 1))]
        self.lock = threading.Lock()  # one score() at a time (callers may be threads)

    def _start(self) -> _Worker:
        parent, child = socket.socketpair()
        code = f"from m2flow.rewards.limits import _worker_main; _worker_main({child.fileno()})"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the caller's imports
        process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child.fileno(),), env=env,
                                   stdin=subprocess.DEVNULL)
        child.close()
        return _Worker(process, Connection(parent.detach()))

    def _restart(self, w: _Worker) -> _Worker:
        w.process.kill()
        w.process.wait(timeout=5)
        w.conn.close()
        return self._start()

    def score(self, fn: Callable[..., float], responses: list[str], truths: list[str], *, timeout_s: float,
              **kwargs) -> list[float | None]:
        """Scores in input order; None where the call ran past `timeout_s` (or its worker died). Raises
        RewardError if `fn` raised."""
        if len(responses) != len(truths):
            raise ValueError(f"{len(responses)} responses but {len(truths)} ground truths")
        with self.lock:
            return self._score(fn, list(responses), list(truths), timeout_s, kwargs)

    def _score(self, fn, responses, truths, timeout_s, kwargs) -> list[float | None]:
        n = len(responses)
        results: list[float | None] = [None] * n

        def send(w: _Worker, idx: list[int]) -> None:
            w.pending.extend(idx)
            w.last_progress, w.loaded = time.monotonic(), False
            w.conn.send((fn, kwargs, timeout_s, [(i, responses[i], truths[i]) for i in idx]))

        chunk = -(-n // len(self.workers)) if n else 0
        try:
            for k, w in enumerate(self.workers):
                if idx := list(range(k * chunk, min(n, (k + 1) * chunk))):
                    send(w, idx)
            while busy := [w for w in self.workers if w.pending]:
                wait([w.conn for w in busy], timeout=0.05)
                for k, w in enumerate(self.workers):
                    if w.pending and self._collect(w, fn, responses, results, timeout_s):
                        rest = list(w.pending)[1:]  # the first pending item hung (or crashed its worker): None
                        self.workers[k] = w = self._restart(w)
                        if rest:
                            send(w, rest)
        except BaseException:  # RewardError, KeyboardInterrupt: no worker keeps answers to this call
            self.workers = [self._restart(w) if w.pending else w for w in self.workers]
            raise
        return results

    def _collect(self, w: _Worker, fn, responses, results, timeout_s) -> bool:
        """Reads the worker's answers into `results`; True if it is dead or stuck past the limit."""
        try:
            while w.conn.poll():
                i, result = w.conn.recv()
                if i == -2:
                    w.last_progress, w.loaded = time.monotonic(), True
                    continue
                if i < 0:
                    raise RewardError(f"a reward worker process cannot load the job (the reward function must be "
                                      f"importable: defined at module level, not in __main__):\n{result}")
                w.pending.popleft()
                w.last_progress = time.monotonic()
                if isinstance(result, str):
                    raise RewardError(f"reward function {getattr(fn, '__name__', fn)!r} raised on response {i} "
                                      f"({responses[i][:80]!r}):\n{result}")
                results[i] = result
            alive = w.process.poll() is None
        except (EOFError, OSError):
            alive = False
        limit = timeout_s + self.grace_s + (0 if w.loaded else LOAD_TIMEOUT_S)
        return bool(w.pending) and (not alive or time.monotonic() - w.last_progress > limit)

    def close(self) -> None:
        for w in self.workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self.workers:
            try:
                w.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
            w.conn.close()
        self.workers = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared: RewardPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> RewardPool:
    """One lazily started single-worker pool per process, for reward calls made off the main thread."""
    global _shared
    with _shared_lock:
        if _shared is None:
            import atexit

            _shared = RewardPool(workers=1)
            atexit.register(_shared.close)
        return _shared


def call_with_limit(fn: Callable[..., float], response: str, truth: str, *, timeout_s: float,
                    **kwargs) -> float | None:
    """`fn(response, truth, timeout_s=timeout_s, **kwargs)` under a hard limit of `timeout_s` in any context;
    None if it timed out. Main thread: SIGALRM; a pool worker: as is (the worker limits it); other threads:
    the shared pool."""
    if IN_WORKER:
        return fn(response, truth, timeout_s=timeout_s, **kwargs)
    if in_main_thread():
        try:
            with time_limit(timeout_s):
                return fn(response, truth, timeout_s=timeout_s, **kwargs)
        except RewardTimeout:
            return None
    return shared_pool().score(fn, [response], [truth], timeout_s=timeout_s, **kwargs)[0]


@dataclass
class RewardScorer:
    """Scores batches with one reward function and its options (the `reward.*` config) under a hard
    per-response limit: in `pool` when given and the function is importable there, else call by call with
    `call_with_limit`. A timed-out response scores `timeout_value`; returns (scores, number timed out)."""

    fn: Callable[..., float]
    timeout_s: float
    timeout_value: float
    options: dict = field(default_factory=dict)  # more keyword arguments of fn (e.g. format_penalty)
    pool: RewardPool | None = None

    def __call__(self, responses: list[str], truths: list[str]) -> tuple[list[float], int]:
        kwargs = {**self.options, "timeout_s": self.timeout_s}
        if self.pool is not None and getattr(self.fn, "__module__", "__main__") != "__main__":
            raw = self.pool.score(self.fn, responses, truths, **kwargs)
        else:
            raw = [call_with_limit(self.fn, r, t, **kwargs) for r, t in zip(responses, truths)]
        return [self.timeout_value if s is None else s for s in raw], sum(s is None for s in raw)
