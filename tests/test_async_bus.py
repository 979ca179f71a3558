"""AsyncEventBus with pytest-asyncio: coroutine listeners, awaited backpressure, retries that do
not block the loop, close/drain, a cancelled worker task, and use from another thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from common.events import Event
from common.retry import Backoff
from level_2_intermediate.errors import BusClosedError, QueueFullError
from level_2_intermediate.eventbus_async import AsyncEventBus

FAST = Backoff(base=0.001, cap=0.005)


@pytest_asyncio.fixture
async def make_bus() -> AsyncIterator[Any]:
    buses: list[AsyncEventBus] = []

    def make(**options: Any) -> AsyncEventBus:
        options.setdefault("backoff", FAST)
        bus = AsyncEventBus(**options)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close(timeout=10)


@pytest.mark.asyncio
async def test_emit_returns_before_a_coroutine_listener_runs(make_bus) -> None:
    bus = make_bus(workers=1)
    release = asyncio.Event()
    seen: list[int] = []

    async def slow(event: Event) -> None:
        await release.wait()
        seen.append(event.data["n"])

    bus.subscribe("job.run", slow)
    event = await bus.emit("job.run", {"n": 1})
    assert event.name == "job.run" and seen == []
    assert await bus.join(timeout=0.05) is False
    release.set()
    assert await bus.join(timeout=5) and seen == [1]


@pytest.mark.asyncio
async def test_sync_and_coroutine_listeners_run_in_subscription_order(make_bus) -> None:
    bus = make_bus(workers=3)
    per_event: dict[int, list[str]] = {}

    def make(tag: str, is_async: bool):
        if is_async:

            async def listener(event: Event) -> None:
                await asyncio.sleep(0)  # let other workers interleave
                per_event.setdefault(event.data["n"], []).append(tag)

        else:

            def listener(event: Event) -> None:
                per_event.setdefault(event.data["n"], []).append(tag)

        return listener

    for tag, is_async in (("a", True), ("b", False), ("c", True)):
        bus.subscribe("job.#", make(tag, is_async))
    for n in range(50):
        await bus.emit("job.run", {"n": n})
    assert await bus.join(timeout=5)
    assert per_event == {n: ["a", "b", "c"] for n in range(50)}


@pytest.mark.asyncio
async def test_retries_back_off_without_blocking_the_loop(make_bus) -> None:
    bus = make_bus(workers=1, max_retries=3, backoff=Backoff(base=0.02, cap=0.02))
    attempts: list[int] = []
    ticks = 0

    async def flaky(event: Event) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("downstream busy")

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    bus.subscribe("job.run", flaky)
    tick_task = asyncio.ensure_future(ticker())
    try:
        await bus.emit("job.run")
        assert await bus.join(timeout=5)
    finally:
        tick_task.cancel()
    assert len(attempts) == 3 and not bus.dead_letters
    assert ticks > 3  # the loop kept running during the two 20 ms backoffs


@pytest.mark.asyncio
async def test_a_listener_that_always_fails_is_dead_lettered(make_bus) -> None:
    done: list[bool] = []

    async def on_done(event: Event, failed: bool) -> None:
        await asyncio.sleep(0)
        done.append(failed)

    bus = make_bus(workers=1, max_retries=2, on_done=on_done)
    seen: list[int] = []

    async def broken(event: Event) -> None:
        raise KeyError(event.data["n"])

    bus.subscribe("job.run", broken)
    bus.subscribe("job.run", lambda e: seen.append(e.data["n"]))
    for n in range(3):
        await bus.emit("job.run", {"n": n})
    assert await bus.join(timeout=5)
    assert seen == [0, 1, 2]
    assert [(d.event.data["n"], d.attempts) for d in bus.dead_letters] == [(0, 3), (1, 3), (2, 3)]
    assert [type(e.exception) for e in bus.errors] == [KeyError] * 3
    assert done == [True, True, True]


@pytest.mark.asyncio
async def test_backpressure_awaits_then_raises_and_keeps_refused_events_out(make_bus) -> None:
    bus = make_bus(workers=1, maxsize=2, put_timeout=0.05)
    release = asyncio.Event()
    seen: list[int] = []

    async def slow(event: Event) -> None:
        await release.wait()
        seen.append(event.data["n"])

    bus.subscribe("job.run", slow)
    await bus.emit("job.run", {"n": 0})
    await asyncio.sleep(0)  # the worker takes event 0
    await bus.emit("job.run", {"n": 1})
    await bus.emit("job.run", {"n": 2})
    with pytest.raises(QueueFullError, match="queue full"):
        await bus.emit("job.run", {"n": 3})
    assert [e.data["n"] for e in bus.event_log] == [0, 1, 2]  # the refused one left no trace
    waiting = asyncio.ensure_future(bus.emit("job.run", {"n": 4}))  # will find room
    release.set()
    await waiting
    assert await bus.join(timeout=5) and seen == [0, 1, 2, 4]


@pytest.mark.asyncio
async def test_close_drains_accepts_follow_ups_and_then_refuses(make_bus) -> None:
    bus = make_bus(workers=2)
    shipped: list[int] = []

    async def ship(event: Event) -> None:
        await bus.emit("order.shipped", event.data)  # a follow-up while the bus drains

    bus.subscribe("order.paid", ship)
    bus.subscribe("order.shipped", lambda e: shipped.append(e.data["id"]))
    async with bus:
        for n in range(20):
            await bus.emit("order.paid", {"id": n})
    assert sorted(shipped) == list(range(20)) and bus.closed
    with pytest.raises(BusClosedError):
        await bus.emit("order.paid", {"id": 99})
    assert await bus.close() is True


@pytest.mark.asyncio
async def test_close_with_a_timeout_dead_letters_what_is_left(make_bus) -> None:
    bus = make_bus(workers=1)
    never = asyncio.Event()

    async def stuck(event: Event) -> None:
        await never.wait()

    bus.subscribe("job.run", stuck)
    for n in range(3):
        await bus.emit("job.run", {"n": n})
    assert await bus.close(timeout=0.05) is False
    assert sorted(d.event.data["n"] for d in bus.dead_letters) == [0, 1, 2]
    assert bus.alive_workers() == 0


@pytest.mark.asyncio
async def test_a_cancelled_worker_task_is_replaced(make_bus) -> None:
    bus = make_bus(workers=1)
    entered = asyncio.Event()
    seen: list[int] = []

    async def listener(event: Event) -> None:
        if event.data["n"] == 0:
            entered.set()
            await asyncio.sleep(30)
        seen.append(event.data["n"])

    bus.subscribe("job.run", listener)
    for n in range(5):
        await bus.emit("job.run", {"n": n})
    await asyncio.wait_for(entered.wait(), 5)
    victim = bus._tasks[0]
    assert victim is not None
    victim.cancel()
    assert await bus.join(timeout=5)
    assert seen == [1, 2, 3, 4] and victim.cancelled()
    (letter,) = bus.dead_letters
    assert letter.event.data["n"] == 0 and isinstance(letter.exception, asyncio.CancelledError)
    assert bus.alive_workers() == 1


@pytest.mark.asyncio
async def test_join_from_a_listener_is_a_listener_error(make_bus) -> None:
    bus = make_bus(workers=1, max_retries=0)

    async def bad(event: Event) -> None:
        await bus.join()

    bus.subscribe("job.run", bad)
    await bus.emit("job.run")
    assert await bus.join(timeout=5)
    assert "wait for itself" in str(bus.dead_letters[0].exception)


@pytest.mark.asyncio
async def test_emit_threadsafe_from_another_thread(make_bus) -> None:
    bus = make_bus(workers=1)
    seen: list[int] = []
    bus.subscribe("job.run", lambda e: seen.append(e.data["n"]))
    bus.start()
    results: list[Any] = []

    def producer() -> None:
        for n in range(10):
            results.append(bus.emit_threadsafe("job.run", {"n": n}).result(10))

    thread = threading.Thread(target=producer)
    thread.start()
    await asyncio.to_thread(thread.join, 10)
    assert await bus.join(timeout=5)
    assert seen == list(range(10)) and all(isinstance(r, Event) for r in results)


def test_a_bus_belongs_to_the_loop_it_started_on() -> None:
    bus = AsyncEventBus(workers=1)

    async def first() -> None:
        await bus.emit("job.run")
        assert await bus.join(timeout=5)

    async def second() -> None:
        await bus.emit("job.run")

    asyncio.run(first())
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(second())
    with pytest.raises(RuntimeError, match="not started"):
        AsyncEventBus().emit_threadsafe("job.run")


@pytest.mark.asyncio
async def test_bad_input_and_options(make_bus) -> None:
    bus = make_bus(workers=1)
    with pytest.raises(ValueError, match="wildcard"):
        await bus.emit("job.*")
    assert bus.qsize() == 0 and await bus.join(timeout=1)
    await bus.emit("job.ok")  # the refused emit gave its room back
    with pytest.raises(ValueError, match="workers"):
        AsyncEventBus(workers=0)
