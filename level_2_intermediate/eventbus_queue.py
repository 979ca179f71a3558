"""QueuedEventBus: ``emit`` puts the event on a ``queue.Queue`` and returns; worker threads deliver.

Everything about subscribing, matching and the order of listeners comes from
:class:`common.base_eventbus.BaseEventBus`; this bus overrides only ``_deliver`` (enqueue instead
of calling) and adds the worker threads that call the shared ``_dispatch``.

Semantics:

* **Non-blocking emit, bounded memory.** ``emit``/``publish`` enqueue and return the Event. When
  the queue is full, ``emit`` waits up to ``put_timeout`` seconds for room, then raises
  :class:`QueueFullError` (backpressure): an event is either accepted (and will be delivered)
  or refused with an exception, never dropped.
* **Workers never die from a listener.** A listener that raises an ``Exception`` is retried —
  only that listener, after the event's other listeners ran — with capped exponential backoff
  (``backoff.delay(n)``), up to ``max_retries`` times; then the failure goes to ``bus.errors``
  (logged with the event id) and a :class:`DeadLetter` to ``bus.dead_letters``. Retries hold
  their worker (at most about ``max_retries * backoff.cap`` seconds per event): use more
  workers, or a smaller cap, if one flaky listener must not slow the rest.
* **A killed worker loses nothing that waits.** A listener that raises a ``BaseException``
  that is not an ``Exception`` (``SystemExit`` from a stray ``sys.exit()``,
  ``KeyboardInterrupt``, an exception injected into the thread) kills its worker thread: the
  event in flight is dead-lettered (which of its listeners ran is unknown), a new worker takes
  the dead one's place at once, and ``close()`` delivers whatever is still queued.
* **Ordering.** ``workers=1``: global FIFO — every listener sees events in emit order (a
  listener's retries finish before the next event starts). ``workers=K > 1``, one shared
  queue: events are *taken* in FIFO order and each event's listeners run in subscription order
  on one thread, but up to K events are delivered at once, so a later event may reach a
  listener before an earlier one. ``key=`` restores order where it matters: each worker gets its
  own queue and ``key(event)`` picks it, so events with equal keys are delivered in emit order
  (Kafka's per-partition order; ``maxsize`` is then split between the K queues).
* **Lifecycle.** Worker threads start at the first emit/publish or at ``start()``; nothing starts
  at import or construction, so a bus built before ``os.fork()`` works in the child (a bus
  already running is reset in the child: the parent's queued events stay the parent's).
  ``join(timeout)`` waits until everything queued so far, and everything listeners emitted
  meanwhile, was handled. ``close(timeout)`` stops taking events from outside (``emit`` raises
  :class:`BusClosedError`; listeners may still emit follow-ups while the queue drains), drains,
  and joins the threads; it is idempotent, and a context manager calls it. A bus never
  closed is drained at interpreter exit (for at most ``EXIT_DRAIN_TIMEOUT`` seconds).
* A listener that emits waits for room like any producer. With ``workers=1`` nobody makes
  room while it waits, so its emit fails after ``put_timeout``: size ``maxsize`` for the
  follow-up events listeners emit.
* ``on_done(event, failed)`` (optional) is called by the worker after all of an event's
  listeners finished — ``failed`` is True if any was dead-lettered — and before ``join`` can
  see the event as handled.

A refused emit (full or closed) still leaves the event in ``event_log``, which
``BaseEventBus.emit`` appends before it calls ``_deliver``.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from threading import get_ident
from typing import Any

from common.base_eventbus import Subscription
from common.events import Event
from common.logger import get_logger
from level_2_intermediate.delivery import DeadLetter, Failure, QueuedBusBase
from level_2_intermediate.errors import BusClosedError, Level2Error, QueueFullError

__all__ = [
    "EXIT_DRAIN_TIMEOUT",
    "BusClosedError",
    "DeadLetter",
    "Level2Error",
    "QueueFullError",
    "QueuedEventBus",
]

log = get_logger(__name__)

EXIT_DRAIN_TIMEOUT = 5.0
BATCH_LIMIT = 64  # most events a worker takes at once (only while listeners are fast)
FAST_EVENT = 50e-6  # seconds per event under which a listener counts as fast
_STOP = object()  # the sentinel that ends one worker
_Item = tuple[Event, tuple[Subscription, ...]]

# Buses with running workers: reset in a forked child, drained at interpreter exit.
_running_buses: weakref.WeakSet[QueuedEventBus] = weakref.WeakSet()
_atexit_registered = False


def _drain_at_exit() -> None:
    for bus in list(_running_buses):
        if not bus.close(timeout=EXIT_DRAIN_TIMEOUT):
            log.error("%r did not drain within %.1fs at exit", bus, EXIT_DRAIN_TIMEOUT)


class _BatchQueue(queue.Queue):  # type: ignore[type-arg]
    """A ``queue.Queue`` whose consumer can take several items per lock acquisition.

    Taking and acknowledging events one at a time costs a worker two lock round trips per
    event, as much as a cheap listener call itself; a batch pays them once. A worker takes its
    fair share of what waits (``ceil(waiting / share)``, at most ``limit``), so K workers
    sharing a queue stay balanced, and an idle queue hands out single events at once.
    """

    def get_batch(self, share: int, limit: int) -> list[Any]:
        with self.not_empty:
            while not self._qsize():
                self.not_empty.wait()
            n = min(limit, -(-self._qsize() // share))
            get = self._get
            batch = [get() for _ in range(n)]
            self.not_full.notify(n)
            return batch

    def unget(self, items: list[Any]) -> None:
        """Put taken, unhandled items back at the front, in order (they stay unfinished)."""
        if items:
            with self.mutex:
                self.queue.extendleft(reversed(items))
                self.not_empty.notify(len(items))

    def tasks_done(self, n: int) -> None:
        """``task_done()`` for ``n`` items at once."""
        if n:
            with self.all_tasks_done:
                unfinished = self.unfinished_tasks - n
                if unfinished <= 0:
                    if unfinished < 0:
                        raise ValueError("tasks_done() called too many times")
                    self.all_tasks_done.notify_all()
                self.unfinished_tasks = unfinished


class QueuedEventBus(QueuedBusBase):
    """A bus whose ``emit`` enqueues; ``workers`` threads deliver. See the module docstring.

    Options (all but ``workers`` and ``maxsize`` keyword-only), as :class:`QueuedBusBase`:
    ``workers=2, maxsize=10_000, put_timeout=5.0, max_retries=3,
    backoff=Backoff(base=0.01, cap=1.0), on_done=None, key=None, history_limit=10_000,
    error_limit=1_000``. With ``key``, ``maxsize`` is split between the per-worker queues.
    """

    def _init_runtime(self) -> None:
        # The parts that belong to one process: locks, queues, threads.
        self._state_lock = threading.Lock()
        self._close_lock = threading.Lock()
        n_queues = 1 if self._key is None else self.workers
        per_queue = -(-self.maxsize // n_queues)  # ceil; 0 stays 0 (unbounded)
        self._queues = [_BatchQueue(per_queue) for _ in range(n_queues)]
        self._queue = self._queues[0]
        self._threads: list[threading.Thread | None] = [None] * self.workers
        self._worker_ids: set[int] = set()
        self._accepting = False  # workers running and the bus open: the fast path of emit
        self._stopping = False  # close() is stopping the workers: no replacements

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> QueuedEventBus:
        """Start the worker threads now (otherwise the first emit does). Returns the bus."""
        with self._state_lock:
            if self._closing:
                raise BusClosedError(f"{self!r} is closed; it cannot start again")
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        global _atexit_registered
        if self._accepting:
            return
        if not _atexit_registered:
            atexit.register(_drain_at_exit)
            _atexit_registered = True
        _running_buses.add(self)
        for index in range(self.workers):
            self._spawn(index)
        self._accepting = True

    def _spawn(self, index: int) -> None:
        q = self._queues[index % len(self._queues)]
        thread = threading.Thread(
            target=self._work,
            args=(index, q),
            name=f"{type(self).__name__}-{id(self):x}-worker-{index}",
            daemon=True,  # never blocks interpreter exit; _drain_at_exit drains first
        )
        self._threads[index] = thread
        thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every event queued so far was handled; False if ``timeout`` passed first.

        Events that listeners emit while this waits are waited for too.
        """
        if get_ident() in self._worker_ids:
            raise RuntimeError("join() called from a listener would wait for itself")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            idle = True
            for q in self._queues:
                with q.all_tasks_done:
                    while q.unfinished_tasks:
                        idle = False
                        if deadline is None:
                            q.all_tasks_done.wait()
                            continue
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return False
                        q.all_tasks_done.wait(remaining)
            if idle:  # a whole pass over every queue found nothing: done
                return True

    def close(self, timeout: float | None = None) -> bool:
        """Stop taking events, drain the queue, stop the workers. Idempotent.

        Returns True when everything was delivered and every worker stopped within
        ``timeout``; otherwise False, and the workers finish the rest in the background.
        """
        if get_ident() in self._worker_ids:
            raise RuntimeError("close() called from a listener would wait for itself")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._close_lock:
            if self._closed:
                return self._close_result
            with self._state_lock:
                self._closing = True
                started = self._accepting
                self._accepting = False
            if not started:
                self._closed = True
                return True
            drained = self.join(_remaining(deadline))
            stopped = self._stop_workers(deadline)
            self._closed = True
            if stopped:
                self._drain_here()  # what a dead worker left, and emits that raced close()
            else:
                left = self.qsize()
                log.warning("%r: close timed out with %d event(s) still queued", self, left)
            _running_buses.discard(self)
            self._close_result = drained and stopped
            return self._close_result

    def _stop_workers(self, deadline: float | None) -> bool:
        with self._state_lock:
            self._stopping = True
            threads = [(i, t) for i, t in enumerate(self._threads) if t is not None]
        try:
            for index, _ in threads:
                self._queues[index % len(self._queues)].put(_STOP, timeout=_remaining(deadline))
        except queue.Full:
            return False
        for _, thread in threads:
            thread.join(_remaining(deadline))
        return not any(thread.is_alive() for _, thread in threads)

    def __enter__(self) -> QueuedEventBus:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def qsize(self) -> int:
        """Events waiting for a worker (not counting those being delivered)."""
        return sum(q.qsize() for q in self._queues)

    def alive_workers(self) -> int:
        """Worker threads currently alive (for health checks)."""
        return sum(1 for t in self._threads if t is not None and t.is_alive())

    # -- the hook ---------------------------------------------------------------------------
    def _deliver(self, event: Event, subscriptions: tuple[Subscription, ...]) -> None:
        """Enqueue for the workers (the one hook overridden): see the module docstring."""
        if not self._accepting:
            self._admit_slow()
        q = self._queue if self._key is None else self._partition(event)
        item = (event, subscriptions)
        try:
            q.put_nowait(item)
        except queue.Full:
            self._put_waiting(q, item)
        if self._closed:  # close() finished while this emit was on its way: deliver it here
            self._drain_here()

    def _admit_slow(self) -> None:
        with self._state_lock:
            if self._closing:
                if get_ident() in self._worker_ids and not self._stopping:
                    return  # a listener's follow-up event while the queue drains
                raise BusClosedError(f"{self!r} is closed: the event was not accepted")
            self._start_locked()

    def _partition(self, event: Event) -> _BatchQueue:
        assert self._key is not None
        return self._queues[hash(self._key(event)) % len(self._queues)]

    def _put_waiting(self, q: _BatchQueue, item: _Item) -> None:
        try:
            if self.put_timeout is None or self.put_timeout > 0:
                q.put(item, timeout=self.put_timeout)
                return
        except queue.Full:
            pass
        event = item[0]
        raise QueueFullError(
            f"queue full ({q.maxsize} events waiting) for {self.put_timeout}s: "
            f"{event.name} [{event.id}] was not accepted"
        )

    # -- the workers ------------------------------------------------------------------------
    def _work(self, index: int, q: _BatchQueue) -> None:
        bucket = self._collect_failures()
        tid = get_ident()
        self._worker_ids.add(tid)
        share = self.workers if len(self._queues) == 1 else 1
        dispatch = self._dispatch
        limit = 1  # batch size: grows while listeners are fast, back to 1 when they are slow
        clock = time.perf_counter
        try:
            while True:
                try:
                    batch = q.get_batch(share, limit)
                except BaseException as exc:  # killed while idle: nothing was in flight
                    self._replace(index, exc)
                    return
                handled = 0
                began = clock()
                try:
                    for item in batch:
                        if item is _STOP:
                            handled += 1
                            q.unget(batch[handled:])  # what follows is another worker's
                            return
                        event, subscriptions = item
                        try:
                            dispatch(event, subscriptions)
                            failed = bool(bucket) and self._settle(event, bucket)
                            if self._on_done is not None:
                                self._notify_done(event, failed)
                        except BaseException as exc:
                            handled += 1
                            bucket.clear()
                            q.unget(batch[handled:])  # the replacement takes them, in order
                            self._worker_died(event, exc, threading.current_thread().name)
                            if self._on_done is not None:
                                self._notify_done(event, True)
                            self._replace(index, exc)
                            return
                        handled += 1
                finally:
                    q.tasks_done(handled)
                if clock() - began < FAST_EVENT * len(batch):
                    limit = min(BATCH_LIMIT, limit * 2)
                else:
                    limit = 1  # slow listeners: hold one event, leave the rest in the queue
        finally:
            self._worker_ids.discard(tid)
            self._stop_collecting()

    def _settle(self, event: Event, bucket: list[Failure]) -> bool:
        """Retry the event's failed listeners; True if any ended as a dead letter."""
        gave_up = self._retry_failed(event, bucket)
        for (sub, exc), attempts in gave_up:
            self._give_up(event, sub, exc, attempts)
        return bool(gave_up)

    def _notify_done(self, event: Event, failed: bool) -> None:
        assert self._on_done is not None
        try:
            self._on_done(event, failed)
        except Exception:
            log.exception("on_done callback failed for %s [%s]", event.name, event.id)

    def _replace(self, index: int, exc: BaseException) -> None:
        with self._state_lock:
            if self._stopping or not (self._accepting or self._closing):
                return
            log.warning("starting a new worker in place of one killed by %s", type(exc).__name__)
            self._spawn(index)

    def _drain_here(self) -> None:
        """Deliver in the calling thread whatever is still queued (no worker is left)."""
        bucket = self._collect_failures()
        try:
            for q in self._queues:
                while True:
                    try:
                        item = q.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        if item is not _STOP:
                            event, subscriptions = item
                            self._dispatch(event, subscriptions)
                            failed = bool(bucket) and self._settle(event, bucket)
                            if self._on_done is not None:
                                self._notify_done(event, failed)
                    finally:
                        q.task_done()
        finally:
            self._stop_collecting()

    def _after_fork_in_child(self) -> None:
        # Locks may have been held by a parent thread at the fork, and the parent's threads do
        # not exist here: start afresh. Events the parent queued are the parent's to deliver.
        super()._after_fork_in_child()  # the base bus's lock and dispatch state
        self._collectors = {}
        self._init_runtime()
        _running_buses.discard(self)  # re-added if the child starts it

    def _running(self) -> bool:
        return self._accepting


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())
