"""``email_worker``: sends a welcome email for every ``user.registered`` event.

Run it as its own process, beside the producer and the analytics worker::

    python level_3_advanced/rabbitmq_simulation/consumer_email.py --max-messages 10
    python -m level_3_advanced.rabbitmq_simulation.consumer_email --url amqp://guest:guest@localhost:5672/

The email is simulated: the record of it (recipient, subject) is the line the worker writes
to its journal before acking, so the journal is both the outbox and the dedup store.
``--work-ms`` makes each email take that long (to watch prefetch and redelivery happen).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from common.events import Event
from level_3_advanced.rabbitmq_simulation.broker import Target
from level_3_advanced.rabbitmq_simulation.topology import EMAIL_QUEUE
from level_3_advanced.rabbitmq_simulation.worker import Worker, run_worker_cli

__all__ = ["EmailHandler", "email_worker", "main"]


class EmailHandler:
    """Composes the welcome email; an event without a usable address is an error."""

    def __init__(self, *, work_seconds: float = 0.0, sender: str = "welcome@example.com") -> None:
        self.work_seconds = work_seconds
        self.sender = sender
        self.sent = 0

    def __call__(self, event: Event) -> dict[str, Any]:
        email = event.data.get("email")
        if not isinstance(email, str) or "@" not in email:
            raise ValueError(f"event {event.id} has no valid 'email': {email!r}")
        name = event.data.get("name") or email.split("@", 1)[0]
        if self.work_seconds:
            time.sleep(self.work_seconds)  # stands for the SMTP round trip
        self.sent += 1
        return {"from": self.sender, "to": email, "subject": f"Welcome, {name}!"}


def email_worker(
    target: Target = None, *, name: str = EMAIL_QUEUE, work_seconds: float = 0.0, **options: Any
) -> Worker:
    """The email worker; its queue is ``name`` unless ``queue=`` (options go to Worker)."""
    return Worker(name, EmailHandler(work_seconds=work_seconds), target=target, **options)


def _handler(args: argparse.Namespace) -> EmailHandler:
    return EmailHandler(work_seconds=args.work_ms / 1000)


def main(argv: list[str] | None = None) -> int:
    return run_worker_cli(EMAIL_QUEUE, _handler, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
