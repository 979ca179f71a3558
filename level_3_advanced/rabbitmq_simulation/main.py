"""Level 3 demo: one producer, two workers (email, analytics), a real or a simulated RabbitMQ.

Run it either way (the repository is installed, no path tricks)::

    python level_3_advanced/rabbitmq_simulation/main.py       # auto: RabbitMQ if it answers
    python -m level_3_advanced.rabbitmq_simulation.main --broker simulated --count 20 --kill-worker

It starts both workers, registers ``--count`` users (``user.registered``, persistent, with
publisher confirms), publishes one poison message, waits until **both** workers handled
**every** registration (with a deadline), and prints what each one did.

What to look at in the output: both workers handled all N (one event, two queues, two
copies); the poison message went to each worker's dead-letter queue with the reason; with
``--kill-worker`` the email worker's connection is cut mid-way (simulation only), its
unacked messages come back flagged ``redelivered``, and the ones it had already handled are
skipped as duplicates — nothing lost, nothing done twice.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from common.config import Settings
from common.logger import configure_logging, get_logger
from common.waiting import wait_until
from level_3_advanced.rabbitmq_simulation.broker import BROKER_MODES, choose_broker, connect
from level_3_advanced.rabbitmq_simulation.channel import BasicProperties
from level_3_advanced.rabbitmq_simulation.consumer_analytics import (
    AnalyticsHandler,
    analytics_worker,
)
from level_3_advanced.rabbitmq_simulation.consumer_email import email_worker
from level_3_advanced.rabbitmq_simulation.errors import BrokerError
from level_3_advanced.rabbitmq_simulation.producer import UserRegistrationService
from level_3_advanced.rabbitmq_simulation.simulated_rabbitmq import SimulatedBroker
from level_3_advanced.rabbitmq_simulation.topology import (
    ANALYTICS_QUEUE,
    EMAIL_QUEUE,
    EXCHANGE,
    ROUTING_KEY,
)
from level_3_advanced.rabbitmq_simulation.worker import Worker

log = get_logger(__name__)

DOMAINS = ("example.com", "example.org", "mail.test")


def publish_poison(target: str | SimulatedBroker, exchange: str = EXCHANGE) -> str:
    """Publish one body that is not an event (confirmed); returns its message id."""
    message_id = f"poison-{time.time_ns()}"
    with connect(target, name="poison-publisher") as channel:
        channel.confirm_delivery()
        channel.basic_publish(
            exchange,
            ROUTING_KEY,
            b'{"event": "user.registered", "data": ',  # truncated JSON
            BasicProperties(
                content_type="application/json", delivery_mode=2, message_id=message_id
            ),
            mandatory=True,
        )
    return message_id


def run(
    kind: str,
    target: str | SimulatedBroker,
    *,
    count: int,
    timeout: float,
    prefetch: int = 100,
    poison: bool = True,
    kill_worker: bool = False,
    namespace: str = "",
    write: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The scenario; returns a summary. ``main`` adds argument parsing around it.

    ``namespace`` prefixes every exchange and queue name (``<namespace>.user_events``...),
    so that a run can leave a broker's real ``user_events`` alone.
    """
    prefix = f"{namespace}." if namespace else ""
    exchange = f"{prefix}{EXCHANGE}"
    work = 0.001 if kill_worker else 0.0  # a little work, so the cut finds messages in flight
    email = email_worker(
        target,
        name=f"{prefix}{EMAIL_QUEUE}",
        exchange=exchange,
        prefetch=prefetch,
        work_seconds=work,
    )
    analytics = analytics_worker(
        target, name=f"{prefix}{ANALYTICS_QUEUE}", exchange=exchange, prefetch=prefetch
    )
    workers: list[Worker] = [email, analytics]
    threads = [w.start() for w in workers]
    try:
        wait_until(
            lambda: all(w.ready.is_set() for w in workers), timeout, message="workers to start"
        )
        start = time.perf_counter()
        with UserRegistrationService.connect(target, exchange=exchange) as service:
            registrations = []
            for i in range(count):
                registrations.append(
                    service.register(f"user{i}@{DOMAINS[i % len(DOMAINS)]}", f"User {i}")
                )
                if kill_worker and i == count // 2 and isinstance(target, SimulatedBroker):
                    wait_until(lambda: email.stats.handled > 0, timeout, message="first email")
                    target.kill_connections(email.name)
                    write(f"cut the email worker's connection after {i + 1} registrations")
            service.flush(timeout)
            published = time.perf_counter() - start
        write(
            f"published {count} user.registered events to exchange '{exchange}': "
            f"{service.confirmed} confirmed by the broker in {published * 1000:.0f} ms"
        )
        if poison:
            message_id = publish_poison(target, exchange)
            write(f"published 1 poison message ({message_id}): truncated JSON")
        ids = [r.event.id for r in registrations]
        pending = {w.name: list(ids) for w in workers}

        def all_done() -> bool:
            for w in workers:
                left = pending[w.name]
                while left and w.has_handled(left[-1]):
                    left.pop()
            dead = not poison or all(w.stats.dead_lettered >= 1 for w in workers)
            return dead and not any(pending.values())

        wait_until(
            all_done,
            timeout,
            message=lambda: (
                f"both workers to handle all {count} (left: "
                + ", ".join(f"{k}={len(v)}" for k, v in pending.items())
                + ")"
            ),
        )
        elapsed = time.perf_counter() - start
    finally:
        for w in workers:
            w.stop()
        for thread in threads:
            thread.join(timeout)
        for w in workers:
            w.close()

    for w in workers:
        s = w.stats
        write(
            f"{w.name + ':':<18} handled {s.handled}, duplicates skipped {s.duplicates}, "
            f"redelivered {s.redelivered}, reconnects {s.reconnects}, "
            f"dead-lettered {s.dead_lettered} -> {w.dlq}"
        )
    reason = email.stats.last_dead_letter_reason
    if reason:
        write(f"dead-letter reason (header x-dead-letter-reason): {reason[:90]}")
    handler = analytics.handler
    assert isinstance(handler, AnalyticsHandler)
    domains = ", ".join(f"{d}={n}" for d, n in sorted(handler.by_domain.items()))
    write(f"analytics: {handler.total} registrations by domain: {domains}")
    write(
        f"every one of the {count} events reached both workers in {elapsed:.2f}s on the "
        f"{'in-process simulation' if kind == 'simulated' else 'RabbitMQ broker'}"
    )
    return {
        "broker": kind,
        "count": count,
        "confirmed": service.confirmed,
        "workers": {w.name: w.stats for w in workers},
        "by_domain": dict(handler.by_domain),
        "seconds": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    settings = Settings.load()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=BROKER_MODES, default="auto")
    parser.add_argument("--url", default=settings.rabbitmq_url, help="amqp:// URL of RabbitMQ")
    parser.add_argument("--count", type=int, default=20, help="registrations (1..100000)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    parser.add_argument("--prefetch", type=int, default=100, help="per worker (1..65535)")
    parser.add_argument("--probe-timeout", type=float, default=1.0, help="for --broker auto")
    parser.add_argument("--no-poison", action="store_true", help="skip the poison message")
    parser.add_argument(
        "--namespace", default="", help="prefix for every exchange and queue name (default none)"
    )
    parser.add_argument(
        "--kill-worker",
        action="store_true",
        help="cut the email worker's connection half-way (simulation only)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 100_000:
        parser.error("--count must be between 1 and 100000")
    if not 0 < args.timeout <= 600:
        parser.error("--timeout must be in (0, 600]")
    if not 1 <= args.prefetch <= 65535:
        parser.error("--prefetch must be between 1 and 65535")
    if args.namespace and not all(part for part in args.namespace.split(".")):
        parser.error("--namespace must not have empty dot-separated parts")
    configure_logging(settings.eda_log_level, settings.eda_log_format)
    try:
        kind, target = choose_broker(args.broker, args.url, timeout=args.probe_timeout)
    except BrokerError as exc:
        log.error("%s", exc)
        return 1
    if args.kill_worker and kind != "simulated":
        log.warning("--kill-worker only works with the simulation; ignored")
    try:
        run(
            kind,
            target,
            count=args.count,
            timeout=args.timeout,
            prefetch=args.prefetch,
            poison=not args.no_poison,
            kill_worker=args.kill_worker,
            namespace=args.namespace,
        )
    except (BrokerError, TimeoutError) as exc:
        log.error("the demo failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
