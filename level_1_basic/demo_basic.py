"""Level 1 demo: three events, three listeners, one wildcard, one unsubscribe, an event log.

Run it either way (the repository is installed, no path tricks):

    python level_1_basic/demo_basic.py
    python -m level_1_basic.demo_basic --log-file /tmp/events.log

What to look at in the output: which listener ran for which event (``email_sender`` only for
``user.registered``; ``logger`` for every ``user.*`` event through one wildcard subscription;
``analytics`` for everything), and that after the unsubscribe ``email_sender`` stays silent.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from common.events import Event
from common.logger import configure_logging
from level_1_basic.eventbus import EventBus

DEFAULT_LOG = Path(__file__).resolve().parent / "logs" / "events.log"


class DemoListeners:
    """The assignment's three listeners. Each writes what it did through ``write``."""

    def __init__(self, write: Callable[[str], None] = print) -> None:
        self.write = write
        self.emails_sent: list[str] = []
        self.counts: Counter[str] = Counter()

    def email_sender(self, event: Event) -> None:
        """Sends a welcome email when a user registers."""
        email = event.data["email"]
        self.emails_sent.append(email)
        self.write(f"  email_sender -> welcome email to {email}")

    def logger(self, event: Event) -> None:
        """Logs every user event (subscribed once, to the wildcard ``user.*``)."""
        self.write(f"  logger       -> [{event.name}] {event.data}")

    def analytics(self, event: Event) -> None:
        """Counts every event by name (subscribed to ``#``)."""
        self.counts[event.name] += 1
        self.write(f"  analytics    -> {event.name} seen {self.counts[event.name]} time(s)")


def run(log_file: Path | None, write: Callable[[str], None] = print) -> dict:
    """The scenario, returning a summary; ``main`` adds argument parsing around it."""
    listeners = DemoListeners(write)
    with EventBus(log_file) as bus:
        bus.subscribe("user.registered", listeners.email_sender)
        bus.subscribe("user.*", listeners.logger)
        bus.subscribe("#", listeners.analytics)

        script = [
            ("user.registered", {"user_id": 1, "email": "ann@example.com"}),
            ("order.created", {"order_id": 777, "user_id": 1, "total": 49.9}),
            ("user.registered", {"user_id": 2, "email": "bob@example.com"}),
            ("user.deleted", {"user_id": 2}),
        ]
        for name, data in script:
            write(f"emit {name} {data}")
            bus.emit(name, data)

        removed = bus.unsubscribe("user.registered", listeners.email_sender)
        write(f"unsubscribe email_sender from user.registered: {removed}")
        write("emit user.registered {'user_id': 3, 'email': 'cy@example.com'}")
        bus.emit("user.registered", {"user_id": 3, "email": "cy@example.com"})

        summary = {
            "events": len(bus.event_log),
            "emails_sent": len(listeners.emails_sent),
            "by_name": dict(listeners.counts),
            "errors": len(bus.errors),
            "log_file": str(log_file) if log_file else None,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-file",
        type=Path,
        default=DEFAULT_LOG,
        help="JSON-lines event log (default: %(default)s)",
    )
    parser.add_argument("--no-log", action="store_true", help="keep the event log in memory only")
    parser.add_argument(
        "--keep-log", action="store_true", help="append to an existing log instead of starting anew"
    )
    args = parser.parse_args(argv)
    configure_logging()

    log_file = None if args.no_log else args.log_file
    if log_file is not None and not args.keep_log and log_file.exists():
        log_file.unlink()  # each run of the demo starts a fresh log
    summary = run(log_file)
    print(
        f"summary: {summary['events']} events, {summary['emails_sent']} welcome emails, "
        f"by name {summary['by_name']}, {summary['errors']} listener errors"
    )
    if log_file is not None:
        print(f"event log: {log_file} (+{summary['events']} JSON lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
