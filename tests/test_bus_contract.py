"""One contract, every bus: sync (Level 1), thread (QueuedEventBus), process (ProcessEventBus)
and asyncio (AsyncEventBus) each run the abstract :class:`BusContract` through a small driver.

The listeners are importable, picklable objects that append a line to a file per call, so the
same test observes a listener that ran in this thread, another thread, a worker process or the
event loop. A driver gives every bus the same synchronous face: ``emit``, ``join``, ``close``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.base_eventbus import BaseEventBus, Subscription
from common.events import Event
from common.retry import Backoff
from level_1_basic.eventbus import EventBus
from level_2_intermediate.errors import BusClosedError
from level_2_intermediate.eventbus_async import AsyncEventBus
from level_2_intermediate.eventbus_process import ProcessEventBus
from level_2_intermediate.eventbus_queue import QueuedEventBus

FAST = Backoff(base=0.001, cap=0.005)


# -- listeners that work in any process -----------------------------------------------------
class Record:
    """Append ``tag name n`` to a file: one small O_APPEND write, atomic across processes."""

    def __init__(self, path: Path, tag: str) -> None:
        self.path = str(path)
        self.tag = tag

    def __call__(self, event: Event) -> None:
        line = f"{self.tag} {event.name} {event.data.get('n', -1)}\n".encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


class FailFirst(Record):
    """Records every attempt; raises on the first ``times`` attempts for each event."""

    def __init__(self, path: Path, tag: str, times: int | None) -> None:
        super().__init__(path, tag)
        self.times = times  # None: always
        self.attempts: dict[str, int] = defaultdict(int)

    def __call__(self, event: Event) -> None:
        super().__call__(event)
        self.attempts[event.id] += 1
        if self.times is None or self.attempts[event.id] <= self.times:
            raise ValueError(f"{self.tag} fails on {event.data.get('n')}")


class Journal:
    """The file the listeners of one test write to."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def listener(self, tag: str) -> Record:
        return Record(self.path, tag)

    def failing(self, tag: str, times: int | None = None) -> FailFirst:
        return FailFirst(self.path, tag, times)

    def entries(self, tag: str | None = None) -> list[tuple[str, str, int]]:
        if not self.path.exists():
            return []
        rows = [line.split() for line in self.path.read_text().splitlines()]
        return [(t, name, int(n)) for t, name, n in rows if tag is None or t == tag]

    def numbers(self, tag: str) -> list[int]:
        return [n for _, _, n in self.entries(tag)]


# -- drivers: one synchronous face per bus --------------------------------------------------
class Driver:
    def __init__(self, bus: BaseEventBus) -> None:
        self.bus = bus

    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event:
        return self.bus.emit(name, data)

    def join(self, timeout: float = 20) -> bool:
        return self.bus.join(timeout)  # type: ignore[attr-defined]

    def close(self) -> bool:
        return self.bus.close()  # type: ignore[attr-defined,no-any-return]

    def shutdown(self) -> None:
        """Release what the driver itself holds (after close)."""


class SyncDriver(Driver):
    def join(self, timeout: float = 20) -> bool:
        return True  # emit returned after every listener ran

    def close(self) -> bool:
        self.bus.close()  # type: ignore[attr-defined]
        return True


