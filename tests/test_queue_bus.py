"""QueuedEventBus: what the contract suite does not cover — retries, dead letters, backpressure,
killed workers, close/drain, on_done, ordering with ``key=``, fork and exit behaviour."""

from __future__ import annotations

import ctypes
import multiprocessing
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from typing import Any

import pytest

from common.base_eventbus import ListenerError
from common.events import Event
from common.retry import Backoff
from common.waiting import wait_until
from level_2_intermediate.errors import BusClosedError, BusError, Level2Error
from level_2_intermediate.eventbus_queue import DeadLetter, QueuedEventBus, QueueFullError

FAST = Backoff(base=0.001, cap=0.005)


@pytest.fixture
def make_bus():
    """Build buses that are always closed after the test (even when it fails)."""
    buses: list[QueuedEventBus] = []

    def make(**options: Any) -> QueuedEventBus:
        options.setdefault("backoff", FAST)
        bus = QueuedEventBus(**options)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        bus.close(timeout=10)


class Gate:
    """A listener that blocks until the test opens the gate, recording what it saw."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.seen: list[Any] = []
        self.threads: list[threading.Thread] = []

    def __call__(self, event: Event) -> None:
        self.threads.append(threading.current_thread())
        self.entered.set()
        assert self.opened.wait(10), "the test never opened the gate"
        self.seen.append(event.data.get("n"))


def test_emit_returns_before_delivery_and_join_waits(make_bus) -> None:
    bus = make_bus(workers=1)
    gate = Gate()
    bus.subscribe("job.run", gate)
    event = bus.emit("job.run", {"n": 1})
    assert isinstance(event, Event) and event.name == "job.run"
    assert gate.entered.wait(5)
    assert gate.seen == []  # emit returned while the listener is still blocked
    assert bus.join(timeout=0.05) is False
    gate.opened.set()
    assert bus.join(timeout=5) is True
    assert gate.seen == [1]


def test_nothing_starts_before_the_first_emit(make_bus) -> None:
    bus = make_bus(workers=3)
    bus.subscribe("a.b", lambda e: None)
    mine = f"{id(bus):x}"
    assert not [t for t in threading.enumerate() if mine in t.name]
    assert bus.alive_workers() == 0
    assert bus.join(timeout=0) is True  # nothing queued yet
    bus.emit("a.b")
    assert bus.alive_workers() == 3
    assert bus.start() is bus  # idempotent once running


def test_a_failing_listener_is_retried_alone_until_it_succeeds(make_bus) -> None:
    bus = make_bus(workers=1, max_retries=3)
    calls: Counter[str] = Counter()

    def flaky(event: Event) -> None:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionError("smtp down")

    bus.subscribe("order.created", flaky)
    bus.subscribe("order.created", lambda e: calls.update(["steady"]))
    bus.emit("order.created", {"id": 1})
    assert bus.join(timeout=5)
    assert calls == {"flaky": 3, "steady": 1}  # only the failing listener was called again
    assert list(bus.dead_letters) == [] and list(bus.errors) == []


class WeirdError(Exception):
    """An exception whose str() itself fails."""

    def __str__(self) -> str:
        raise RuntimeError("str() of this exception fails")


class NeedsArgs(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)


EXCEPTIONS = [
    ValueError("bad value"),
    KeyError("missing"),
    ZeroDivisionError("division by zero"),
    OSError(28, "No space left on device"),
    RecursionError("maximum recursion depth exceeded"),
    UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    StopIteration("leaked"),
    NeedsArgs(503, "unavailable"),
    WeirdError(),
    Exception("plain"),
]


def test_the_worker_survives_every_kind_of_exception(make_bus) -> None:
    bus = make_bus(workers=1, max_retries=2)
    attempts: Counter[int] = Counter()
    delivered: list[int] = []

    def always_fails(event: Event) -> None:
        attempts[event.data["n"]] += 1
        raise EXCEPTIONS[event.data["n"]]

    bus.subscribe("job.*", always_fails)
    bus.subscribe("job.*", lambda e: delivered.append(e.data["n"]))
    for n in range(len(EXCEPTIONS)):
        bus.emit("job.run", {"n": n})
    assert bus.join(timeout=10)
    assert bus.alive_workers() == 1
    assert delivered == list(range(len(EXCEPTIONS)))  # isolation: the other listener saw all
    assert attempts == dict.fromkeys(range(len(EXCEPTIONS)), 3)  # 1 try + 2 retries each
    letters = list(bus.dead_letters)
    assert [d.exception for d in letters] == EXCEPTIONS
    assert all(isinstance(d, DeadLetter) and d.attempts == 3 for d in letters)
    assert {d.listener for d in letters} == {always_fails.__qualname__}
    assert {d.pattern for d in letters} == {"job.*"}
    assert [e.exception for e in bus.errors] == EXCEPTIONS  # the base error path, once each
    assert all(isinstance(e, ListenerError) for e in bus.errors)
    # and the worker still delivers
    bus.emit("job.done", {"n": 0})
    assert bus.join(timeout=5) and delivered[-1] == 0


def test_once_subscription_is_retried_but_fires_for_one_event(make_bus) -> None:
    bus = make_bus(workers=1, max_retries=2)
    seen: list[int] = []

    def once_flaky(event: Event) -> None:
        seen.append(event.data["n"])
        if len(seen) == 1:
            raise TimeoutError("first try fails")

    bus.once("tick", once_flaky)
    for n in range(3):
        bus.emit("tick", {"n": n})
    assert bus.join(timeout=5)
    assert seen == [0, 0]  # retried for event 0, never called for 1 and 2
    assert not bus.dead_letters and len(bus) == 0


def test_unsubscribing_a_failing_listener_stops_its_retries(make_bus) -> None:
    bus = make_bus(workers=1, max_retries=5, backoff=Backoff(base=0.01, cap=0.01))
    calls: list[int] = []

    def failing(event: Event) -> None:
        calls.append(1)
        bus.unsubscribe("job.run", failing)  # e.g. an operator disables it mid-incident
        raise RuntimeError("broken")

    bus.subscribe("job.run", failing)
    bus.emit("job.run")
    assert bus.join(timeout=5)
    assert calls == [1]
    (letter,) = bus.dead_letters
    assert letter.attempts == 1 and isinstance(letter.exception, RuntimeError)


def test_backpressure_raises_and_loses_nothing_accepted(make_bus) -> None:
    bus = make_bus(workers=1, maxsize=3, put_timeout=0.05)
    gate = Gate()
    bus.subscribe("job.run", gate)
    accepted, refused = [], []
    bus.emit("job.run", {"n": 0})
    assert gate.entered.wait(5)  # the worker holds event 0; the queue (3) fills next
    for n in range(1, 10):
        try:
            bus.emit("job.run", {"n": n})
            accepted.append(n)
        except QueueFullError as exc:
            assert "queue full" in str(exc) and f"[{bus.event_log[-1].id}]" in str(exc)
            refused.append(n)
    assert accepted == [1, 2, 3] and refused == list(range(4, 10))
    assert bus.qsize() == 3
    gate.opened.set()
    assert bus.join(timeout=5)
    assert gate.seen == [0, 1, 2, 3]
    assert issubclass(QueueFullError, Level2Error) and issubclass(QueueFullError, RuntimeError)
    assert issubclass(QueueFullError, BusError)


def test_a_blocked_emit_proceeds_when_room_appears(make_bus) -> None:
    bus = make_bus(workers=1, maxsize=1, put_timeout=10)
    gate = Gate()
    bus.subscribe("job.run", gate)
    bus.emit("job.run", {"n": 0})
    assert gate.entered.wait(5)
    bus.emit("job.run", {"n": 1})  # fills the queue
    done = threading.Event()

    def producer() -> None:
        bus.emit("job.run", {"n": 2})  # blocks: the queue is full
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not done.wait(0.05)
    gate.opened.set()
    assert done.wait(5)
    thread.join(5)
    assert bus.join(timeout=5) and gate.seen == [0, 1, 2]


def test_put_timeout_zero_refuses_at_once(make_bus) -> None:
    bus = make_bus(workers=1, maxsize=1, put_timeout=0)
    gate = Gate()
    bus.subscribe("job.run", gate)
    bus.emit("job.run", {"n": 0})
    assert gate.entered.wait(5)
    bus.emit("job.run", {"n": 1})
    with pytest.raises(QueueFullError):
        bus.emit("job.run", {"n": 2})
    gate.opened.set()


def test_a_listener_that_kills_its_worker_loses_nothing_on_close(make_bus) -> None:
    done: list[tuple[int, bool]] = []
    bus = make_bus(workers=1, on_done=lambda e, failed: done.append((e.data["n"], failed)))
    gate = Gate()
    seen: list[int] = []

    def listener(event: Event) -> None:
        if event.data["n"] == 0:
            gate(event)  # hold the worker so that the rest queues up behind
        if event.data["n"] == 3:
            sys.exit("a stray sys.exit() in a listener")  # SystemExit ends the thread
        seen.append(event.data["n"])

    bus.subscribe("job.run", listener)
    for n in range(10):
        bus.emit("job.run", {"n": n})
    assert gate.entered.wait(5)
    first_worker = gate.threads[0]
    gate.opened.set()
    assert bus.close(timeout=10) is True
    assert seen == [0, 1, 2, 4, 5, 6, 7, 8, 9]  # everything behind the killed event arrived
    assert not first_worker.is_alive()
    (letter,) = bus.dead_letters
    assert letter.event.data["n"] == 3 and isinstance(letter.exception, SystemExit)
    assert letter.listener is None and letter.pattern is None
    assert done == [(n, n == 3) for n in range(10)]


def _kill_thread(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Python's only way to kill a thread: raise an exception in it asynchronously."""
    assert thread.ident is not None
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type)
    )
    assert hit == 1


