"""AsyncEventBus: the queued bus for asyncio — ``await bus.emit(...)``, coroutine listeners.

Subscribing, matching, the order of listeners, once-subscriptions, the event log and the error
records are BaseEventBus's. ``_deliver`` puts the matched event on an ``asyncio.Queue``; worker
tasks take it, ask ``BaseEventBus._due`` which subscriptions are due (the rule ``_dispatch``
applies: cancelled ones skipped, once-subscriptions claimed), and await them one by one, in
subscription order.

Semantics:

* ``await bus.emit(name, data)`` / ``await bus.publish(event)`` return the Event as soon as it
  is queued. When ``maxsize`` events are waiting, ``emit`` awaits room for ``put_timeout``
  seconds, then raises :class:`QueueFullError` — and, unlike the thread bus, a refused event is
  not in ``event_log``: room is reserved before the event is created.
* Listeners may be coroutine functions (awaited) or plain functions (called in the loop: keep
  them short, they block every other task while they run). A listener that raises is retried
  alone, after the event's other listeners, with ``await asyncio.sleep(backoff.delay(n))``
  (the loop keeps running), up to ``max_retries``; then it goes to ``bus.errors`` and
  ``bus.dead_letters``. A worker task cancelled in the middle of an event is replaced; that
  event is dead-lettered.
* Ordering: ``workers=1`` is global FIFO; ``workers=K`` runs up to K events concurrently (their
  listeners interleave at each ``await``); ``key=`` gives each worker its own queue, so events
  with equal keys are delivered in emit order.
* ``await bus.join(timeout)`` -> bool waits for everything queued, follow-ups included;
  ``await bus.close(timeout)`` stops taking events from outside, drains, and stops the worker
  tasks (``async with bus`` does it). Close the bus before its event loop ends: events still
  queued when the loop cancels the workers are not delivered (an error is logged).
* The bus belongs to the event loop it starts on (the first emit or ``start()``). From another
  thread, use ``bus.emit_threadsafe(...)``, which returns a ``concurrent.futures.Future``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
from typing import Any

from common.base_eventbus import BaseEventBus, Subscription
from common.events import Event
from common.logger import get_logger
from level_2_intermediate.delivery import DeadLetter, Failure, QueuedBusBase
from level_2_intermediate.errors import BusClosedError, QueueFullError

__all__ = ["AsyncEventBus", "DeadLetter"]

log = get_logger(__name__)

# Which bus's worker (if any) runs the current task: a listener's follow-up emits are accepted
# while the bus drains, and join()/close() from a listener would wait for themselves.
_worker_of: contextvars.ContextVar[AsyncEventBus | None] = contextvars.ContextVar(
    "eda_async_worker", default=None
)


class AsyncEventBus(QueuedBusBase):
    """An asyncio bus with coroutine listeners and worker tasks (see the module docstring).

    Options as QueuedEventBus (:class:`QueuedBusBase`): ``workers=2, maxsize=10_000,
    put_timeout=5.0, max_retries=3, backoff, on_done, key, history_limit, error_limit``;
    ``on_done`` may be a coroutine function, and so may the listeners given to ``subscribe``.
    """

    def _init_runtime(self) -> None:
        # Created by start(), on the loop the bus belongs to.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: list[asyncio.Queue[Any]] = []
        self._tasks: list[asyncio.Task[None] | None] = []
        self._room: asyncio.Semaphore | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._idle: asyncio.Event | None = None
        self._outstanding = 0
        self._stopping = False

    # -- emitting ---------------------------------------------------------------------------
    async def emit(self, name: str, data: dict[str, Any] | None = None, **meta: Any) -> Event:  # type: ignore[override]
        """Queue an event (awaiting room if the queue is full); returns the Event."""
        await self._admit(name)
        try:
            return BaseEventBus.emit(self, name, data, **meta)
        except BaseException:
            self._give_back_room()
            raise

    async def publish(self, event: Event) -> Event:  # type: ignore[override]
        """Queue an existing Event (from a broker, a file, another bus)."""
        await self._admit(event.name)
        try:
            return BaseEventBus.publish(self, event)
        except BaseException:
            self._give_back_room()
            raise

    def emit_threadsafe(
        self, name: str, data: dict[str, Any] | None = None, **meta: Any
    ) -> concurrent.futures.Future[Event]:
        """``emit`` from another thread, once the bus runs on its loop."""
        if self._loop is None:
            raise RuntimeError("the bus has not started on an event loop yet")
        return asyncio.run_coroutine_threadsafe(self.emit(name, data, **meta), self._loop)

    async def _admit(self, name: str) -> None:
        if (self._closing and _worker_of.get() is not self) or self._stopping:
            raise BusClosedError(f"{self!r} is closed: {name} was not accepted")
        self.start()
        room = self._room
        if room is None:
            return
        if not room.locked():
            await room.acquire()  # free: returns at once
            return
        if self.put_timeout is not None and self.put_timeout <= 0:
            raise QueueFullError(f"queue full ({self.maxsize} events waiting): {name} refused")
        try:
            await asyncio.wait_for(room.acquire(), self.put_timeout)
        except asyncio.TimeoutError:
            raise QueueFullError(
                f"queue full ({self.maxsize} events waiting) for {self.put_timeout}s: "
                f"{name} was not accepted"
            ) from None

    def _give_back_room(self) -> None:
        if self._room is not None:
            self._room.release()

    def _deliver(self, event: Event, subscriptions: tuple[Subscription, ...]) -> None:
        """Queue for the worker tasks (the one hook overridden); room was reserved."""
        queues = self._queues
        q = queues[0] if self._key is None else queues[hash(self._key(event)) % len(queues)]
        q.put_nowait((event, subscriptions))
        self._outstanding += 1
        assert self._idle is not None
        self._idle.clear()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> AsyncEventBus:
        """Start the worker tasks on the running loop (the first emit does it otherwise)."""
        loop = asyncio.get_running_loop()
        if self._loop is not None:
            if loop is not self._loop:
                raise RuntimeError("this AsyncEventBus belongs to another event loop")
            if self._closing and _worker_of.get() is not self:
                raise BusClosedError(f"{self!r} is closed; it cannot start again")
            return self
        if self._closing:
            raise BusClosedError(f"{self!r} is closed; it cannot start again")
        self._loop = loop
        self._room = asyncio.Semaphore(self.maxsize) if self.maxsize else None
        self._idle = asyncio.Event()
        self._idle.set()
        n_queues = 1 if self._key is None else self.workers
        self._queues = [asyncio.Queue() for _ in range(n_queues)]
        self._tasks = [None] * self.workers
        for index in range(self.workers):
            self._spawn(index)
        return self

    def _spawn(self, index: int) -> None:
        assert self._loop is not None
        q = self._queues[index % len(self._queues)]
        context = contextvars.copy_context()
        context.run(_worker_of.set, self)
        # A task copies the context it is created in: create it inside ``context``.
        self._tasks[index] = context.run(self._loop.create_task, self._work(index, q))

    async def join(self, timeout: float | None = None) -> bool:
        """Wait until every event queued so far was handled; False if ``timeout`` passed."""
        if _worker_of.get() is self:
            raise RuntimeError("join() called from a listener would wait for itself")
        if self._idle is None:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self, timeout: float | None = None) -> bool:
        """Stop taking events, drain, stop the worker tasks. Idempotent.

        If the drain does not finish within ``timeout``, the workers are cancelled: the events
        in flight and those still queued are dead-lettered (nothing vanishes).
        """
        if _worker_of.get() is self:
            raise RuntimeError("close() called from a listener would wait for itself")
        if self._closed:
            return self._close_result
        self._closing = True
        if self._loop is None:
            self._closed = True
            return True
        drained = await self.join(timeout)
        self._stopping = True
        tasks = [t for t in self._tasks if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for q in self._queues:
            while not q.empty():
                event, _ = q.get_nowait()
                exc = BusClosedError("the bus was closed before this event was handled")
                self.dead_letters.append(DeadLetter(event, None, None, exc, 1))
                log.error("dead-lettered %s [%s]: %s", event.name, event.id, exc)
                self._handled()
        self._closed = True
        self._close_result = drained
        return drained

    async def __aenter__(self) -> AsyncEventBus:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def qsize(self) -> int:
        """Events waiting for a worker task."""
        return sum(q.qsize() for q in self._queues)

    def alive_workers(self) -> int:
        return sum(1 for t in self._tasks if t is not None and not t.done())

    # -- the workers ------------------------------------------------------------------------
    async def _work(self, index: int, q: asyncio.Queue[Any]) -> None:
        while True:
            try:
                event, subscriptions = await q.get()
            except asyncio.CancelledError:  # close(), or the event loop shutting down
                if not self._stopping and self._outstanding:
                    log.error(
                        "%r: a worker task was cancelled with %d event(s) not handled; "
                        "close the bus before its event loop ends",
                        self,
                        self._outstanding,
                    )
                raise
            if self._room is not None:
                self._room.release()
            try:
                failed = await self._run(event, self._due(subscriptions))
                await self._notify_done(event, failed)
            except BaseException as exc:  # cancelled from outside, SystemExit & co.
                self._worker_died(event, exc, "a worker task")
                if self._on_done is not None:
                    try:
                        result = self._on_done(event, True)
                        if inspect.isawaitable(result):  # this task is ending: not awaited here
                            later = asyncio.ensure_future(result)
                            self._background.add(later)
                            later.add_done_callback(self._background.discard)
                    except Exception:
                        log.exception("on_done callback failed for %s [%s]", event.name, event.id)
                self._handled()
                if not self._stopping:
                    log.warning("starting a new worker task in place of the killed one")
                    self._spawn(index)
                raise
            self._handled()

    async def _run(self, event: Event, due: list[Subscription]) -> bool:
        """Await each listener in order, retrying failures; True if any was dead-lettered."""
        failed: list[Failure] = []
        for sub in due:
            exc = await _call(event, sub)
            if exc is not None:
                failed.append((sub, exc))
        gave_up: list[tuple[Failure, int]] = []
        attempts = 1
        while failed and attempts <= self.max_retries:
            again, delay = self._next_round(event, failed, attempts, gave_up)
            if not again:
                failed = []  # every one of them went to gave_up
                break
            await asyncio.sleep(delay)
            attempts += 1
            failed = []
            for sub in again:
                exc = await _call(event, sub)
                if exc is not None:
                    failed.append((sub, exc))
        gave_up.extend((failure, attempts) for failure in failed)
        for (sub, exc), tries in gave_up:
            self._give_up(event, sub, exc, tries)
        return bool(gave_up)

    async def _notify_done(self, event: Event, failed: bool) -> None:
        if self._on_done is None:
            return
        try:
            result = self._on_done(event, failed)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_done callback failed for %s [%s]", event.name, event.id)

    def _handled(self) -> None:
        self._outstanding -= 1
        if self._outstanding == 0 and self._idle is not None:
            self._idle.set()

    def _running(self) -> bool:
        return self._loop is not None


async def _call(event: Event, sub: Subscription) -> Exception | None:
    """``BaseEventBus._call`` for the loop: a coroutine listener is awaited."""
    try:
        result = sub.callback(event)
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        return exc
    return None
