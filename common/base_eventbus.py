"""BaseEventBus: the one place where subscription and dispatch live.

Semantics, which every bus in the repository shares:

* ``subscribe(pattern, callback, *, once=False) -> Subscription``; a pattern may hold AMQP
  wildcards (``*`` one segment, ``#`` zero or more). Subscribing the same callback to the same
  pattern twice keeps one subscription (the first). Calling the Subscription, or its
  ``cancel()``, unsubscribes.
* ``emit(name, data=None, **meta) -> Event``: each matching subscription is called once, in the
  order the subscriptions were made, across exact and wildcard patterns.
* Error policy: a listener that raises does not stop the other listeners nor the emitter; the
  failure is logged with the event id and kept in ``errors`` (bounded). ``BaseException``s
  that are not ``Exception`` (KeyboardInterrupt, SystemExit) propagate.
* Thread safety: subscriptions are guarded by a lock; dispatch runs over an immutable snapshot
  of the matched subscriptions, outside the lock, so subscribing or unsubscribing during a
  dispatch (from any thread) never corrupts it. A subscription cancelled before its turn comes
  is skipped.
* Re-entrancy: an event emitted by a listener (in the same thread) is queued and dispatched
  after the current event's listeners finish — breadth first, never unbounded recursion.

Variants (queued, process, async, replayable) override one hook, :meth:`_deliver`: how a
matched event reaches its listeners. Matching, ordering, the log and the error policy stay here.
A variant that runs listeners where :meth:`_dispatch` cannot call them (a worker process, the
event loop) asks :meth:`_due` which subscriptions are due, by the same rule, and runs those.

Speed: matched subscriptions are cached per event name (invalidated on every change), so a
dispatch is one dict lookup however many subscriptions there are; the trie only runs on a miss.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from threading import get_ident
from typing import Any, TypeVar

from common.events import Event, new_event
from common.logger import get_logger
from common.patterns import PatternIndex, validate_name, validate_pattern
from common.speedups import speedups as _speedups

__all__ = ["BaseEventBus", "Listener", "ListenerError", "Subscription"]

log = get_logger(__name__)
Listener = Callable[[Event], Any]
F = TypeVar("F", bound=Callable[..., Any])
_MATCH_CACHE_LIMIT = 10_000
_Pending = tuple[Event, tuple["Subscription", ...]]  # an event queued behind the current one


class Subscription:
    """A live subscription. Call it, or ``cancel()`` it, to unsubscribe (idempotent)."""

    __slots__ = ("__weakref__", "_bus", "active", "callback", "once", "pattern", "seq")

    def __init__(
        self, bus: BaseEventBus, pattern: str, callback: Listener, once: bool, seq: int
    ) -> None:
        self._bus = bus
        self.pattern = pattern
        self.callback = callback
        self.once = once
        self.seq = seq
        self.active = True

    def cancel(self) -> bool:
        """Unsubscribe; True if this call removed it, False if it was already gone."""
        return self._bus._remove(self)

    __call__ = cancel

    def __repr__(self) -> str:
        name = getattr(self.callback, "__qualname__", repr(self.callback))
        state = "active" if self.active else "cancelled"
        return f"<Subscription {self.pattern!r} -> {name} ({state}{', once' if self.once else ''})>"


@dataclass(frozen=True)
class ListenerError:
    """A listener's failure, kept in ``bus.errors``."""

    event: Event
    pattern: str
    listener: str
    exception: BaseException = field(compare=False)

    def __str__(self) -> str:
        return (
            f"listener {self.listener} ({self.pattern!r}) failed on {self.event.name} "
            f"[{self.event.id}]: {type(self.exception).__name__}: {_safe_str(self.exception)}"
        )


def listener_name(callback: Callable[..., Any]) -> str:
    """A stable, readable name: the function's qualified name, or the callable's class name
    (never a repr with a memory address, which differs between processes)."""
    name = getattr(callback, "__qualname__", None)
    if isinstance(name, str):
        return name
    return f"{type(callback).__qualname__} instance"


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # an exception whose __str__ raises must not break error handling
        return f"<unprintable {type(exc).__name__}>"


# Every bus, so that a forked child can reset what the parent's threads may have held.
_all_buses: weakref.WeakSet[BaseEventBus] = weakref.WeakSet()


def _reset_buses_in_child() -> None:
    for bus in list(_all_buses):
        bus._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_buses_in_child)


