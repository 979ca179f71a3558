"""ProcessEventBus: the QueuedEventBus API over ``multiprocessing.Queue`` and worker processes.

Use it when listeners are CPU-bound: each worker is a separate interpreter, so K workers use K
cores, which threads cannot do under the GIL. Matching, ordering of listeners, once-subscriptions
and the error policy are still BaseEventBus's: in the parent, ``BaseEventBus._due`` selects the
subscriptions due for an event (by the rule ``_dispatch`` applies); the event then travels to a
worker in the one wire format (``Event.to_json_bytes``) with references to those listeners
(pickled once, at subscribe), and the worker calls them with the same retry policy as the
thread bus.

Semantics (as QueuedEventBus, plus what processes change):

* ``emit`` returns at once; ``maxsize`` bounds the events accepted but not yet handled, and a
  full bus raises :class:`QueueFullError` after ``put_timeout`` seconds.
* A listener's exception is retried in its worker with backoff, then comes back to the parent:
  ``bus.errors`` and ``bus.dead_letters`` hold the original exception when it can be pickled,
  else a :class:`RemoteListenerError`; either way ``__cause__`` holds the remote traceback.
* **A killed worker process** (SIGKILL, the OOM killer, a crash in C code) is noticed at once
  and replaced; the events it had not started are sent to its replacement, in order, and the
  event it was delivering is delivered again — at-least-once, so listeners should be
  idempotent (the shop's services skip event ids they have seen). An event whose delivery kills
  a worker ``max_retries + 1`` times becomes a dead letter with :class:`WorkerDiedError`.
  A listener that raises ``SystemExit`` ends its worker the same way, without redelivery.
* Ordering: ``workers=1`` is global FIFO; with ``key=`` events with equal keys are delivered
  in emit order; otherwise each event goes to the worker with the fewest events outstanding.
* Workers start (``spawn`` by default) at the first emit or ``start()``, which waits until
  each has imported the listeners' modules and said it is ready.

Limits — what a learner should know before choosing processes:

* Listeners must be importable: module-level functions, or picklable callables. Lambdas,
  nested functions and objects holding locks, files or sockets are refused at ``subscribe``
  with :class:`ListenerNotPicklableError`. Under ``spawn`` a function defined in ``__main__``
  works only when the main module is a file guarded by ``if __name__ == "__main__"``.
* Listeners run in another process: what they change in memory stays there. Share state
  through ``multiprocessing.Manager`` objects (as ``main.py --bus process`` does), a file or
  a database. A listener cannot emit on the parent's bus.
* Event data must be JSON (the wire format); ``emit`` raises InvalidEventError otherwise.
* Every event costs a round trip between processes (tens of microseconds): for cheap
  listeners the thread bus is much faster (see ``benchmarks/bench_queue.py``).
* Workers are daemonic (they cannot start processes of their own), ignore Ctrl-C (the parent
  decides: ``close()`` drains them), and exit by themselves if the parent dies.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from common.base_eventbus import Listener, Subscription, listener_name
from common.events import Event
from common.logger import configure_logging, get_logger
from common.patterns import validate_pattern
from common.retry import Backoff
from level_2_intermediate.delivery import (
    DeadLetter,
    QueuedBusBase,
    RetryingDispatch,
)
from level_2_intermediate.errors import (
    BusClosedError,
    BusError,
    ListenerNotPicklableError,
    QueueFullError,
    RemoteListenerError,
    RemoteTraceback,
    WorkerDiedError,
)

__all__ = ["DeadLetter", "ProcessEventBus"]

log = get_logger(__name__)

START_TIMEOUT = 60.0  # seconds a worker may take to import and say it is ready
EXIT_DRAIN_TIMEOUT = 5.0
_PARENT_CHECK = 0.5  # how often an idle worker checks that its parent is alive

# (pattern, pickled listener) for each listener due, in subscription order
_Refs = tuple[tuple[str, bytes], ...]
# what a worker reports per listener that gave up: (index in refs, packed exception, attempts)
_Report = list[tuple[int, tuple[bytes | None, str, str, str], int]]

_running_buses: weakref.WeakSet[ProcessEventBus] = weakref.WeakSet()
_atexit_registered = False


def _drain_at_exit() -> None:
    for bus in list(_running_buses):
        bus.close(timeout=EXIT_DRAIN_TIMEOUT)


# -- the worker process ---------------------------------------------------------------------
class _WorkerRunner(RetryingDispatch):
    """The worker's side: BaseEventBus._dispatch plus the shared retries, no subscriptions."""