class AsyncDriver(Driver):
    """Runs the bus's event loop in a thread; the test talks to it through futures."""

    def __init__(self, bus: AsyncEventBus) -> None:
        super().__init__(bus)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event:
        return self.run(self.bus.emit(name, data))  # type: ignore[arg-type]

    def join(self, timeout: float = 20) -> bool:
        return self.run(self.bus.join(timeout))  # type: ignore[attr-defined,no-any-return]

    def close(self) -> bool:
        return self.run(self.bus.close())  # type: ignore[attr-defined,no-any-return]

    def shutdown(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# -- the contract ---------------------------------------------------------------------------
class BusContract:
    """What every bus guarantees. Subclasses say how to build one (``make``)."""

    retries = True  # failed listeners are retried, then dead-lettered
    queued = True  # close() drains and then refuses events

    def make(self, **options: Any) -> Driver:
        raise NotImplementedError

    @pytest.fixture
    def journal(self, tmp_path: Path) -> Journal:
        return Journal(tmp_path / "journal.txt")

    @pytest.fixture
    def new(self) -> Iterator[Any]:
        drivers: list[Driver] = []

        def new(**options: Any) -> Driver:
            driver = self.make(**options)
            drivers.append(driver)
            return driver

        yield new
        for driver in drivers:
            try:
                driver.close()
            finally:
                driver.shutdown()

    def test_exact_and_wildcard_listeners_receive_matching_events(self, new, journal) -> None:
        d = new(workers=2)
        d.bus.subscribe("order.created", journal.listener("exact"))
        d.bus.subscribe("order.*", journal.listener("star"))
        d.bus.subscribe("*.created", journal.listener("created"))
        d.bus.subscribe("user.#", journal.listener("user"))
        d.bus.subscribe("#", journal.listener("all"))
        names = ["order.created", "order.paid", "user", "user.profile.updated", "cart.created"]
        for n, name in enumerate(names):
            d.emit(name, {"n": n})
        assert d.join()
        got = {tag: sorted(journal.numbers(tag)) for tag in ("exact", "star", "created", "user")}
        assert got == {"exact": [0], "star": [0, 1], "created": [0, 4], "user": [2, 3]}
        assert sorted(journal.numbers("all")) == [0, 1, 2, 3, 4]

    def test_listeners_of_one_event_run_in_subscription_order(self, new, journal) -> None:
        d = new(workers=3)
        for tag in ("first", "second", "third"):
            d.bus.subscribe("job.#" if tag == "second" else "job.run", journal.listener(tag))
        for n in range(30):
            d.emit("job.run", {"n": n})
        assert d.join()
        per_event: dict[int, list[str]] = defaultdict(list)
        for tag, _, n in journal.entries():
            per_event[n].append(tag)
        assert per_event == {n: ["first", "second", "third"] for n in range(30)}

    def test_a_failing_listener_does_not_stop_the_others(self, new, journal) -> None:
        d = new(workers=2, max_retries=1, backoff=FAST)
        d.bus.subscribe("job.run", journal.listener("before"))
        d.bus.subscribe("job.run", journal.failing("broken"))
        d.bus.subscribe("job.run", journal.listener("after"))
        for n in range(10):
            d.emit("job.run", {"n": n})
        assert d.join()
        assert sorted(journal.numbers("before")) == list(range(10))
        assert sorted(journal.numbers("after")) == list(range(10))
        assert len(d.bus.errors) == 10
        assert {type(e.exception) for e in d.bus.errors} == {ValueError}
        if self.retries:
            assert sorted(journal.numbers("broken")) == sorted(list(range(10)) * 2)
            letters = list(d.bus.dead_letters)  # type: ignore[attr-defined]
            assert len(letters) == 10 and {dl.attempts for dl in letters} == {2}
            (name,) = {dl.listener for dl in letters}
            assert "FailFirst" in name

    def test_a_listener_that_fails_once_is_retried_and_succeeds(self, new, journal) -> None:
        d = new(workers=1, max_retries=2, backoff=FAST)
        d.bus.subscribe("job.run", journal.failing("flaky", times=1))
        d.bus.subscribe("job.run", journal.listener("steady"))
        for n in range(5):
            d.emit("job.run", {"n": n})
        assert d.join()
        assert journal.numbers("steady") == list(range(5))  # called once each
        if not self.retries:  # the synchronous bus: one attempt, the failure is final
            assert journal.numbers("flaky") == list(range(5)) and len(d.bus.errors) == 5
            return
        assert sorted(journal.numbers("flaky")) == sorted(list(range(5)) * 2)
        assert not d.bus.errors and not d.bus.dead_letters  # type: ignore[attr-defined]

    def test_nothing_is_lost_after_join(self, new, journal) -> None:
        d = new(workers=2)
        d.bus.subscribe("load.#", journal.listener("a"))
        d.bus.subscribe("load.test", journal.listener("b"))
        for n in range(300):
            d.emit("load.test", {"n": n})
        assert d.join()
        assert sorted(journal.numbers("a")) == list(range(300))
        assert sorted(journal.numbers("b")) == list(range(300))
        assert len(d.bus.event_log) == 300

    def test_one_worker_delivers_in_global_fifo_order(self, new, journal) -> None:
        d = new(workers=1, max_retries=1, backoff=FAST)
        d.bus.subscribe("#", journal.listener("all"))
        d.bus.subscribe("stream.a", journal.failing("flaky", times=1))
        for n in range(100):
            d.emit(f"stream.{'ab'[n % 2]}", {"n": n})
        assert d.join()
        assert journal.numbers("all") == list(range(100))

    def test_a_key_keeps_per_key_order_with_several_workers(self, new, journal) -> None:
        d = new(workers=3, key=_order_key)  # the synchronous bus ignores both: globally ordered
        d.bus.subscribe("order.step", journal.listener("step"))
        for step in range(20):
            for order in range(6):
                d.emit("order.step", {"order": order, "n": order * 100 + step})
        assert d.join()
        per_order: dict[int, list[int]] = defaultdict(list)
        for n in journal.numbers("step"):
            per_order[n // 100].append(n % 100)
        assert per_order == {order: list(range(20)) for order in range(6)}

    def test_once_and_unsubscribe(self, new, journal) -> None:
        d = new(workers=1)
        d.bus.once("tick", journal.listener("once"))
        steady = journal.listener("steady")
        d.bus.subscribe("tick", steady)
        for n in range(3):
            d.emit("tick", {"n": n})
        assert d.join()
        assert d.bus.unsubscribe("tick", steady) is True
        d.emit("tick", {"n": 3})
        assert d.join()
        assert journal.numbers("once") == [0]
        assert journal.numbers("steady") == [0, 1, 2]

    def test_subscribing_a_listener_twice_keeps_one_subscription(self, new, journal) -> None:
        d = new(workers=2)
        listener = journal.listener("twice")
        first = d.bus.subscribe("tick", listener)
        assert d.bus.subscribe("tick", listener) is first
        assert [s.callback for s in d.bus.subscriptions()] == [listener]
        assert first.callback is listener  # the caller's own, not a wrapper
        d.emit("tick", {"n": 0})
        assert d.join()
        assert journal.numbers("twice") == [0]
        assert d.bus.unsubscribe("tick", listener) is True and not first.active
        assert d.bus.unsubscribe("tick", listener) is False

    def test_a_once_subscription_fires_for_one_event_across_workers(self, new, journal) -> None:
        d = new(workers=2)
        d.bus.once("tick", journal.listener("once"))
        d.bus.subscribe("tick", journal.listener("steady"))
        for n in range(20):
            d.emit("tick", {"n": n})
        assert d.join()
        assert len(journal.numbers("once")) == 1
        assert sorted(journal.numbers("steady")) == list(range(20))
        assert len(d.bus) == 1

    def test_a_failing_once_subscription_is_retried_for_its_one_event(self, new, journal) -> None:
        d = new(workers=2, max_retries=2, backoff=FAST)
        d.bus.once("tick", journal.failing("once", times=1))
        for n in range(5):
            d.emit("tick", {"n": n})
        assert d.join()
        calls = journal.numbers("once")
        if not self.retries:  # one attempt, for the first event; the failure is final
            assert calls == [0] and len(d.bus.errors) == 1
            return
        assert len(calls) == 2 and len(set(calls)) == 1  # two attempts on the one event
        assert not d.bus.errors and not d.bus.dead_letters  # type: ignore[attr-defined]

    def test_bad_input_is_refused_before_anything_is_queued(self, new, journal) -> None:
        d = new(workers=1)
        d.bus.subscribe("#", journal.listener("all"))
        with pytest.raises(ValueError, match="wildcard"):
            d.emit("order.*", {"n": 0})
        with pytest.raises(ValueError, match="empty segment"):
            d.emit("order..created", {"n": 0})
        with pytest.raises(ValueError, match="pattern"):
            d.bus.subscribe("ord*", journal.listener("bad"))
        with pytest.raises(TypeError):
            d.bus.subscribe("order.created", "not callable")  # type: ignore[arg-type]
        d.emit("order.created", {"n": 1})
        assert d.join()
        assert journal.entries() == [("all", "order.created", 1)]

    def test_close_drains_and_then_refuses(self, new, journal) -> None:
        if not self.queued:
            pytest.skip("the synchronous bus has nothing to drain")
        d = new(workers=2)
        d.bus.subscribe("job.run", journal.listener("job"))
        for n in range(50):
            d.emit("job.run", {"n": n})
        assert d.close() is True
        assert sorted(journal.numbers("job")) == list(range(50))
        with pytest.raises(BusClosedError):
            d.emit("job.run", {"n": 50})
        assert d.close() is True  # idempotent


def _order_key(event: Event) -> int:
    return int(event.data["order"])


# -- the implementations --------------------------------------------------------------------
class TestSyncBus(BusContract):
    retries = False
    queued = False

    def make(self, **options: Any) -> Driver:
        return SyncDriver(EventBus())


class TestThreadBus(BusContract):
    def make(self, **options: Any) -> Driver:
        options.setdefault("backoff", FAST)
        return Driver(QueuedEventBus(**options))


class TestProcessBus(BusContract):
    def make(self, **options: Any) -> Driver:
        options.setdefault("backoff", FAST)
        return Driver(ProcessEventBus(**options))


class TestAsyncBus(BusContract):
    def make(self, **options: Any) -> Driver:
        options.setdefault("backoff", FAST)
        return AsyncDriver(AsyncEventBus(**options))


# -- the rule shared by _dispatch and _due ---------------------------------------------------
def _prepared_bus(calls: list[str]) -> tuple[BaseEventBus, tuple[Subscription, ...]]:
    """A bus and a snapshot of its matches for ``tick``, taken before two of them were
    cancelled: active, cancelled, once, claimed (a once claimed by another caller)."""
    bus = BaseEventBus()

    def listener(tag: str) -> Any:
        def call(event: Event) -> None:
            calls.append(tag)

        call.__qualname__ = tag
        return call

    bus.subscribe("tick", listener("active"))
    cancelled = bus.subscribe("tick", listener("cancelled"))
    bus.once("tick", listener("once"))
    bus.once("tick", listener("claimed"))
    subs = bus._match("tick")
    bus.subscribe("tick", listener("late"))  # after the snapshot: not in it
    cancelled.cancel()
    assert bus._remove(subs[3])  # as another thread does when it claims a once-subscription
    return bus, subs


def test_due_selects_what_dispatch_calls_and_claims_the_same() -> None:
    called: list[str] = []
    dispatching, subs = _prepared_bus(called)
    assert [s.callback.__qualname__ for s in subs] == ["active", "cancelled", "once", "claimed"]
    assert dispatching._dispatch(Event.create("tick"), subs) == 0
    selecting, snapshot = _prepared_bus([])
    due = selecting._due(snapshot)
    assert called == ["active", "once"]
    assert [s.callback.__qualname__ for s in due] == called
    for bus in (dispatching, selecting):  # the once-subscription was claimed: gone
        assert [s.callback.__qualname__ for s in bus.subscriptions()] == ["active", "late"]
        assert bus._due(bus._match("tick")) == bus.subscriptions("tick")


def _race_for_a_once_subscription(threads: int) -> int:
    """Half the threads select (``_due``), half dispatch; how many got the subscription."""
    bus = BaseEventBus()
    calls: list[int] = []
    bus.once("tick", lambda event: calls.append(1))
    subs = bus._match("tick")
    start = threading.Barrier(threads)
    claims: list[int] = []

    def select() -> None:
        start.wait(10)
        claims.append(len(bus._due(subs)))

    def dispatch() -> None:
        start.wait(10)
        bus._dispatch(Event.create("tick"), subs)

    racers = [threading.Thread(target=select if i % 2 else dispatch) for i in range(threads)]
    for t in racers:
        t.start()
    for t in racers:
        t.join(10)
    return sum(claims) + len(calls)


def test_a_once_subscription_is_claimed_by_one_caller_across_threads() -> None:
    assert [_race_for_a_once_subscription(8) for _ in range(20)] == [1] * 20


def test_call_returns_a_listener_exception_and_lets_base_exceptions_through() -> None:
    bus = BaseEventBus()
    event = Event.create("tick")
    error = ValueError("no")

    def fails(event: Event) -> None:
        raise error

    def exits(event: Event) -> None:
        raise SystemExit(3)

    assert bus._call(event, bus.subscribe("tick", fails)) is error
    assert bus._call(event, bus.subscribe("tick", lambda e: None)) is None
    with pytest.raises(SystemExit):
        bus._call(event, bus.subscribe("tick", exits))
    assert not bus.errors  # the caller decides what a failure means
