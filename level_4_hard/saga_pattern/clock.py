"""Time for the saga: reading it, waiting, and calling a step with a timeout.

Everything in this package that waits or measures goes through a clock, so tests of retries
and timeouts never sleep:

* :class:`SystemClock` — real time. ``call(fn, timeout)`` runs ``fn`` on a worker thread (a
  small pool of reusable daemon threads) and waits for it at most ``timeout`` seconds. Python
  cannot stop a thread, so a step that overruns keeps running in the background: its late
  result is discarded, the step counts as failed with an *unknown* outcome, and the saga's
  compensations (idempotent, and recorded as tombstones by the services) make the final state
  right whether the late effect lands before or after them. A hung step holds only its own
  worker (the next call gets another), and never blocks the process from exiting.
* :class:`FakeClock` — time that moves only when code sleeps. ``call(fn, timeout)`` runs ``fn``
  inline and compares the fake time it took with the timeout afterwards: a step that "took"
  10 s against a 2 s timeout counts as timed out, deterministically, with its (late) effect
  applied — exactly the late-result case the compensation must repair.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol, TypeVar

from common.waiting import wait_until
from level_4_hard.saga_pattern.errors import StepTimeout

__all__ = ["Clock", "FakeClock", "SystemClock"]

T = TypeVar("T")


class Clock(Protocol):
    """What the orchestrator, the choreography and the services need from time."""

    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean something)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a backoff delay, a simulated slow service)."""
        ...

    def call(self, fn: Callable[[], T], timeout: float | None) -> T:
        """``fn()``, or StepTimeout when it takes longer than ``timeout`` (None: no limit)."""
        ...

    def close(self, timeout: float = 5.0) -> bool:
        """Wait for calls still running after their timeout; True if none is left."""
        ...


def _timeout_message(timeout: float) -> str:
    return f"no answer within {timeout:g}s"


class _DaemonWorkers:
    """Reusable daemon threads for timed calls: a call goes to an idle worker, or to a new
    one when all are busy (a hung call never blocks the others, nor the process's exit).
    A worker idle for ``idle_exit`` seconds ends."""

    def __init__(self, idle_exit: float = 30.0) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # workers waiting for a job, minus jobs queued and not yet taken
        self._busy = 0  # calls running (including the late ones)
        self.idle_exit = idle_exit

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            self._busy += 1
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # an idle worker is spoken for
        self._jobs.put((future, fn))
        if spawn:
            threading.Thread(target=self._work, name="saga-step", daemon=True).start()
        return future

    def busy(self) -> int:
        with self._lock:
            return self._busy

    def _work(self) -> None:
        while True:
            try:
                future, fn = self._jobs.get(timeout=self.idle_exit)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody counts on this worker: leave
                        self._idle -= 1
                        return
                continue  # a job was queued for this worker just now
            try:
                if future.set_running_or_notify_cancel():
                    future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._idle += 1
            del future, fn


class SystemClock:
    """Real time; timed calls run on daemon worker threads (see the module docstring)."""

    def __init__(self) -> None:
        self._workers = _DaemonWorkers()

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def call(self, fn: Callable[[], T], timeout: float | None) -> T:
        if timeout is None:
            return fn()
        future = self._workers.submit(fn)
        try:
            return future.result(timeout=timeout)
        except (TimeoutError, FutureTimeout):  # the same class from Python 3.11 on
            if future.done():  # finished in the instant between the deadline and now,
                return future.result()  # or fn itself raised a TimeoutError: either way, its answer
            future.cancel()  # still queued: it will never run
            raise StepTimeout(_timeout_message(timeout)) from None

    def stragglers(self) -> int:
        """How many calls are still running (timed-out ones finish in the background)."""
        return self._workers.busy()

    def close(self, timeout: float = 5.0) -> bool:
        """Wait up to ``timeout`` s for timed-out calls still running; True if none is left."""
        try:
            wait_until(lambda: self._workers.busy() == 0, timeout, interval=0.001)
        except TimeoutError:
            return False
        return True


class FakeClock:
    """Time that moves only when code calls :meth:`sleep` or :meth:`advance`.

    ``sleeps`` lists every sleep in order (the backoff delays a test asserts on). Timed calls
    run inline; one that made the fake time pass its timeout raises StepTimeout after it
    returns, its effect applied and its result discarded.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._now = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._now += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        """Move time forward without recording a sleep."""
        with self._lock:
            self._now += max(0.0, seconds)

    def call(self, fn: Callable[[], T], timeout: float | None) -> T:
        start = self.now()
        try:
            result = fn()
        except Exception:
            if timeout is not None and self.now() - start > timeout:
                # The caller would have stopped waiting at the deadline, before this error.
                raise StepTimeout(_timeout_message(timeout)) from None
            raise
        if timeout is not None and self.now() - start > timeout:
            raise StepTimeout(_timeout_message(timeout))
        return result

    def close(self, timeout: float = 0.0) -> bool:
        return True
