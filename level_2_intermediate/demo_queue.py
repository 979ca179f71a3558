"""Level 2 queue demo: a fast producer, a slow worker, a failing listener, the drain.

Run it either way:

    python level_2_intermediate/demo_queue.py
    python -m level_2_intermediate.demo_queue --events 100 --workers 2 --maxsize 10

What to look at: ``emit`` returns at once until the queue is full, then the producer waits for
room (backpressure: its total wait is printed); the ``audit`` listener fails now and then — it
is retried alone, the ``thumbnail`` listener and the worker carry on; ``close()`` drains what is
queued; the events the audit listener never handled are listed as dead letters; and a burst
with ``put_timeout=0`` shows a full queue refusing events with an error instead of losing them.
Set ``EDA_LOG_LEVEL=WARNING`` to see each retry logged.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from common.events import Event
from common.logger import configure_logging
from common.retry import Backoff
from level_2_intermediate.eventbus_queue import QueuedEventBus, QueueFullError


class UploadPipeline:
    """Two listeners on ``upload.received``: a slow one and an unreliable one."""

    def __init__(self, work_seconds: float) -> None:
        self.work_seconds = work_seconds
        self.lock = threading.Lock()
        self.thumbnails: list[int] = []
        self.audit_attempts: Counter[int] = Counter()
        self.audited: list[int] = []

    def thumbnail(self, event: Event) -> None:
        """Slow work (simulated I/O): the worker is slower than the producer."""
        time.sleep(self.work_seconds)
        with self.lock:
            self.thumbnails.append(event.data["n"])

    def audit(self, event: Event) -> None:
        """Fails on every 7th upload (always) and on the first try of every 5th (transient)."""
        n = event.data["n"]
        with self.lock:
            self.audit_attempts[n] += 1
            attempt = self.audit_attempts[n]
        if n % 7 == 6:
            raise PermissionError(f"upload {n}: audit store rejects this tenant")
        if n % 5 == 4 and attempt == 1:
            raise TimeoutError(f"upload {n}: audit store timed out")
        with self.lock:
            self.audited.append(n)


def run(
    events: int,
    workers: int,
    maxsize: int,
    work_seconds: float,
    put_timeout: float,
    write: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """The scenario; returns what happened (``main`` prints it, tests check it)."""
    pipeline = UploadPipeline(work_seconds)
    bus = QueuedEventBus(
        workers=workers,
        maxsize=maxsize,
        put_timeout=put_timeout,
        max_retries=2,
        backoff=Backoff(base=0.01, cap=0.05),
    )
    bus.subscribe("upload.received", pipeline.thumbnail)
    bus.subscribe("upload.received", pipeline.audit)
    write(
        f"producer: {events} uploads as fast as it can; {workers} worker(s) taking "
        f"{work_seconds * 1000:.0f} ms per upload; the queue holds {maxsize}"
    )
    started = time.perf_counter()
    blocked = 0.0
    told = False
    step = max(1, events // 6)
    for n in range(events):
        before = time.perf_counter()
        bus.emit("upload.received", {"n": n, "file": f"photo-{n:03d}.jpg"})
        waited = time.perf_counter() - before
        if waited > work_seconds / 2 and not told:
            told = True
            write(
                f"  emit #{n + 1} waited {waited * 1000:.0f} ms: the queue is full (backpressure)"
            )
        blocked += waited
        if (n + 1) % step == 0 or n + 1 == events:
            elapsed = time.perf_counter() - started
            write(f"  emitted {n + 1:>4} after {elapsed:.2f}s, {bus.qsize():>4} waiting")
    produced = time.perf_counter() - started
    write(
        f"producer done in {produced:.2f}s, {blocked:.2f}s of it waiting for room; "
        f"{bus.qsize()} upload(s) still queued"
    )
    while not bus.join(timeout=0.25):
        write(f"  draining: {bus.qsize()} waiting")
    failures = sum(pipeline.audit_attempts.values()) - len(pipeline.audited)
    alive = bus.alive_workers()
    bus.close()
    total = time.perf_counter() - started
    retried_ok = sum(1 for n in pipeline.audited if pipeline.audit_attempts[n] > 1)
    write(f"drained and closed after {total:.2f}s")
    write(f"  thumbnail: {len(pipeline.thumbnails)} of {events} uploads")
    write(
        f"  audit: {len(pipeline.audited)} ok ({retried_ok} of them after a retry), "
        f"{len(bus.dead_letters)} dead letters"
    )
    write(f"  {alive} of {workers} worker(s) alive after {failures} listener failures")
    write("dead letters (the audit listener gave up after every retry):")
    for letter in bus.dead_letters:
        exc = letter.exception
        write(
            f"  - {letter.event.data['file']}: {letter.listener}, {letter.attempts} attempts, "
            f"{type(exc).__name__}: {exc}"
        )

    accepted, refused = _burst(maxsize, write)
    return {
        "events": events,
        "thumbnails": sorted(pipeline.thumbnails),
        "audited": sorted(pipeline.audited),
        "dead_letters": [d.event.data["n"] for d in bus.dead_letters],
        "retried_ok": retried_ok,
        "alive_workers": alive,
        "producer_blocked_s": blocked,
        "burst_accepted": accepted,
        "burst_refused": refused,
    }


def _burst(maxsize: int, write: Callable[[str], Any]) -> tuple[int, int]:
    """Backpressure that refuses: a stalled worker and ``put_timeout=0``."""
    gate = threading.Event()
    with QueuedEventBus(workers=1, maxsize=maxsize, put_timeout=0) as bus:
        bus.subscribe("upload.received", lambda event: gate.wait(10))
        accepted = refused = 0
        for n in range(maxsize * 2):
            try:
                bus.emit("upload.received", {"n": n})
                accepted += 1
            except QueueFullError:
                refused += 1
        gate.set()
    write(
        f"burst of {maxsize * 2} into a stalled queue with put_timeout=0: {accepted} accepted "
        f"(and delivered), {refused} refused with QueueFullError: the producer knows, "
        "nothing is dropped silently"
    )
    return accepted, refused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60, choices=range(1, 10_001), metavar="N")
    parser.add_argument("--workers", type=int, default=1, choices=range(1, 65), metavar="K")
    parser.add_argument("--maxsize", type=int, default=10, choices=range(1, 10_001), metavar="M")
    parser.add_argument(
        "--work-ms", type=float, default=20.0, help="time the slow listener takes per event"
    )
    parser.add_argument("--put-timeout", type=float, default=2.0, help="seconds emit may wait")
    args = parser.parse_args(argv)
    if not 0 <= args.work_ms <= 1000:
        parser.error("--work-ms must be between 0 and 1000")
    if not 0 <= args.put_timeout <= 60:
        parser.error("--put-timeout must be between 0 and 60")
    # The demo prints its own account of every failure; the log adds retries on request.
    configure_logging(os.environ.get("EDA_LOG_LEVEL", "CRITICAL"))
    run(args.events, args.workers, args.maxsize, args.work_ms / 1000, args.put_timeout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
