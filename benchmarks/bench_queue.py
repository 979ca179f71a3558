"""Level 2 queue-backed buses: throughput against a floor and against each other, in one run.

1. ``QueuedEventBus`` with 1, 2 and 4 workers and a trivial listener, against the floor: a bare
   ``queue.Queue`` put/get with one consumer thread (the least any queued bus must do).
   Target: 1 worker at least 0.5x the floor.
2. ``examples/multiple_workers.py``'s I/O-bound listener (sleeps 1 ms) with 1, 4 and 16 workers,
   against 1 worker. Target: 16 workers at least 10x (sleep releases the GIL).
3. A CPU-bound listener on ``ProcessEventBus`` against ``QueuedEventBus`` with the same number of
   workers (one per core): threads share the GIL, processes do not.

Runs are interleaved and the best of several repeats is kept; every result is a ratio to a
peer measured in the same run. ``python -m benchmarks --only queue`` or
``python -m benchmarks.bench_queue [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.events import Event
from common.logger import configure_logging
from examples.multiple_workers import measure as io_bound_rate
from level_2_intermediate.eventbus_process import ProcessEventBus
from level_2_intermediate.eventbus_queue import QueuedEventBus


def cpu_work(event: Event) -> None:
    """A CPU-bound listener (importable: worker processes run it)."""
    total = 0
    for i in range(event.data["loops"]):
        total += i * i
    if total < 0:
        raise AssertionError("unreachable")


def _noop(event: Event) -> None:
    pass


def floor_rate(events: int) -> float:
    """Bare queue.Queue: one producer puts, one consumer thread gets."""
    q: queue.Queue[dict[str, int]] = queue.Queue(maxsize=10_000)

    def consume() -> None:
        get = q.get
        for _ in range(events):
            get()

    consumer = threading.Thread(target=consume)
    consumer.start()
    started = time.perf_counter()
    put = q.put
    for n in range(events):
        put({"n": n})
    consumer.join()
    return events / (time.perf_counter() - started)


def queued_rate(workers: int, events: int) -> float:
    """QueuedEventBus, trivial listener: emit everything, then join."""
    with QueuedEventBus(workers=workers, maxsize=10_000) as bus:
        bus.subscribe("bench.event", _noop)
        bus.start()
        started = time.perf_counter()
        emit = bus.emit
        for n in range(events):
            emit("bench.event", {"n": n})
        if not bus.join(timeout=120):
            raise RuntimeError("the bus did not drain")
        return events / (time.perf_counter() - started)


def cpu_rate(bus: QueuedEventBus | ProcessEventBus, events: int, loops: int) -> float:
    bus.subscribe("bench.cpu", cpu_work)
    bus.start()  # process start-up is not part of the measurement
    started = time.perf_counter()
    for _ in range(events):
        bus.emit("bench.cpu", {"loops": loops})
    if not bus.join(timeout=300):
        raise RuntimeError("the bus did not drain")
    return events / (time.perf_counter() - started)


@dataclass
class Row:
    case: str
    rate: float
    peer: str
    ratio: float
    target: str = ""
    met: bool | None = None


def best(runs: dict[str, list[float]], name: str) -> float:
    return max(runs[name])


def measure_all(quick: bool, repeats: int) -> list[Row]:
    rows: list[Row] = []

    # 1. throughput against the bare queue floor
    events = 20_000 if quick else 200_000
    runs: dict[str, list[float]] = {}
    trials: list[tuple[str, Callable[[], float]]] = [("floor", lambda: floor_rate(events))]
    trials += [(f"q{k}", lambda k=k: queued_rate(k, events)) for k in (1, 2, 4)]
    floor_rate(2_000)  # warm-up: first calls pay for imports and cold caches
    queued_rate(1, 2_000)
    for _ in range(repeats):
        for name, trial in trials:  # interleaved: machine noise hits every case alike
            runs.setdefault(name, []).append(trial())
    floor = best(runs, "floor")
    rows.append(Row("bare queue.Queue put/get, 1 consumer (floor)", floor, "floor", 1.0))
    for k in (1, 2, 4):
        rate = best(runs, f"q{k}")
        target = "≥ 0.5x" if k == 1 else ""
        met = rate / floor >= 0.5 if k == 1 else None
        rows.append(
            Row(
                f"QueuedEventBus, {k} worker(s), trivial listener",
                rate,
                "floor",
                rate / floor,
                target,
                met,
            )
        )

    # 2. I/O-bound listener: examples/multiple_workers.py
    io_events = 300 if quick else 2_000
    runs = {}
    for _ in range(repeats):
        for k in (1, 4, 16):
            runs.setdefault(f"io{k}", []).append(io_bound_rate(k, io_events, 0.001))
    one = best(runs, "io1")
    for k in (1, 4, 16):
        rate = best(runs, f"io{k}")
        target = "≥ 10x" if k == 16 else ""
        met = rate / one >= 10 if k == 16 else None
        rows.append(
            Row(
                f"multiple_workers.py, sleep 1 ms, {k} worker(s)",
                rate,
                "1 worker",
                rate / one,
                target,
                met,
            )
        )

    # 3. CPU-bound listener: processes against threads, one worker per core
    cores = os.cpu_count() or 1
    cpu_events = 40 if quick else 200
    loops = 50_000
    runs = {}
    with ProcessEventBus(workers=cores) as pbus, QueuedEventBus(workers=cores) as tbus:
        for _ in range(repeats):
            runs.setdefault("threads", []).append(cpu_rate(tbus, cpu_events, loops))
            runs.setdefault("processes", []).append(cpu_rate(pbus, cpu_events, loops))
    threads = best(runs, "threads")
    processes = best(runs, "processes")
    rows.append(
        Row(f"QueuedEventBus, CPU-bound listener, {cores} workers", threads, "threads", 1.0)
    )
    rows.append(
        Row(
            f"ProcessEventBus, CPU-bound listener, {cores} workers",
            processes,
            "threads",
            processes / threads,
        )
    )
    return rows


def render(rows: list[Row]) -> str:
    lines = [
        "| case | events/s | ratio | vs | target |",
        "|------|---------:|------:|----|--------|",
    ]
    for r in rows:
        verdict = "" if r.met is None else (" met" if r.met else " **missed**")
        lines.append(
            f"| {r.case} | {r.rate:,.0f} | {r.ratio:.2f}x | {r.peer} | {r.target}{verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, choices=range(1, 11), metavar="R")
    args = parser.parse_args(argv)
    configure_logging("ERROR")
    repeats = args.repeats or (1 if args.quick else 3)
    cores = os.cpu_count()
    print(f"Python threads and processes on {cores} core(s); best of {repeats}, interleaved.\n")
    rows = measure_all(args.quick, repeats)
    print(render(rows))
    missed = [r.case for r in rows if r.met is False]
    if missed:
        print(f"\nmissed targets: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
