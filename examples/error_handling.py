"""Error handling on a queued bus: isolation, retries with backoff, dead letters.

    python examples/error_handling.py
    python -m examples.error_handling --events 6 --max-retries 1

Three listeners get every ``payment.received``: ``ledger`` always works, ``receipt`` fails
twice for each event before it succeeds (a flaky mail server), ``fraud_check`` always fails
for amounts over 500 (a bug). Watch: the ledger is never delayed or skipped; receipt is retried
alone, with growing pauses; fraud_check's hopeless events end as dead letters with the
exception, also kept in ``bus.errors``; and the worker thread is still alive at the end.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from typing import Any

from common.events import Event
from common.logger import configure_logging
from common.retry import Backoff
from level_2_intermediate.eventbus_queue import QueuedEventBus


def run(events: int, max_retries: int, write: Any = print) -> dict[str, Any]:
    """The scenario; returns counts for tests."""
    lock = threading.Lock()
    attempts: Counter[str] = Counter()
    ledger: list[int] = []
    started = time.perf_counter()

    def note(text: str) -> None:
        write(f"  {time.perf_counter() - started:6.3f}s {text}")

    def ledger_entry(event: Event) -> None:
        ledger.append(event.data["n"])
        note(f"ledger       ok   payment {event.data['n']}")

    def receipt(event: Event) -> None:
        key = f"receipt-{event.id}"
        with lock:
            attempts[key] += 1
            attempt = attempts[key]
        if attempt <= 2:
            note(f"receipt      FAIL payment {event.data['n']} (attempt {attempt})")
            raise ConnectionError("mail server busy")
        note(f"receipt      ok   payment {event.data['n']} (attempt {attempt})")

    def fraud_check(event: Event) -> None:
        if event.data["amount"] > 500:
            note(f"fraud_check  FAIL payment {event.data['n']} (amount {event.data['amount']})")
            raise ValueError(f"amount {event.data['amount']} overflows the risk table")
        note(f"fraud_check  ok   payment {event.data['n']}")

    bus = QueuedEventBus(workers=1, max_retries=max_retries, backoff=Backoff(base=0.01, cap=0.1))
    for listener in (ledger_entry, receipt, fraud_check):
        bus.subscribe("payment.received", listener)
    for n in range(events):
        bus.emit("payment.received", {"n": n, "amount": 200 * (n + 1)})
    bus.join(timeout=30)
    alive = bus.alive_workers()
    bus.close()
    write(f"ledger saw {len(ledger)} of {events} payments; worker alive at the end: {alive == 1}")
    write(f"dead letters ({len(bus.dead_letters)}), each also in bus.errors:")
    for letter in bus.dead_letters:
        write(
            f"  - payment {letter.event.data['n']}: {letter.listener} gave up after "
            f"{letter.attempts} attempts: {type(letter.exception).__name__}: {letter.exception}"
        )
    return {
        "ledger": ledger,
        "dead_letters": [(d.listener, d.event.data["n"], d.attempts) for d in bus.dead_letters],
        "errors": len(bus.errors),
        "alive": alive,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=4, choices=range(1, 101), metavar="N")
    parser.add_argument("--max-retries", type=int, default=3, choices=range(0, 11), metavar="R")
    args = parser.parse_args(argv)
    configure_logging("CRITICAL")  # this example prints its own account of every failure
    write_header = f"{args.events} payments, 3 listeners, up to {args.max_retries} retries each"
    print(write_header)
    run(args.events, args.max_retries)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
