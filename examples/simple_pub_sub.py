"""Publish/subscribe in twenty lines: exact and wildcard subscriptions, one emit, many listeners.

    python examples/simple_pub_sub.py
    python -m examples.simple_pub_sub --bus thread --count 5

With ``--bus sync`` (Level 1's EventBus) ``emit`` returns after the listeners ran; with
``--bus thread`` (Level 2's QueuedEventBus) it returns at once and a worker thread delivers —
``join()`` waits for it. The listeners and the output are the same: that is the point.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from common.events import Event
from common.logger import configure_logging
from level_1_basic.eventbus import EventBus
from level_2_intermediate.eventbus_queue import QueuedEventBus


def run(bus_kind: str, count: int, write: Callable[[str], Any] = print) -> list[str]:
    """Emit ``count`` user registrations and one order; returns the lines written."""
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        write(text)

    bus: Any = EventBus() if bus_kind == "sync" else QueuedEventBus(workers=1)

    def welcome(event: Event) -> None:
        say(f"  welcome email to {event.data['email']}")

    def audit(event: Event) -> None:
        say(f"  audit: {event.name} {event.data}")

    bus.subscribe("user.registered", welcome)  # one exact name
    bus.subscribe("user.*", audit)  # every user event: one segment after "user."
    bus.subscribe("#", lambda event: say(f"  metrics: +1 {event.name}"))  # everything

    for n in range(count):
        bus.emit("user.registered", {"user_id": n, "email": f"user{n}@example.com"})
    bus.emit("order.created", {"order_id": 1, "total_cents": 4990})
    if bus_kind == "thread":
        bus.join(timeout=10)  # the worker thread delivers: wait for it
    bus.close()
    say(f"{len(bus.event_log)} events emitted, {len(bus.errors)} listener errors")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bus", choices=("sync", "thread"), default="sync")
    parser.add_argument("--count", type=int, default=2, choices=range(0, 101), metavar="N")
    args = parser.parse_args(argv)
    configure_logging()
    print(f"bus: {args.bus}")
    run(args.bus, args.count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