def test_a_killed_worker_thread_is_replaced_and_its_queue_delivered(make_bus) -> None:
    bus = make_bus(workers=2, key=lambda e: e.data["n"] % 2)  # one queue per worker
    gate = Gate()
    seen: list[int] = []
    lock = threading.Lock()

    def listener(event: Event) -> None:
        if event.data["n"] == 0:
            gate(event)
        with lock:
            seen.append(event.data["n"])

    bus.subscribe("job.run", listener)
    for n in range(20):
        bus.emit("job.run", {"n": n})
    assert gate.entered.wait(5)
    victim = gate.threads[0]
    _kill_thread(victim, SystemExit)  # delivered when the thread next runs Python code
    gate.opened.set()
    victim.join(5)
    assert not victim.is_alive()
    wait_until(lambda: bus.alive_workers() == 2, 5, message="a replacement worker")
    assert bus.close(timeout=10)
    assert sorted(seen) == list(range(1, 20))  # event 0 was in flight when it was killed
    (letter,) = bus.dead_letters
    assert letter.event.data["n"] == 0 and isinstance(letter.exception, SystemExit)


def test_close_drains_refuses_new_events_and_is_idempotent(make_bus) -> None:
    bus = make_bus(workers=2)
    seen: list[int] = []
    lock = threading.Lock()

    def slowish(event: Event) -> None:
        time.sleep(0.001)  # simulated I/O, so that close() finds work queued
        with lock:
            seen.append(event.data["n"])

    bus.subscribe("job.run", slowish)
    for n in range(100):
        bus.emit("job.run", {"n": n})
    assert bus.close(timeout=10) is True
    assert sorted(seen) == list(range(100))
    assert bus.alive_workers() == 0 and bus.closed
    with pytest.raises(BusClosedError, match="closed"):
        bus.emit("job.run", {"n": 100})
    with pytest.raises(BusClosedError):
        bus.publish(Event.create("job.run"))
    with pytest.raises(BusClosedError):
        bus.start()
    assert bus.close() is True


