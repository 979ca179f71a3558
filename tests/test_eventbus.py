"""BaseEventBus semantics (through Level 1's EventBus, which adds only the file log)."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from typing import Any

import pytest

from common.base_eventbus import BaseEventBus, ListenerError, Subscription
from common.events import Event, InvalidEventError
from common.storage import LineReader
from level_1_basic.eventbus import EventBus


class Recorder:
    """A listener that records (label, event name) into a shared list."""

    def __init__(self, calls: list, label: str) -> None:
        self.calls = calls
        self.label = label

    def __call__(self, event: Event) -> None:
        self.calls.append((self.label, event.name))


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


def test_exact_and_wildcard_listeners_receive_matching_events(bus: EventBus) -> None:
    calls: list = []
    bus.subscribe("user.registered", Recorder(calls, "exact"))
    bus.subscribe("user.*", Recorder(calls, "star"))
    bus.subscribe("order.#", Recorder(calls, "orders"))
    bus.emit("user.registered", {"id": 1})
    bus.emit("user.deleted")
    bus.emit("order.created")
    bus.emit("user.profile.updated")  # matches nobody
    assert calls == [
        ("exact", "user.registered"),
        ("star", "user.registered"),
        ("star", "user.deleted"),
        ("orders", "order.created"),
    ]


def test_listeners_get_the_event_and_emit_returns_it(bus: EventBus) -> None:
    got: list[Event] = []
    bus.subscribe("a.b", got.append)
    event = bus.emit("a.b", {"x": 1}, correlation_id="c-1", version=2)
    assert got == [event]
    assert event.data == {"x": 1} and event.correlation_id == "c-1" and event.version == 2


def test_order_of_subscription_holds_across_exact_and_wildcard(bus: EventBus) -> None:
    calls: list = []
    bus.subscribe("#", Recorder(calls, 1))
    bus.subscribe("order.created", Recorder(calls, 2))
    bus.subscribe("*.created", Recorder(calls, 3))
    bus.subscribe("order.*", Recorder(calls, 4))
    bus.subscribe("order.created", Recorder(calls, 5))
    bus.emit("order.created")
    assert [label for label, _ in calls] == [1, 2, 3, 4, 5]


def test_the_same_callback_and_pattern_subscribe_once(bus: EventBus) -> None:
    calls: list = []
    listener = Recorder(calls, "x")
    first = bus.subscribe("a.*", listener)
    second = bus.subscribe("a.*", listener)
    assert first is second
    bus.emit("a.b")
    assert calls == [("x", "a.b")]
    # ...but the same callback on two patterns that both match is two subscriptions.
    bus.subscribe("a.b", listener)
    bus.emit("a.b")
    assert calls == [("x", "a.b")] * 3


def test_bound_methods_are_deduplicated_and_unsubscribed(bus: EventBus) -> None:
    class Service:
        def __init__(self) -> None:
            self.seen = 0

        def handle(self, event: Event) -> None:
            self.seen += 1

    service = Service()
    bus.subscribe("a", service.handle)
    bus.subscribe("a", service.handle)  # a new bound-method object, equal to the first
    bus.emit("a")
    assert service.seen == 1
    assert bus.unsubscribe("a", service.handle) is True
    bus.emit("a")
    assert service.seen == 1


def test_unsubscribe_return_values(bus: EventBus) -> None:
    listener = Recorder([], "x")
    assert bus.unsubscribe("a.b", listener) is False  # never subscribed
    sub = bus.subscribe("a.b", listener)
    assert bus.unsubscribe("a.*", listener) is False  # other pattern
    assert bus.unsubscribe("a.b", listener) is True
    assert bus.unsubscribe("a.b", listener) is False  # already gone
    assert sub.cancel() is False
    assert not sub.active


def test_subscription_object_cancels(bus: EventBus) -> None:
    calls: list = []
    sub = bus.subscribe("a", Recorder(calls, "x"))
    assert isinstance(sub, Subscription)
    assert sub() is True  # calling it unsubscribes
    assert sub() is False
    bus.emit("a")
    assert calls == []
    assert len(bus) == 0
    assert "cancelled" in repr(sub)


def test_once_fires_a_single_time(bus: EventBus) -> None:
    calls: list = []
    sub = bus.subscribe("a.*", Recorder(calls, "once"), once=True)
    bus.emit("a.b")
    bus.emit("a.c")
    assert calls == [("once", "a.b")]
    assert not sub.active and len(bus) == 0
    bus.once("x", Recorder(calls, "once2"))
    bus.emit("x")
    bus.emit("x")
    assert calls[-1] == ("once2", "x") and len(calls) == 2


def test_once_fires_once_even_when_emitted_from_many_threads(bus: EventBus) -> None:
    calls: list = []
    bus.subscribe("a", Recorder(calls, "once"), once=True)
    barrier = threading.Barrier(8)

    def emitter() -> None:
        barrier.wait()
        for _ in range(200):
            bus.emit("a")

    threads = [threading.Thread(target=emitter) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [("once", "a")]


def test_decorator_form(bus: EventBus) -> None:
    calls: list = []

    @bus.on("user.*")
    def handler(event: Event) -> None:
        calls.append(event.name)

    assert callable(handler) and handler.__name__ == "handler"
    bus.emit("user.registered")
    assert calls == ["user.registered"]


def test_invalid_names_and_patterns_are_rejected_before_anything_happens(bus: EventBus) -> None:
    calls: list = []
    bus.subscribe("#", Recorder(calls, "all"))
    for bad in ("", "a..b", "user.*", "us*r"):
        with pytest.raises(ValueError):
            bus.emit(bad)
    with pytest.raises(ValueError, match="wildcard inside segment"):
        bus.subscribe("us*r", Recorder(calls, "x"))
    with pytest.raises(TypeError, match="callable"):
        bus.subscribe("a", "not callable")  # type: ignore[arg-type]
    with pytest.raises(InvalidEventError, match="'data'"):
        bus.emit("a", ["not", "a", "dict"])  # type: ignore[arg-type]
    assert calls == [] and len(bus.event_log) == 0


def test_event_log_keeps_every_event_in_order_and_is_bounded() -> None:
    bus = EventBus(history_limit=5)
    for i in range(12):
        bus.emit("tick", {"i": i})
    assert [e.data["i"] for e in bus.event_log] == [7, 8, 9, 10, 11]
    unbounded = EventBus(history_limit=None)
    for _ in range(20_001):
        unbounded.emit("tick")
    assert len(unbounded.event_log) == 20_001
    assert EventBus().event_log.maxlen == 10_000


def test_events_without_listeners_are_still_logged(bus: EventBus) -> None:
    bus.emit("nobody.listens")
    assert [e.name for e in bus.event_log] == ["nobody.listens"]


def test_a_raising_listener_does_not_stop_the_others_or_the_emitter(bus: EventBus) -> None:
    calls: list = []

    def broken(event: Event) -> None:
        raise RuntimeError("smtp down")

    bus.subscribe("order.created", Recorder(calls, "before"))
    bus.subscribe("order.*", broken)
    bus.subscribe("#", Recorder(calls, "after"))
    event = bus.emit("order.created", {"order_id": 1})  # does not raise
    assert calls == [("before", "order.created"), ("after", "order.created")]
    [error] = bus.errors
    assert isinstance(error, ListenerError)
    assert error.event is event and error.pattern == "order.*"
    assert isinstance(error.exception, RuntimeError)
    assert "broken" in error.listener
    assert event.id in str(error) and "smtp down" in str(error)


def test_listener_failures_are_logged_with_the_event_id(
    bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    bus.subscribe("a", lambda e: 1 / 0)
    with caplog.at_level("ERROR", logger="eda"):
        event = bus.emit("a")
    assert any(event.id in r.getMessage() and r.exc_info for r in caplog.records)


def test_errors_are_bounded() -> None:
    bus = EventBus(error_limit=3)
    bus.subscribe("a", lambda e: 1 / 0)
    for _ in range(10):
        bus.emit("a")
    assert len(bus.errors) == 3


def test_base_exceptions_propagate(bus: EventBus) -> None:
    def interrupt(event: Event) -> None:
        raise KeyboardInterrupt

    bus.subscribe("a", interrupt)
    with pytest.raises(KeyboardInterrupt):
        bus.emit("a")
    bus.unsubscribe("a", interrupt)
    calls: list = []
    bus.subscribe("a", Recorder(calls, "x"))
    bus.emit("a")  # the bus still works afterwards
    assert calls == [("x", "a")]


def test_emit_from_a_listener_is_queued_not_recursive(bus: EventBus) -> None:
    calls: list = []

    def on_created(event: Event) -> None:
        calls.append("created:start")
        bus.emit("order.paid", {"order_id": event.data["order_id"]})
        calls.append("created:end")  # the paid listeners have not run yet: breadth first

    bus.subscribe("order.created", on_created)
    bus.subscribe("order.paid", lambda e: calls.append("paid"))
    bus.subscribe("#", lambda e: calls.append(f"all:{e.name}"))
    bus.emit("order.created", {"order_id": 3})
    assert calls == ["created:start", "created:end", "all:order.created", "paid", "all:order.paid"]
    assert [e.name for e in bus.event_log] == ["order.created", "order.paid"]


def test_a_long_chain_of_reentrant_emits_does_not_hit_the_recursion_limit(bus: EventBus) -> None:
    seen: list[int] = []

    def step(event: Event) -> None:
        n = event.data["n"]
        seen.append(n)
        if n < 5_000:
            bus.emit("chain", {"n": n + 1})

    bus.subscribe("chain", step)
    bus.emit("chain", {"n": 0})
    assert seen == list(range(5_001))


def test_unsubscribe_during_dispatch_skips_the_removed_listener(bus: EventBus) -> None:
    calls: list = []
    second = Recorder(calls, "second")

    def first(event: Event) -> None:
        calls.append(("first", event.name))
        bus.unsubscribe("a", second)

    bus.subscribe("a", first)
    bus.subscribe("a", second)
    bus.emit("a")
    assert calls == [("first", "a")]


def test_subscribe_during_dispatch_applies_to_the_next_event(bus: EventBus) -> None:
    calls: list = []
    late = Recorder(calls, "late")

    def first(event: Event) -> None:
        calls.append(("first", event.name))
        bus.subscribe("a", late)

    bus.subscribe("a", first)
    bus.emit("a")
    bus.emit("a")
    assert calls == [("first", "a"), ("first", "a"), ("late", "a")]


def test_subscriptions_and_clear(bus: EventBus) -> None:
    a = bus.subscribe("a.*", Recorder([], 1))
    b = bus.subscribe("#", Recorder([], 2))
    c = bus.subscribe("x", Recorder([], 3))
    assert bus.subscriptions() == [a, b, c]
    assert bus.subscriptions("a.b") == [a, b]
    assert bus.has_listeners("x") and not BaseEventBus().has_listeners("x")
    bus.clear()
    assert len(bus) == 0 and not bus.has_listeners("a.b")


def test_publish_delivers_an_existing_event(bus: EventBus) -> None:
    got: list[Event] = []
    bus.subscribe("a.*", got.append)
    event = Event("a.b", {"k": 1})
    assert bus.publish(event) is event
    assert got == [event] and list(bus.event_log) == [event]


def test_match_cache_follows_subscription_changes(bus: EventBus) -> None:
    calls: list = []
    bus.emit("a.b")  # caches "no listeners" for a.b
    sub = bus.subscribe("a.*", Recorder(calls, "x"))
    bus.emit("a.b")
    sub.cancel()
    bus.emit("a.b")
    assert calls == [("x", "a.b")]


def test_thread_safety_under_subscription_churn() -> None:
    """One thread churns subscriptions while another emits 20,000 events: nothing raises, and
    the listeners that stayed subscribed see every event."""
    bus = EventBus()
    steady_exact: list[int] = []
    steady_wild: list[int] = []
    bus.subscribe("load.tick", lambda e: steady_exact.append(e.data["i"]))
    bus.subscribe("load.*", lambda e: steady_wild.append(e.data["i"]))
    stop = threading.Event()
    churned = 0
    failures: list[BaseException] = []

    def churn() -> None:
        nonlocal churned
        try:
            while not stop.is_set():
                subs = [
                    bus.subscribe(p, lambda e: None) for p in ("load.tick", "load.*", "#", "x.y")
                ]
                bus.subscribe("load.tick", lambda e: None, once=True)
                for s in subs:
                    s.cancel()
                churned += 1
        except BaseException as exc:
            failures.append(exc)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for i in range(20_000):
            bus.emit("load.tick", {"i": i})
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not failures
    assert churned > 0
    assert steady_exact == list(range(20_000))
    assert steady_wild == list(range(20_000))
    assert not bus.errors


def test_emitting_from_several_threads_delivers_everything() -> None:
    bus = EventBus()
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def record(event: Event) -> None:
        with lock:
            seen.append((event.data["t"], event.data["i"]))

    bus.subscribe("t.#", record)
    threads = [
        threading.Thread(
            target=lambda t=t: [bus.emit(f"t.{t}", {"t": t, "i": i}) for i in range(2000)]
        )
        for t in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8000
    for t in range(4):  # per emitting thread, order is kept
        assert [i for tt, i in seen if tt == t] == list(range(2000))


# -- Level 1's file log ----------------------------------------------------------------------


def test_level1_bus_appends_every_event_as_a_json_line(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "events.log"
    with EventBus(log) as bus:
        first = bus.emit("user.registered", {"email": "a@b.c"})
        second = bus.emit("order.created", {"order_id": 1})
    lines = [line for _, line in LineReader(log)]
    assert [Event.from_json(line) for line in lines] == [first, second]


def test_level1_bus_rejects_unserialisable_data_before_listeners_run(tmp_path: Path) -> None:
    calls: list = []
    with EventBus(tmp_path / "events.log") as bus:
        bus.subscribe("#", Recorder(calls, "x"))
        with pytest.raises(InvalidEventError, match="not JSON-serialisable"):
            bus.emit("a", {"when": object()})
        bus.emit("b")
    assert calls == [("x", "b")]
    assert len(list(LineReader(tmp_path / "events.log"))) == 1
    assert [e.name for e in bus.event_log] == ["b"]


def test_listener_names_are_stable_and_unprintable_errors_are_survived(bus: EventBus) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    class Handler:
        def __call__(self, event: Event) -> None:
            raise Unprintable()

    bus.subscribe("a", Handler())
    bus.emit("a")
    [error] = bus.errors
    assert error.listener.endswith("Handler instance") and "0x" not in error.listener
    assert "<unprintable Unprintable>" in str(error)


def _emit_in_forked_child(bus: EventBus, conn: Any) -> None:
    seen: list[str] = []
    bus.subscribe("child", lambda e: seen.append(e.name))
    bus.emit("child")
    conn.send(seen)
    conn.close()


def test_a_bus_forked_in_the_middle_of_a_dispatch_works_in_the_child() -> None:
    """Forked while a listener runs and while the bus's lock is held: in the child, the lock
    is free and the emit is not mistaken for a re-entrant one (it would never run)."""
    bus = EventBus()
    ctx = multiprocessing.get_context("fork")
    result: list = []

    def fork_from_listener(event: Event) -> None:
        parent_conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=_emit_in_forked_child, args=(bus, child_conn))
        with bus._lock:
            proc.start()
        child_conn.close()
        if parent_conn.poll(30):
            result.append(parent_conn.recv())
        proc.join(30)
        parent_conn.close()

    bus.subscribe("parent", fork_from_listener)
    bus.emit("parent")
    assert result == [["child"]]


def test_delivering_marks_the_thread_once_and_refuses_to_nest() -> None:
    """The base bus's protocol for a loop of deliveries (what a replay uses)."""
    bus = EventBus()
    order: list[str] = []
    bus.subscribe("a.first", lambda e: (order.append("first"), bus.emit("a.follow")))
    bus.subscribe("a.follow", lambda e: order.append("follow"))
    subs = bus._match("a.first")
    with bus._delivering() as (deliver, pending):
        assert deliver == bus._dispatch  # the base hook: one mark, then _dispatch per event
        deliver(Event("a.first"), subs)
        assert order == ["first"] and len(pending) == 1  # queued, not run inside
        while pending:
            deliver(*pending.popleft())
        with pytest.raises(RuntimeError, match="already dispatching"), bus._delivering():
            pass
    assert order == ["first", "follow"] and bus._busy == {}
