"""``analytics_worker``: counts registrations, in total and by email domain.

Run it as its own process, beside the producer and the email worker::

    python level_3_advanced/rabbitmq_simulation/consumer_analytics.py --max-messages 10
    python -m level_3_advanced.rabbitmq_simulation.consumer_analytics --url amqp://guest:guest@localhost:5672/

A counter is the handler that redelivery hurts most: counting a redelivered event twice
is silently wrong. The worker's dedup by event id is what keeps the numbers right.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from typing import Any

from common.events import Event
from level_3_advanced.rabbitmq_simulation.broker import Target
from level_3_advanced.rabbitmq_simulation.topology import ANALYTICS_QUEUE
from level_3_advanced.rabbitmq_simulation.worker import Worker, run_worker_cli

__all__ = ["AnalyticsHandler", "analytics_worker", "main"]


class AnalyticsHandler:
    """Counts ``user.registered`` events by the domain of the address."""

    def __init__(self, *, work_seconds: float = 0.0) -> None:
        self.work_seconds = work_seconds
        self.total = 0
        self.by_domain: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> dict[str, Any]:
        email = event.data.get("email")
        if not isinstance(email, str) or "@" not in email:
            raise ValueError(f"event {event.id} has no valid 'email': {email!r}")
        domain = email.rsplit("@", 1)[1].lower()
        if self.work_seconds:
            time.sleep(self.work_seconds)  # stands for a write to an analytics store
        with self._lock:
            self.total += 1
            self.by_domain[domain] += 1
            return {"domain": domain, "total": self.total}


def analytics_worker(
    target: Target = None, *, name: str = ANALYTICS_QUEUE, work_seconds: float = 0.0, **options: Any
) -> Worker:
    """The analytics worker; its queue is ``name`` unless ``queue=`` (options go to Worker)."""
    return Worker(name, AnalyticsHandler(work_seconds=work_seconds), target=target, **options)


def _handler(args: argparse.Namespace) -> AnalyticsHandler:
    return AnalyticsHandler(work_seconds=args.work_ms / 1000)


def main(argv: list[str] | None = None) -> int:
    return run_worker_cli(ANALYTICS_QUEUE, _handler, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