def test_follow_up_events_emitted_by_listeners_during_close_are_delivered(make_bus) -> None:
    bus = make_bus(workers=1)
    shipped: list[int] = []
    bus.subscribe("order.paid", lambda e: bus.emit("order.shipped", e.data))
    bus.subscribe("order.shipped", lambda e: shipped.append(e.data["id"]))
    with bus:
        for n in range(50):
            bus.emit("order.paid", {"id": n})
    assert shipped == list(range(50))


def test_close_with_a_timeout_reports_a_stuck_listener(make_bus) -> None:
    bus = make_bus(workers=1)
    gate = Gate()
    bus.subscribe("job.run", gate)
    bus.emit("job.run", {"n": 0})
    assert gate.entered.wait(5)
    assert bus.close(timeout=0.05) is False
    gate.opened.set()
    wait_until(lambda: bus.alive_workers() == 0, 5, message="the worker to finish")
    assert gate.seen == [0]


def test_join_or_close_from_a_listener_fails_that_listener(make_bus) -> None:
    bus = make_bus(workers=1, max_retries=0)
    bus.subscribe("a.join", lambda e: bus.join())
    bus.subscribe("a.close", lambda e: bus.close())
    bus.emit("a.join")
    bus.emit("a.close")
    assert bus.join(timeout=5)
    messages = [str(d.exception) for d in bus.dead_letters]
    assert messages == [
        "join() called from a listener would wait for itself",
        "close() called from a listener would wait for itself",
    ]