class BaseEventBus:
    """The synchronous publish/subscribe core; see the module docstring for the semantics."""

    def __init__(self, *, history_limit: int | None = 10_000, error_limit: int = 1_000) -> None:
        self._lock = threading.RLock()
        self._index: PatternIndex[Subscription] = PatternIndex()
        self._by_key: dict[tuple[str, Listener], Subscription] = {}
        self._seq = itertools.count()
        # name -> tuple of subscriptions, in subscription order. Replaced (never mutated in
        # place) on every change, so a reader without the lock sees a consistent snapshot.
        self._matches: dict[str, tuple[Subscription, ...]] = {}
        self._busy: dict[int, deque[tuple[Event, tuple[Subscription, ...]]] | None] = {}
        self.event_log: deque[Event] = deque(maxlen=history_limit)
        self.errors: deque[ListenerError] = deque(maxlen=error_limit)
        # Where variants persist each emitted event before delivery (a file, a write-ahead
        # log): a callable taking the Event, or None. An attribute, not a method, because it
        # sits on the hot path of every emit.
        self._sink: Callable[[Event], None] | None = None
        _all_buses.add(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child: the parent's threads are gone, but a lock one of them held at the
        fork would stay held, and a dispatch in flight would look re-entrant. Start afresh.
        Subclasses with threads or queues of their own extend this."""
        self._lock = threading.RLock()
        self._busy = {}

    # -- subscriptions ----------------------------------------------------------------------
    def subscribe(self, pattern: str, callback: Listener, *, once: bool = False) -> Subscription:
        """Call ``callback(event)`` for every event whose name matches ``pattern``."""
        validate_pattern(pattern)
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        key = (pattern, callback)
        with self._lock:
            existing = self._by_key.get(key)
            if existing is not None:
                return existing
            sub = Subscription(self, pattern, callback, once, next(self._seq))
            self._by_key[key] = sub
            self._index.add(pattern, sub)
            self._matches = {}
        return sub

    def unsubscribe(self, pattern: str, callback: Listener) -> bool:
        """Remove ``callback`` from ``pattern``; False if it was not subscribed there."""
        validate_pattern(pattern)
        with self._lock:
            sub = self._by_key.get((pattern, callback))
            return sub is not None and self._remove(sub)

    def on(self, pattern: str, *, once: bool = False) -> Callable[[F], F]:
        """Decorator form of :meth:`subscribe`; returns the function unchanged."""

        def decorator(fn: F) -> F:
            self.subscribe(pattern, fn, once=once)
            return fn

        return decorator

    def once(self, pattern: str, callback: Listener) -> Subscription:
        """Subscribe for the first matching event only."""
        return self.subscribe(pattern, callback, once=True)

    def _remove(self, sub: Subscription) -> bool:
        with self._lock:
            if not sub.active:
                return False
            sub.active = False
            del self._by_key[(sub.pattern, sub.callback)]
            self._index.remove(sub.pattern, sub)
            self._matches = {}
            return True

    def subscriptions(self, name: str | None = None) -> list[Subscription]:
        """Every live subscription in order, or those that match event ``name``."""
        if name is not None:
            return list(self._match(name))
        with self._lock:
            return sorted(self._by_key.values(), key=lambda s: s.seq)

    def has_listeners(self, name: str) -> bool:
        return bool(self._match(name))

    def clear(self) -> None:
        """Remove every subscription (the event log and errors are kept)."""
        with self._lock:
            for sub in list(self._by_key.values()):
                self._remove(sub)

    def __len__(self) -> int:
        return len(self._by_key)

    def _match(self, name: str) -> tuple[Subscription, ...]:
        subs = self._matches.get(name)
        if subs is not None:
            return subs
        validate_name(name)
        with self._lock:  # compute and publish under the lock: a concurrent change waits
            matches = self._matches
            subs = tuple(sorted(self._index.match(name), key=lambda s: s.seq))
            if len(matches) >= _MATCH_CACHE_LIMIT:
                matches = self._matches = {}
            matches[name] = subs
        return subs

    # -- emitting ---------------------------------------------------------------------------
    def emit(self, name: str, data: dict[str, Any] | None = None, **meta: Any) -> Event:
        """Create an Event, record it, and deliver it to every matching listener.

        ``meta`` may hold ``version`` and ``correlation_id``. An invalid name or data that is
        not a dict raises (ValueError / InvalidEventError) before anything is recorded; so
        does data the sink cannot serialise. Returns the event.
        """
        subs = self._matches.get(name)
        if subs is None:
            subs = self._match(name)
        if meta or (data is not None and not isinstance(data, dict)):
            event = Event.create(name, data, **meta)
        else:
            event = new_event(name, data)
        if self._sink is not None:
            self._sink(event)
        self.event_log.append(event)
        self._deliver(event, subs)
        return event

    def publish(self, event: Event) -> Event:
        """Record and deliver an existing Event (from a broker, a file, another bus)."""
        subs = self._match(event.name)
        if self._sink is not None:
            self._sink(event)
        self.event_log.append(event)
        self._deliver(event, subs)
        return event

    def _deliver(self, event: Event, subscriptions: tuple[Subscription, ...]) -> None:
        """How a matched event reaches its listeners: the one hook that variants override.

        This bus: now, in the emitting thread. An event emitted by a listener is queued and
        dispatched after the current event's listeners (breadth first, no recursion).
        """
        # Per thread id: None while the thread is inside a dispatch, or the queue of events
        # its listeners emitted meanwhile (created only when one does). A dict keyed by thread
        # id costs less on this hot path than a threading.local.
        busy = self._busy
        tid = get_ident()
        if tid in busy:
            pending = busy[tid]
            if pending is None:
                pending = busy[tid] = deque()
            pending.append((event, subscriptions))
            return
        busy[tid] = None
        try:
            self._dispatch(event, subscriptions)
            pending = busy[tid]
            if pending is not None:
                while pending:
                    self._dispatch(*pending.popleft())
        finally:
            del busy[tid]

    @contextmanager
    def _delivering(self) -> Iterator[tuple[Callable[..., object], deque[_Pending]]]:
        """For one thread delivering many events in a row (a replay): ``(deliver, pending)``.

        Call ``deliver(event, subscriptions)`` per event, then drain ``pending`` (``while
        pending: deliver(*pending.popleft())``): what the listeners emitted, in the order
        :meth:`_deliver` gives. With the base hook the thread is marked as dispatching once
        for the whole loop and ``deliver`` is :meth:`_dispatch`, which saves the per-event
        bookkeeping; a variant's :meth:`_deliver` receives each event itself.
        """
        pending: deque[_Pending] = deque()
        if type(self)._deliver is not BaseEventBus._deliver:
            yield self._deliver, pending
            return
        tid = get_ident()
        if tid in self._busy:
            raise RuntimeError("this thread is already dispatching on this bus")
        self._busy[tid] = pending  # _deliver queues here, as for any emit inside a dispatch
        try:
            yield self._dispatch, pending
        finally:
            self._busy.pop(tid, None)

    def _dispatch(self, event: Event, subscriptions: tuple[Subscription, ...]) -> int:
        """Call each subscription with error isolation; returns how many listeners failed."""
        failures = 0
        for sub in subscriptions:
            # The rule of _due, inline (this loop is the hot path of every emit), checked as
            # each turn comes, so a subscription cancelled by an earlier listener is skipped.
            if not sub.active:
                continue
            if sub.once and not self._remove(sub):
                continue  # another thread fired this once-subscription first
            try:
                sub.callback(event)
            except Exception as exc:
                failures += 1
                self._listener_failed(event, sub, exc)
        return failures

    def _due(self, subscriptions: Iterable[Subscription]) -> list[Subscription]:
        """The subscriptions due for an event, in order, by the rule ``_dispatch`` applies.

        For buses that call listeners somewhere ``_dispatch`` cannot (a worker process, a
        coroutine awaited by the event loop): cancelled subscriptions are skipped and each
        once-subscription is claimed here, by exactly one caller across threads.
        """
        return [sub for sub in subscriptions if sub.active and (not sub.once or self._remove(sub))]

    @staticmethod
    def _call(event: Event, sub: Subscription) -> Exception | None:
        """Call one listener with error isolation: the exception it raised, or None.

        Nothing is recorded: the caller decides (``_listener_failed``, or a retry first).
        ``_dispatch`` inlines the same ``try`` for speed.
        """
        try:
            sub.callback(event)
        except Exception as exc:
            return exc
        return None

    def _listener_failed(self, event: Event, sub: Subscription, exc: Exception) -> None:
        error = ListenerError(event, sub.pattern, listener_name(sub.callback), exc)
        self.errors.append(error)
        log.error("%s", error, exc_info=exc)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} subscriptions={len(self)} events={len(self.event_log)}>"


# The C versions of emit, _deliver and _dispatch (common/_speedups.c), when the extension was
# built and EDA_PURE_PYTHON is not set: the same semantics, with every rare path (metadata, a
# name not yet matched, _remove, _listener_failed) still in the Python code above, which
# stays the reference.
_py_emit = BaseEventBus.emit
_py_deliver = BaseEventBus._deliver
_py_dispatch = BaseEventBus._dispatch
if _speedups is not None:
    _speedups.setup_bus(Subscription, deque, _py_emit)
    BaseEventBus.emit = _speedups.emit  # type: ignore[method-assign]
    BaseEventBus._deliver = _speedups.deliver  # type: ignore[method-assign]
    BaseEventBus._dispatch = _speedups.dispatch  # type: ignore[method-assign]
