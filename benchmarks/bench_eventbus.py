"""EventBus dispatch against pyee, blinker, pymitter and a floor, measured in one run.

Every case is a timed loop of ``emit`` calls with one listener that does nothing, so the number
is the cost of the bus itself. Our bus creates an Event and appends it to the event log on every
emit (pyee, blinker and pymitter do neither). Cases run interleaved, best of several repeats;
results are events/s and a ratio to the floor: a plain dict lookup plus a loop that calls the
listeners, the least any name-based dispatcher can do in Python.

    python -m benchmarks.bench_eventbus          # full run (~1 minute)
    python -m benchmarks.bench_eventbus --quick  # smoke run
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

from level_1_basic.eventbus import EventBus

try:  # the peers are benchmark-only dependencies (requirements-bench.txt)
    import blinker
    import pyee
    import pymitter
except ImportError:  # pragma: no cover - reported in the table
    pyee = blinker = pymitter = None  # type: ignore[assignment]

NAME = "order.created"
PAYLOAD = {"order_id": 1}
OTHERS = 10_000


def noop(*args: object, **kwargs: object) -> None:
    return None


# Each factory returns a function that runs ``n`` dispatches of NAME (the timed loop).
def floor_case() -> Callable[[int], None]:
    table = {NAME: [noop]}

    def loop(n: int) -> None:
        for _ in range(n):
            for listener in table[NAME]:
                listener(PAYLOAD)

    return loop


def ours(setup: Callable[[EventBus], None] | None = None) -> Callable[[], Callable[[int], None]]:
    def factory() -> Callable[[int], None]:
        bus = EventBus()
        if setup is not None:
            setup(bus)
        emit = bus.emit

        def loop(n: int) -> None:
            for _ in range(n):
                emit(NAME, PAYLOAD)

        return loop

    return factory


def exact(bus: EventBus) -> None:
    bus.subscribe(NAME, noop)


def exact_among_others(bus: EventBus) -> None:
    for i in range(OTHERS):
        bus.subscribe(f"other{i}.created", noop)
    bus.subscribe(NAME, noop)


def wildcard_among_wildcards(bus: EventBus) -> None:
    for i in range(OTHERS):
        bus.subscribe(f"other{i}.*" if i % 2 else f"other{i}.#", noop)
    bus.subscribe("order.*", noop)


def pyee_case(others: int = 0) -> Callable[[], Callable[[int], None]]:
    def factory() -> Callable[[int], None]:
        ee = pyee.EventEmitter()
        for i in range(others):
            ee.on(f"other{i}.created", noop)
        ee.on(NAME, noop)
        emit = ee.emit

        def loop(n: int) -> None:
            for _ in range(n):
                emit(NAME, PAYLOAD)

        return loop

    return factory


def blinker_case() -> Callable[[int], None]:
    ns = blinker.Namespace()
    ns.signal(NAME).connect(noop)
    signal = ns.signal

    def loop(n: int) -> None:
        for _ in range(n):
            signal(NAME).send(PAYLOAD)

    return loop


def pymitter_case(wildcards: int) -> Callable[[], Callable[[int], None]]:
    def factory() -> Callable[[int], None]:
        ee = pymitter.EventEmitter(wildcard=True)
        for i in range(wildcards):
            ee.on(f"other{i}.*", noop)
        ee.on("order.*", noop)
        emit = ee.emit

        def loop(n: int) -> None:
            for _ in range(n):
                emit(NAME, PAYLOAD)

        return loop

    return factory


def sub_unsub_case() -> Callable[[int], None]:
    bus = EventBus()
    for i in range(100):
        bus.subscribe(f"other{i}.*", noop)
    subscribe, unsubscribe = bus.subscribe, bus.unsubscribe

    def loop(n: int) -> None:
        for _ in range(n):
            subscribe(NAME, noop)
            unsubscribe(NAME, noop)

    return loop


def measure(cases: dict[str, tuple[Callable[[], Callable[[int], None]], int]], repeats: int):
    """Best events/s per case; the cases take turns in every repeat (interleaved)."""
    loops = {label: (factory(), n) for label, (factory, n) in cases.items()}
    best: dict[str, float] = dict.fromkeys(loops, 0.0)
    for _ in range(repeats):
        for label, (loop, n) in loops.items():
            loop(max(1, n // 10))  # warm up (fills caches)
            gc.collect()
            gc.disable()
            start = time.perf_counter()
            loop(n)
            elapsed = time.perf_counter() - start
            gc.enable()
            best[label] = max(best[label], n / elapsed)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="EventBus dispatch vs peers and a floor")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    n = 20_000 if args.quick else 300_000
    repeats = args.repeats or (2 if args.quick else 7)

    cases: dict[str, tuple[Callable[[], Callable[[int], None]], int]] = {
        "floor: dict lookup + loop calling listeners": (floor_case, n),
        "EventBus exact, 1 subscription": (ours(exact), n),
        f"EventBus exact, among {OTHERS:,} subscriptions": (ours(exact_among_others), n),
        f"EventBus wildcard, among {OTHERS:,} wildcard patterns": (
            ours(wildcard_among_wildcards),
            n,
        ),
        "EventBus subscribe+unsubscribe pairs": (sub_unsub_case, n // 2),
    }
    if pyee is not None:
        cases["pyee exact, 1 subscription"] = (pyee_case(), n)
        cases[f"pyee exact, among {OTHERS:,} subscriptions"] = (pyee_case(OTHERS), n)
        cases["blinker exact (named signal), 1 receiver"] = (blinker_case, n)
        cases["pymitter wildcard, 1 pattern"] = (pymitter_case(0), n // 3)
        cases["pymitter wildcard, among 1,000 wildcard patterns"] = (pymitter_case(1_000), 200)
    best = measure(cases, repeats)

    floor = best["floor: dict lookup + loop calling listeners"]
    own_exact = best["EventBus exact, 1 subscription"]
    pair_us = 1e6 / best["EventBus subscribe+unsubscribe pairs"]
    targets = {
        "EventBus exact, 1 subscription": ("≥ 0.25x floor", own_exact / floor >= 0.25),
        f"EventBus exact, among {OTHERS:,} subscriptions": (
            "≥ 0.8x own exact",
            best[f"EventBus exact, among {OTHERS:,} subscriptions"] / own_exact >= 0.8,
        ),
        f"EventBus wildcard, among {OTHERS:,} wildcard patterns": (
            "≥ 0.8x own exact",
            best[f"EventBus wildcard, among {OTHERS:,} wildcard patterns"] / own_exact >= 0.8,
        ),
        "EventBus subscribe+unsubscribe pairs": (f"< 5 µs ({pair_us:.2f} µs)", pair_us < 5),
    }
    print("| case | events/s | vs floor | target | met |")
    print("|---|---:|---:|---|---|")
    for label, rate in best.items():
        target, met = targets.get(label, ("", None))
        mark = "" if met is None else ("yes" if met else "**no**")
        print(f"| {label} | {rate:,.0f} | {rate / floor:.3f}x | {target} | {mark} |")
    if pyee is None:
        print("\n(pyee, blinker, pymitter not installed: `pip install -r requirements-bench.txt`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
