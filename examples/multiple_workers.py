"""Throughput as workers grow, with a listener that sleeps to simulate I/O.

    python examples/multiple_workers.py
    python -m examples.multiple_workers --events 2000 --sleep-ms 1 --workers 1 4 16 64

Each event's listener sleeps (a database call, an HTTP request). Python threads share one
interpreter lock, but ``time.sleep`` — like real I/O — releases it, so K worker threads wait
for K calls at once and throughput grows almost K times. Replace the sleep by CPU work and the
curve goes flat: that is the case for ``ProcessEventBus`` (see benchmarks/bench_queue.py).
"""

from __future__ import annotations

import argparse
import threading
import time

from common.events import Event
from common.logger import configure_logging
from level_2_intermediate.eventbus_queue import QueuedEventBus


def measure(workers: int, events: int, sleep_s: float) -> float:
    """Events per second through a QueuedEventBus of ``workers`` threads; I/O-bound listener."""
    handled = 0
    lock = threading.Lock()

    def io_bound(event: Event) -> None:
        nonlocal handled
        time.sleep(sleep_s)
        with lock:
            handled += 1

    with QueuedEventBus(workers=workers, maxsize=events) as bus:
        bus.subscribe("job.run", io_bound)
        bus.start()  # thread start-up is not part of the measurement
        started = time.perf_counter()
        for n in range(events):
            bus.emit("job.run", {"n": n})
        if not bus.join(timeout=max(60.0, events * sleep_s * 2)):
            raise RuntimeError("the workers did not finish in time")
        elapsed = time.perf_counter() - started
    if handled != events:
        raise RuntimeError(f"{handled} of {events} events handled")
    return events / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=400, choices=range(1, 100_001), metavar="N")
    parser.add_argument("--sleep-ms", type=float, default=1.0, help="simulated I/O per event")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 4, 16], help="worker counts to try"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.sleep_ms <= 100:
        parser.error("--sleep-ms must be between 0 and 100")
    if any(not 1 <= w <= 256 for w in args.workers):
        parser.error("--workers must be between 1 and 256")
    configure_logging()
    print(f"{args.events} events, listener sleeps {args.sleep_ms} ms (simulated I/O)")
    print("| workers | events/s | speed-up vs 1 worker |")
    print("|--------:|---------:|---------------------:|")
    base = None
    for workers in args.workers:
        rate = measure(workers, args.events, args.sleep_ms / 1000)
        base = base or (rate if workers == 1 else None)
        speedup = f"{rate / base:.1f}x" if base else "-"
        print(f"| {workers:>7} | {rate:>8,.0f} | {speedup:>20} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