def test_on_done_runs_after_all_listeners_and_before_join_returns(make_bus) -> None:
    order: list[str] = []
    bus = make_bus(
        workers=1,
        max_retries=1,
        on_done=lambda e, failed: order.append(f"done {e.data['n']} failed={failed}"),
    )

    def first(event: Event) -> None:
        order.append(f"first {event.data['n']}")

    def second(event: Event) -> None:
        order.append(f"second {event.data['n']}")
        if event.data["n"] == 1:
            raise ValueError("never works for 1")

    bus.subscribe("job.run", first)
    bus.subscribe("job.run", second)
    bus.emit("job.run", {"n": 0})
    bus.emit("job.run", {"n": 1})
    assert bus.join(timeout=5)
    assert order == [
        "first 0",
        "second 0",
        "done 0 failed=False",
        "first 1",
        "second 1",
        "second 1",
        "done 1 failed=True",
    ]


def test_a_failing_on_done_does_not_stop_the_worker(make_bus) -> None:
    seen: list[int] = []

    def on_done(event: Event, failed: bool) -> None:
        raise RuntimeError("callback bug")

    bus = make_bus(workers=1, on_done=on_done)
    bus.subscribe("job.run", lambda e: seen.append(e.data["n"]))
    for n in range(3):
        bus.emit("job.run", {"n": n})
    assert bus.join(timeout=5) and seen == [0, 1, 2] and bus.alive_workers() == 1


def test_one_worker_is_global_fifo_even_with_retries(make_bus) -> None:
    bus = make_bus(workers=1, max_retries=2)
    seen: list[tuple[str, int]] = []
    failed_once: set[int] = set()

    def flaky(event: Event) -> None:
        n = event.data["n"]
        if n % 7 == 0 and n not in failed_once:
            failed_once.add(n)
            raise ConnectionError("transient")
        seen.append(("flaky", n))

    bus.subscribe("#", flaky)
    bus.subscribe("#", lambda e: seen.append(("steady", e.data["n"])))
    for n in range(300):
        bus.emit(f"stream.s{n % 5}", {"n": n})
    assert bus.join(timeout=10)
    assert [n for who, n in seen if who == "flaky"] == list(range(300))
    assert [n for who, n in seen if who == "steady"] == list(range(300))


def test_key_gives_per_key_fifo_with_many_workers(make_bus) -> None:
    bus = make_bus(workers=4, key=lambda e: e.data["order"])
    per_order: dict[int, list[int]] = {}
    lock = threading.Lock()
    threads_per_order: dict[int, set[str]] = {}

    def listener(event: Event) -> None:
        if event.data["step"] % 3 == 0:
            time.sleep(0.0005)  # uneven work, so that workers interleave
        with lock:
            per_order.setdefault(event.data["order"], []).append(event.data["step"])
            threads_per_order.setdefault(event.data["order"], set()).add(
                threading.current_thread().name
            )

    bus.subscribe("order.step", listener)
    for step in range(40):
        for order in range(12):
            bus.emit("order.step", {"order": order, "step": step})
    assert bus.join(timeout=20)
    assert per_order == {order: list(range(40)) for order in range(12)}
    assert all(len(names) == 1 for names in threads_per_order.values())
    assert len({name for names in threads_per_order.values() for name in names}) > 1