def _pack_exception(exc: BaseException) -> tuple[bytes | None, str, str, str]:
    """An exception as (pickle or None, type name, message, traceback text)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception:
        message = f"<{type(exc).__name__}: str() failed>"
    try:
        blob: bytes | None = pickle.dumps(exc)
        pickle.loads(blob)  # exceptions with required arguments fail only when loaded
    except Exception:
        blob = None
    return blob, type(exc).__qualname__, message, text


def _unpack_exception(packed: tuple[bytes | None, str, str, str]) -> BaseException:
    blob, type_name, message, text = packed
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteListenerError(type_name, message)
    exc.__cause__ = RemoteTraceback(text)
    return exc


def _worker_main(
    index: int,
    tasks: Any,
    results: multiprocessing.connection.Connection,
    max_retries: int,
    backoff: Backoff,
    log_level: int,
) -> None:
    """Entry point of a worker process (importable, so spawn can start it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent to handle
    configure_logging(log_level)
    parent = os.getppid()
    runner = _WorkerRunner(max_retries=max_retries, backoff=backoff, history_limit=0)
    bucket = runner._collect_failures()
    listeners: dict[bytes, Listener] = {}
    results.send(("ready", os.getpid()))
    while True:
        try:
            item = tasks.get(timeout=_PARENT_CHECK)
        except queue.Empty:
            if os.getppid() != parent:
                return  # the parent died: nobody will read our results
            continue
        if item is None:
            return
        seq, payload, refs = item
        report: _Report = []
        try:
            event = Event.from_json(payload)
            subs = []
            for i, (pattern, blob) in enumerate(refs):
                fn = listeners.get(blob)
                if fn is None:
                    try:
                        fn = listeners[blob] = pickle.loads(blob)
                    except Exception as exc:  # its module cannot be imported here
                        report.append((i, _pack_exception(exc), 1))
                        continue
                subs.append(Subscription(runner, pattern, fn, False, i))
            runner._dispatch(event, tuple(subs))
            if bucket:
                for (sub, exc), attempts in runner._retry_failed(event, bucket):
                    report.append((sub.seq, _pack_exception(exc), attempts))
        except BaseException as exc:  # SystemExit & co. from a listener: this worker ends
            bucket.clear()
            results.send(("killed", seq, _pack_exception(exc)))
            return
        results.send(("done", seq, sorted(report)))


# -- the parent -----------------------------------------------------------------------------
@dataclass
class _Task:
    seq: int
    event: Event
    payload: bytes
    refs: _Refs
    subs: list[Subscription]  # the subscriptions behind refs, in the same order
    deaths: int = 0


@dataclass
class _Worker:
    index: int
    process: Any
    tasks: Any  # multiprocessing.Queue
    results: multiprocessing.connection.Connection
    outstanding: deque[int] = field(default_factory=deque)  # seqs sent, in order
    ready: bool = False
    stop_sent: bool = False  # told to stop: its exit is expected
    killed_by_listener: bool = False  # reported its own end: nothing of it is in flight
    finished: bool = False  # its end was handled


class ProcessEventBus(QueuedBusBase):
    """The QueuedEventBus API with listeners running in worker processes (see the module).

    Takes QueuedEventBus's options (:class:`QueuedBusBase`) plus ``context``, the
    multiprocessing start method: ``"spawn"`` (default, safe everywhere), ``"forkserver"``
    (faster start-up on Linux) or ``"fork"`` (unsafe in a process that runs threads).
    """

    def __init__(self, *args: Any, context: str = "spawn", **options: Any) -> None:
        self._ctx = multiprocessing.get_context(context)
        # Each subscription's pickled listener, made once at subscribe. Weak: an entry lives
        # as long as its subscription (registered, or in an event still being delivered).
        self._blobs: weakref.WeakKeyDictionary[Subscription, bytes] = weakref.WeakKeyDictionary()
        super().__init__(*args, **options)

    def _init_runtime(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._close_lock = threading.Lock()
        self._seq = itertools.count()
        self._pending: dict[int, _Task] = {}
        self._outstanding = 0  # accepted and not yet handled (reserved slots included)
        self._workers: list[_Worker] = []
        self._accepting = False
        self._stopping = False
        self._broken: str | None = None
        self._collector: threading.Thread | None = None
        self._wake_r: multiprocessing.connection.Connection | None = None
        self._wake_w: multiprocessing.connection.Connection | None = None

    # -- subscriptions ----------------------------------------------------------------------
    def subscribe(self, pattern: str, callback: Listener, *, once: bool = False) -> Subscription:
        """As BaseEventBus.subscribe; ``callback`` must be picklable (see the module's limits)."""
        validate_pattern(pattern)
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        try:
            blob = pickle.dumps(callback)
        except Exception as exc:
            raise ListenerNotPicklableError(
                f"listener {listener_name(callback)} cannot be sent to a worker process "
                f"({type(exc).__name__}: {exc}). A ProcessEventBus listener must be a "
                "module-level function or a picklable callable; lambdas, nested functions and "
                "objects holding locks, files or sockets cannot be sent. Share state through "
                "multiprocessing.Manager objects."
            ) from exc
        with self._lock:  # an emit can match the subscription only once its blob is stored
            sub = super().subscribe(pattern, callback, once=once)
            self._blobs.setdefault(sub, blob)  # a duplicate keeps its first blob
        return sub

    def __reduce__(self) -> Any:
        raise TypeError(
            "a ProcessEventBus cannot be sent to a worker process; subscribe listeners that do "
            "not hold a reference to the bus"
        )

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> ProcessEventBus:
        """Start the worker processes and wait until each is ready. Returns the bus."""
        with self._cond:
            if self._closing:
                raise BusClosedError(f"{self!r} is closed; it cannot start again")
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        global _atexit_registered
        if self._accepting:
            return
        if self._broken:
            raise BusError(self._broken)
        self._wake_r, self._wake_w = multiprocessing.connection.Pipe(duplex=False)
        self._workers = [self._spawn(i) for i in range(self.workers)]
        if not _atexit_registered:
            # After multiprocessing registered its own exit handler (which terminates daemonic
            # workers): atexit runs the last registered first, so the drain comes before.
            atexit.register(_drain_at_exit)
            _atexit_registered = True
        deadline = time.monotonic() + START_TIMEOUT
        for worker in self._workers:
            self._wait_ready(worker, deadline)
        _running_buses.add(self)
        self._collector = threading.Thread(
            target=self._collect, name=f"{type(self).__name__}-{id(self):x}-collector", daemon=True
        )
        self._collector.start()
        self._accepting = True

    def _spawn(self, index: int) -> _Worker:
        tasks = self._ctx.Queue()
        reader, writer = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_worker_main,
            args=(
                index,
                tasks,
                writer,
                self.max_retries,
                self.backoff,
                logging.getLogger("eda").getEffectiveLevel(),
            ),
            name=f"{type(self).__name__}-worker-{index}",
            daemon=True,
        )
        process.start()
        writer.close()  # the child holds the only write end: EOF when it dies
        return _Worker(index, process, tasks, reader)

    def _wait_ready(self, worker: _Worker, deadline: float) -> None:
        remaining = max(0.0, deadline - time.monotonic())
        ready = multiprocessing.connection.wait(
            [worker.results, worker.process.sentinel], remaining
        )
        if worker.results in ready:
            try:
                message = worker.results.recv()
            except (EOFError, OSError):
                message = None
            if message and message[0] == "ready":
                worker.ready = True
                return
        for other in self._workers:
            self._discard(other, kill=True)
        self._workers = []
        for conn in (self._wake_r, self._wake_w):
            if conn is not None:
                conn.close()
        code = worker.process.exitcode
        raise BusError(
            f"worker process {worker.index} did not start within {START_TIMEOUT:.0f}s"
            if code is None
            else f"worker process {worker.index} exited with code {code} before it was ready"
        )

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every event accepted so far was handled; False if ``timeout`` passed."""
        with self._cond:
            return self._cond.wait_for(lambda: self._outstanding == 0, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Stop taking events, drain, stop the workers and the collector. Idempotent.

        If the drain does not finish within ``timeout``, the workers are terminated and what
        they had not delivered is dead-lettered (WorkerDiedError): nothing vanishes.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._close_lock:
            if self._closed:
                return self._close_result
            with self._cond:
                self._closing = True
                started = self._accepting
                self._accepting = False
                self._cond.notify_all()  # emits waiting for room give up now
            if not started:
                self._closed = True
                return True
            drained = self.join(_remaining(deadline))
            with self._cond:
                self._stopping = True
                workers = list(self._workers)
            for worker in workers:
                worker.stop_sent = True
                worker.tasks.put(None)
            # Wait for the workers to end, but let the collector reap them: two threads
            # waiting for one child race in waitpid().
            running = {w.process.sentinel: w for w in workers}
            while running:
                timeout = _remaining(deadline)
                ended = multiprocessing.connection.wait(list(running), timeout)
                for sentinel in ended:
                    del running[sentinel]  # type: ignore[arg-type]
                if not ended and timeout is not None:
                    break  # out of time
            stopped = not running
            for worker in running.values():
                worker.process.kill()  # the collector dead-letters what it held
            self._stop_collector()
            for worker in self._workers:
                self._discard(worker)
            self._fail_pending(WorkerDiedError("the bus was closed before this event was handled"))
            self._closed = True
            _running_buses.discard(self)
            self._close_result = drained and stopped
            return self._close_result

    def __enter__(self) -> ProcessEventBus:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def qsize(self) -> int:
        """Events waiting for a worker (each worker delivers the oldest of its own)."""
        # No lock: a snapshot is enough, and __repr__ (used in error messages raised while
        # the lock is held) calls this.
        return sum(max(0, len(w.outstanding) - 1) for w in list(self._workers))

    def alive_workers(self) -> int:
        """Worker processes running now (read without reaping: the collector reaps)."""
        workers = list(self._workers)
        sentinels = [w.process.sentinel for w in workers if w.process.pid is not None]
        ended = multiprocessing.connection.wait(sentinels, 0) if sentinels else []
        return len(sentinels) - len(ended)

    def worker_pids(self) -> list[int]:
        """The pids of the worker processes (for monitoring, and for tests that kill one)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    # -- the hook ---------------------------------------------------------------------------
    def _deliver(self, event: Event, subscriptions: tuple[Subscription, ...]) -> None:
        """Send the event and references to its due listeners to a worker process."""
        payload = event.to_json_bytes()  # InvalidEventError before anything is claimed
        with self._cond:
            if self._broken:
                raise BusError(self._broken)
            if not self._accepting:
                if self._closing:
                    raise BusClosedError(f"{self!r} is closed: the event was not accepted")
                self._start_locked()
            if self.maxsize and self._outstanding >= self.maxsize:
                room = self.put_timeout is None or self.put_timeout > 0
                if not (
                    room
                    and self._cond.wait_for(
                        lambda: self._outstanding < self.maxsize or not self._accepting,
                        self.put_timeout,
                    )
                ):
                    raise QueueFullError(
                        f"queue full ({self._outstanding} events outstanding) for "
                        f"{self.put_timeout}s: {event.name} [{event.id}] was not accepted"
                    )
                if not self._accepting:
                    raise BusClosedError(f"{self!r} closed while {event.name} waited for room")
            worker = self._choose(event)  # a failing key() raises before anything is claimed
            due = self._due(subscriptions)
            refs = tuple((sub.pattern, self._blobs[sub]) for sub in due)
            task = _Task(next(self._seq), event, payload, refs, due)
            self._pending[task.seq] = task
            self._outstanding += 1
            self._send(worker, task)

    def _choose(self, event: Event) -> _Worker:
        if self._key is not None:
            return self._workers[hash(self._key(event)) % len(self._workers)]
        return min(self._workers, key=lambda w: len(w.outstanding))

    def _send(self, worker: _Worker, task: _Task) -> None:
        worker.outstanding.append(task.seq)
        worker.tasks.put((task.seq, task.payload, task.refs))

    # -- the collector thread ---------------------------------------------------------------
    def _collect(self) -> None:
        """Read results from every worker, and notice at once when one dies."""
        while True:
            try:
                if not self._collect_once():
                    return
            except Exception:  # a bug here must not leave join() waiting forever
                if self._stopping:
                    return
                log.exception("%r: the collector failed; it carries on", self)
                time.sleep(0.1)  # and does not spin if the failure repeats

    def _collect_once(self) -> bool:
        """One round of :meth:`_collect`; False when there is nothing left to watch."""
        assert self._wake_r is not None
        with self._cond:
            workers = [w for w in self._workers if not w.finished]
            if self._stopping and not workers:
                return False
        by_conn = {w.results: w for w in workers}
        by_sentinel = {w.process.sentinel: w for w in workers}
        ready = multiprocessing.connection.wait([self._wake_r, *by_conn, *by_sentinel], timeout=1.0)
        for obj in ready:
            if obj is self._wake_r:
                self._wake_r.recv_bytes()
                continue
            worker = by_conn[obj] if obj in by_conn else by_sentinel[obj]  # type: ignore[index]
            if worker.finished:
                continue
            if not self._read(worker) or obj in by_sentinel:
                self._worker_ended(worker)
        return True

    def _read(self, worker: _Worker) -> bool:
        """Handle every message waiting from ``worker``; False once its pipe is closed."""
        try:
            while worker.results.poll():
                self._handle(worker, worker.results.recv())
        except (EOFError, OSError):
            return False  # it died (maybe in the middle of a message, which is dropped)
        return True

    def _handle(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            return
        seq = message[1]
        with self._cond:
            task = self._pending.pop(seq, None)
            if seq in worker.outstanding:
                worker.outstanding.remove(seq)  # the leftmost: a worker goes in order
            if kind == "killed":
                worker.killed_by_listener = True
        if task is None:
            return
        if kind == "killed":
            exc = _unpack_exception(message[2])
            self._worker_died(task.event, exc, f"worker process {worker.index}")
            self._finish(task, True)
            return
        report: _Report = message[2]
        for i, packed, attempts in report:
            self._give_up(task.event, task.subs[i], _unpack_exception(packed), attempts)
        self._finish(task, bool(report))

    def _finish(self, task: _Task, failed: bool) -> None:
        if self._on_done is not None:
            try:
                self._on_done(task.event, failed)
            except Exception:
                log.exception("on_done callback failed for %s [%s]", task.event.name, task.event.id)
        with self._cond:
            self._outstanding -= 1
            self._cond.notify_all()

    def _worker_ended(self, worker: _Worker) -> None:
        """A worker process ended: replace it, and re-send (or dead-letter) what it held."""
        worker.process.join(5)
        code = worker.process.exitcode
        expected = worker.killed_by_listener or worker.stop_sent
        with self._cond:
            replace = not self._stopping and self._broken is None
        if replace and not worker.ready:
            # It died before it could even start: starting another would loop forever.
            self._broken = f"worker process {worker.index} exited with code {code} at start"
            replace = False
        replacement = self._spawn(worker.index) if replace else None
        poisoned: list[_Task] = []
        with self._cond:
            left = [self._pending[s] for s in worker.outstanding if s in self._pending]
            worker.outstanding.clear()
            worker.finished = True
            if left and not expected:
                first = left[0]  # a worker delivers its events in order: this was in flight
                first.deaths += 1
                if first.deaths > self.max_retries:
                    poisoned.append(left.pop(0))
            if replacement is not None:
                self._workers[worker.index] = replacement
                for task in left:
                    self._send(replacement, task)
                left = []
        self._discard(worker)
        if not expected:
            log.error(
                "worker process %d (pid %s) died with exit code %s%s",
                worker.index,
                worker.process.pid,
                code,
                "; started it again" if replacement is not None else "",
            )
        for task in poisoned + left:
            self._give_up_task(task, WorkerDiedError(_died(worker, code, task)))

    def _give_up_task(self, task: _Task, exc: WorkerDiedError) -> None:
        with self._cond:
            if self._pending.pop(task.seq, None) is None:
                return
        self.dead_letters.append(DeadLetter(task.event, None, None, exc, max(1, task.deaths)))
        log.error("dead-lettered %s [%s]: %s", task.event.name, task.event.id, exc)
        self._finish(task, True)

    def _fail_pending(self, exc: WorkerDiedError) -> None:
        with self._cond:
            tasks = list(self._pending.values())
        for task in tasks:
            self._give_up_task(task, exc)

    def _discard(self, worker: _Worker, *, kill: bool = False) -> None:
        if kill and worker.process.is_alive():
            worker.process.kill()
        if kill or not worker.process.is_alive():
            worker.process.join(5)
        worker.tasks.close()
        worker.tasks.cancel_join_thread()  # its reader is gone: never wait to flush to it
        worker.results.close()
        worker.finished = True

    def _stop_collector(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send_bytes(b"stop")
        if self._collector is not None:
            self._collector.join(10)
        for conn in (self._wake_r, self._wake_w):
            if conn is not None:
                conn.close()

    def _after_fork_in_child(self) -> None:
        # The parent's processes, pipes and collector thread are not ours: start afresh.
        super()._after_fork_in_child()  # the base bus's lock and dispatch state
        self._collectors = {}
        self._init_runtime()
        _running_buses.discard(self)

    def _running(self) -> bool:
        return self._accepting


def _died(worker: _Worker, code: int | None, task: _Task) -> str:
    return (
        f"worker process {worker.index} died (exit code {code}) while {task.event.name} "
        f"[{task.event.id}] was outstanding ({task.deaths} death(s) during its delivery)"
    )


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())
