"""What the queue-backed buses share on top of BaseEventBus: retries and dead letters.

* :class:`DeadLetter` — an event that a listener could not handle after every retry.
* :class:`RetryingDispatch` — BaseEventBus whose worker threads retry a failing listener
  (only that one) with capped exponential backoff. It reuses ``BaseEventBus._dispatch`` as it
  is: while a worker delivers, ``_listener_failed`` collects the failures instead of recording
  them, and the failed subscriptions are called again (``BaseEventBus._call``) after the
  backoff. Only when the retries are used up does a failure take the base path
  (``bus.errors``, logged with the event id) and become a dead letter.
* :class:`QueuedBusBase` — the constructor options and lifecycle flags of the three buses.

The process and asyncio buses cannot let ``_dispatch`` call their listeners (those run in a
worker process, or must be awaited): they ask ``BaseEventBus._due`` which subscriptions are due
for an event (cancelled ones skipped, once-subscriptions claimed, in subscription order), run
them where they belong, and share the retry rounds through :meth:`RetryingDispatch._next_round`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from threading import get_ident
from typing import Any

from common.base_eventbus import BaseEventBus, Subscription, listener_name
from common.events import Event
from common.logger import get_logger
from common.retry import Backoff

__all__ = [
    "DEFAULT_BACKOFF",
    "DeadLetter",
    "Failure",
    "QueuedBusBase",
    "RetryingDispatch",
    "check_options",
]

log = get_logger(__name__)

DEFAULT_BACKOFF = Backoff(base=0.01, cap=1.0)
Failure = tuple[Subscription, Exception]


@dataclass(frozen=True)
class DeadLetter:
    """An event one listener could not handle: after ``attempts`` tries, or its worker died.

    ``pattern`` and ``listener`` (the listener's qualified name) are None when a worker died
    in the middle of the event, so which of its listeners had run is unknown.
    """

    event: Event
    pattern: str | None
    listener: str | None
    exception: BaseException = field(compare=False)
    attempts: int

    def __str__(self) -> str:
        who = f"listener {self.listener} ({self.pattern!r})" if self.listener else "a worker"
        return (
            f"{who} gave up on {self.event.name} [{self.event.id}] after {self.attempts} "
            f"attempt(s): {type(self.exception).__name__}: {self.exception}"
        )


def check_options(workers: int, maxsize: int, put_timeout: float | None, max_retries: int) -> None:
    """Validate the constructor options every queue-backed bus shares."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 1024:
        raise ValueError(f"workers must be an integer from 1 to 1024, got {workers!r}")
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
        raise ValueError(f"maxsize must be an integer >= 0 (0: unbounded), got {maxsize!r}")
    if put_timeout is not None and not put_timeout >= 0:
        raise ValueError(f"put_timeout must be None or >= 0 seconds, got {put_timeout!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")


class RetryingDispatch(BaseEventBus):
    """BaseEventBus plus per-listener retries and dead letters, for worker-based buses.

    A worker thread calls :meth:`_collect_failures` once, then for each event
    ``self._dispatch(event, subs)`` followed, if the returned bucket is not empty, by
    :meth:`_retry_failed`. Retries happen after the event's other listeners ran, in rounds:
    round ``n`` waits ``backoff.delay(n)`` and calls again every listener still failing. A
    listener unsubscribed meanwhile is not called again (its last failure is dead-lettered).
    """

    def __init__(
        self,
        *,
        max_retries: int = 3,
        backoff: Backoff = DEFAULT_BACKOFF,
        history_limit: int | None = 10_000,
        error_limit: int = 1_000,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(history_limit=history_limit, error_limit=error_limit)
        if not isinstance(backoff, Backoff):
            raise TypeError(f"backoff must be a common.retry.Backoff, got {backoff!r}")
        self.max_retries = max_retries
        self.backoff = backoff
        self.dead_letters: deque[DeadLetter] = deque(maxlen=error_limit)
        self._sleep = sleep
        # thread id -> the failures of the delivery that thread is running. Only worker
        # threads have an entry; anywhere else a failure takes the base path at once.
        self._collectors: dict[int, list[Failure]] = {}

    # -- failure collection -----------------------------------------------------------------
    def _collect_failures(self) -> list[Failure]:
        """Called by a worker thread before its first delivery; returns its bucket."""
        bucket: list[Failure] = []
        self._collectors[get_ident()] = bucket
        return bucket

    def _stop_collecting(self) -> None:
        self._collectors.pop(get_ident(), None)

    def _listener_failed(self, event: Event, sub: Subscription, exc: Exception) -> None:
        bucket = self._collectors.get(get_ident())
        if bucket is None:
            super()._listener_failed(event, sub, exc)
        else:
            bucket.append((sub, exc))

    # -- retries ----------------------------------------------------------------------------
    def _retry_failed(self, event: Event, bucket: list[Failure]) -> list[tuple[Failure, int]]:
        """Retry the failures in ``bucket`` (emptied); returns those that never succeeded.

        Each is returned with its number of attempts. The caller records them (in a thread
        bus with :meth:`_give_up`; a worker process sends them to its parent).
        """
        failed = list(bucket)
        bucket.clear()
        gave_up: list[tuple[Failure, int]] = []
        attempts = 1
        while failed and attempts <= self.max_retries:
            again, delay = self._next_round(event, failed, attempts, gave_up)
            if not again:
                return gave_up
            self._sleep(delay)
            attempts += 1
            failed = []
            for sub in again:
                exc = self._call(event, sub)
                if exc is not None:
                    failed.append((sub, exc))
        gave_up.extend((failure, attempts) for failure in failed)
        return gave_up

    def _next_round(
        self,
        event: Event,
        failed: list[Failure],
        attempts: int,
        gave_up: list[tuple[Failure, int]],
    ) -> tuple[list[Subscription], float]:
        """Plan the retry round after ``attempts`` tries: the subscriptions to call again, and
        the backoff to wait first (logged). A listener unsubscribed meanwhile goes to
        ``gave_up``; a once-subscription is retried, though no longer active: its claim (the
        first attempt) owns the retries."""
        again: list[Subscription] = []
        for failure in failed:
            sub = failure[0]
            if sub.once or sub.active:
                again.append(sub)
            else:
                gave_up.append((failure, attempts))
        delay = self.backoff.delay(attempts) if again else 0.0
        for sub in again:
            log.warning(
                "listener %s (%r) failed on %s [%s], attempt %d of %d; retrying in %.3fs",
                listener_name(sub.callback),
                sub.pattern,
                event.name,
                event.id,
                attempts,
                self.max_retries + 1,
                delay,
            )
        return again, delay

    def _give_up(self, event: Event, sub: Subscription, exc: BaseException, attempts: int) -> None:
        """Record a final failure: ``bus.errors`` (the base path, logged) and a dead letter."""
        self.dead_letters.append(
            DeadLetter(event, sub.pattern, listener_name(sub.callback), exc, attempts)
        )
        if isinstance(exc, Exception):
            try:
                BaseEventBus._listener_failed(self, event, sub, exc)
            except Exception:  # e.g. an exception whose str() fails, under a strict handler
                log.error(
                    "listener %s failed on %s [%s] with %s (its message cannot be shown)",
                    listener_name(sub.callback),
                    event.name,
                    event.id,
                    type(exc).__name__,
                )

    def _worker_died(self, event: Event, exc: BaseException, where: str) -> None:
        """Record an event whose delivery was cut short: which listeners ran is unknown."""
        log.critical(
            "%s was killed by %s while delivering %s [%s]; the event is dead-lettered",
            where,
            type(exc).__name__,
            event.name,
            event.id,
            exc_info=exc,
        )
        self.dead_letters.append(DeadLetter(event, None, None, exc, 1))


class QueuedBusBase(RetryingDispatch):
    """The options and lifecycle flags the thread, process and asyncio buses share.

    ``workers``: threads, processes or tasks that deliver; ``maxsize``: events waiting at most
    (0: unbounded, no backpressure); ``put_timeout``: seconds a full bus may keep ``emit``
    waiting before QueueFullError (None: forever); ``max_retries`` and ``backoff``: the retry
    policy; ``on_done(event, failed)``: called once all of an event's listeners finished;
    ``key(event)``: an ordering key (events with equal keys are delivered in emit order).
    Subclasses build their runtime in :meth:`_init_runtime`.
    """

    def __init__(
        self,
        workers: int = 2,
        maxsize: int = 10_000,
        *,
        put_timeout: float | None = 5.0,
        max_retries: int = 3,
        backoff: Backoff = DEFAULT_BACKOFF,
        on_done: Callable[[Event, bool], Any] | None = None,
        key: Callable[[Event], Hashable] | None = None,
        history_limit: int | None = 10_000,
        error_limit: int = 1_000,
    ) -> None:
        check_options(workers, maxsize, put_timeout, max_retries)
        super().__init__(
            max_retries=max_retries,
            backoff=backoff,
            history_limit=history_limit,
            error_limit=error_limit,
        )
        self.workers = workers
        self.maxsize = maxsize
        self.put_timeout = put_timeout
        self._on_done = on_done
        self._key = key
        self._closing = False  # no more events from outside (listeners may still emit)
        self._closed = False  # the workers are stopped
        self._close_result = True
        self._init_runtime()

    def _init_runtime(self) -> None:
        """Create what belongs to one process or loop: queues, locks, workers (none yet)."""
        raise NotImplementedError

    def _running(self) -> bool:
        raise NotImplementedError

    def qsize(self) -> int:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        """True once ``close()`` began: events from outside are refused."""
        return self._closing

    def __repr__(self) -> str:
        state = "closed" if self._closing else "running" if self._running() else "not started"
        return (
            f"<{type(self).__name__} {state} workers={self.workers} queued={self.qsize()} "
            f"subscriptions={len(self)} dead_letters={len(self.dead_letters)}>"
        )