def test_without_key_workers_share_the_queue_and_listeners_keep_subscription_order(
    make_bus,
) -> None:
    bus = make_bus(workers=4)
    per_event: dict[int, list[str]] = {}
    threads: set[str] = set()
    lock = threading.Lock()

    def make(tag: str):
        def listener(event: Event) -> None:
            time.sleep(0.0002)
            with lock:
                per_event.setdefault(event.data["n"], []).append(tag)
                threads.add(threading.current_thread().name)

        return listener

    for tag in ("a", "b", "c"):
        bus.subscribe("job.#", make(tag))
    for n in range(200):
        bus.emit("job.run", {"n": n})
    assert bus.join(timeout=20)
    assert per_event == {n: ["a", "b", "c"] for n in range(200)}
    assert len(threads) > 1  # the work was shared


def test_bad_options_are_refused_with_clear_errors() -> None:
    with pytest.raises(ValueError, match="workers"):
        QueuedEventBus(workers=0)
    with pytest.raises(ValueError, match="maxsize"):
        QueuedEventBus(maxsize=-1)
    with pytest.raises(ValueError, match="put_timeout"):
        QueuedEventBus(put_timeout=-1)
    with pytest.raises(ValueError, match="max_retries"):
        QueuedEventBus(max_retries=-2)
    with pytest.raises(TypeError, match="Backoff"):
        QueuedEventBus(backoff=0.1)  # type: ignore[arg-type]


def test_bad_events_are_refused_before_anything_is_queued(make_bus) -> None:
    bus = make_bus(workers=1)
    with pytest.raises(ValueError, match="wildcard"):
        bus.emit("order.*")
    with pytest.raises(ValueError):
        bus.emit("order.created", ["not", "a", "dict"])  # type: ignore[arg-type]
    assert bus.qsize() == 0 and len(bus.event_log) == 0 and bus.join(timeout=1)


def _child_uses_inherited_bus(bus: QueuedEventBus, conn: Any) -> None:
    seen: list[int] = []
    bus.subscribe("child.ping", lambda e: seen.append(e.data["n"]))
    for n in range(5):
        bus.emit("child.ping", {"n": n})
    ok = bus.close(timeout=5)
    conn.send((ok, seen, bus.alive_workers()))
    conn.close()


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # fork is what is tested
def test_a_bus_running_before_fork_works_in_the_child(make_bus) -> None:
    bus = make_bus(workers=2)
    seen: list[int] = []
    bus.subscribe("parent.ping", lambda e: seen.append(1))
    bus.emit("parent.ping")
    assert bus.join(timeout=5) and bus.alive_workers() == 2
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_uses_inherited_bus, args=(bus, child_end))
    child.start()
    try:
        assert parent_end.poll(20), "the child did not answer"
        ok, child_seen, workers_after_close = parent_end.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
        parent_end.close()
        child_end.close()
    assert ok is True and child_seen == [0, 1, 2, 3, 4] and workers_after_close == 0
    assert child.exitcode == 0
    bus.emit("parent.ping")  # the parent's bus is untouched
    assert bus.join(timeout=5) and seen == [1, 1]


def test_a_bus_never_closed_is_drained_at_interpreter_exit(tmp_path) -> None:
    out = tmp_path / "out.txt"
    code = textwrap.dedent(
        f"""
        import time
        from level_2_intermediate.eventbus_queue import QueuedEventBus
        bus = QueuedEventBus(workers=1)
        def slow(event):
            time.sleep(0.002)
            with open({str(out)!r}, "a") as fh:
                fh.write(str(event.data["n"]) + "\\n")
        bus.subscribe("job.run", slow)
        for n in range(50):
            bus.emit("job.run", {{"n": n}})
        # no close(): the program just ends
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().split() == [str(n) for n in range(50)]
