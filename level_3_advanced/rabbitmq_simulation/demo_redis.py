"""Level 3 demo: the same producer and workers over Redis pub/sub, then over Redis Streams.

Run it either way (needs a Redis; ``REDIS_URL``, default ``redis://localhost:6379/0``)::

    python level_3_advanced/rabbitmq_simulation/demo_redis.py
    python -m level_3_advanced.rabbitmq_simulation.demo_redis --count 20 --keep

In each variant the email worker runs from the start, while the analytics worker is down
for the first half of the registrations and starts before the second half.

What to look at in the output: with pub/sub the analytics worker never sees the first half
(nobody kept it for it); with Streams its consumer group kept its position, so it reads the
half it missed as soon as it starts. The keys are unique per run and deleted at the end
(``--keep`` leaves them for ``redis-cli XINFO GROUPS <stream>``).
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable
from typing import Any

import redis

from common.config import Settings
from common.logger import configure_logging, get_logger
from common.waiting import wait_until
from level_3_advanced.rabbitmq_simulation.consumer_analytics import AnalyticsHandler
from level_3_advanced.rabbitmq_simulation.consumer_email import EmailHandler
from level_3_advanced.rabbitmq_simulation.producer import Registration, UserRegistrationService
from level_3_advanced.rabbitmq_simulation.redis_pubsub import (
    RedisPubSubPublisher,
    RedisPubSubWorker,
    RedisStreamPublisher,
    RedisStreamWorker,
    redis_client,
)

log = get_logger(__name__)


def _register(service: UserRegistrationService, first: int, last: int) -> list[Registration]:
    return [service.register(f"user{i}@example.com", f"User {i}") for i in range(first, last)]


def run_variant(
    variant: str, url: str, prefix: str, count: int, timeout: float, write: Callable[[str], None]
) -> dict[str, Any]:
    """One variant ("pubsub" or "streams"): returns what each worker handled."""
    half = count // 2
    if variant == "pubsub":
        email: Any = RedisPubSubWorker("email_worker", EmailHandler(), url=url, prefix=prefix)
        analytics: Any = RedisPubSubWorker(
            "analytics_worker", AnalyticsHandler(), url=url, prefix=prefix
        )
        publisher: Any = RedisPubSubPublisher(redis_client(url), prefix, min_receivers=1)
    else:
        stream = f"{prefix}.stream"
        email = RedisStreamWorker("email_worker", EmailHandler(), url=url, stream=stream)
        analytics = RedisStreamWorker(
            "analytics_worker", AnalyticsHandler(), url=url, stream=stream
        )
        publisher = RedisStreamPublisher(redis_client(url), stream)
        analytics.ensure_group(publisher.client)  # deployed before it ever ran
    threads = [email.start()]
    try:
        with UserRegistrationService(publisher) as service:
            wait_until(email.ready.is_set, timeout, message="the email worker to subscribe")
            first = _register(service, 0, half)
            threads.append(analytics.start())
            wait_until(analytics.ready.is_set, timeout, message="the analytics worker to start")
            if variant == "pubsub":
                publisher.min_receivers = 2  # both are subscribed now: demand both
            second = _register(service, half, count)
        everyone = first + second
        wait_until(
            lambda: all(email.has_handled(r.event.id) for r in everyone),
            timeout,
            message="the email worker to handle everything",
        )
        expected = everyone if variant == "streams" else second
        wait_until(
            lambda: all(analytics.has_handled(r.event.id) for r in expected),
            timeout,
            message="the analytics worker to catch up",
        )
    finally:
        for worker in (email, analytics):
            worker.stop()
        for thread in threads:
            thread.join(timeout)
        for worker in (email, analytics):
            worker.close()
    missed = sum(1 for r in first if not analytics.has_handled(r.event.id))
    name = "pub/sub" if variant == "pubsub" else "streams"
    handled = f"{email.stats.handled}/{count}", f"{analytics.stats.handled}/{count}"
    write(f"| {name:<7} | {handled[0]:>12} | {handled[1]:>16} | {missed:>4} of {half:<22} |")
    return {"email": email.stats.handled, "analytics": analytics.stats.handled, "missed": missed}


def run(
    url: str, *, count: int, timeout: float, keep: bool, write: Callable[[str], None] = print
) -> dict[str, Any]:
    prefix = f"eda:demo:{uuid.uuid4().hex[:8]}"
    write(f"Redis at {url}; keys under {prefix}")
    write("| variant | email_worker | analytics_worker | lost while analytics was down |")
    write("|---------|-------------:|-----------------:|-------------------------------|")
    results = {}
    try:
        for variant in ("pubsub", "streams"):
            results[variant] = run_variant(variant, url, prefix, count, timeout, write)
    finally:
        client = redis_client(url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys and not keep:
                client.delete(*keys)
            write(f"{len(keys)} key(s) {'kept' if keep else 'deleted'}: {prefix}*")
        finally:
            client.close()
    return results


def main(argv: list[str] | None = None) -> int:
    settings = Settings.load()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=settings.redis_url, help="redis:// URL")
    parser.add_argument("--count", type=int, default=10, help="registrations (2..10000)")
    parser.add_argument("--timeout", type=float, default=20.0, help="deadline in seconds")
    parser.add_argument("--keep", action="store_true", help="keep the Redis keys")
    args = parser.parse_args(argv)
    if not 2 <= args.count <= 10_000:
        parser.error("--count must be between 2 and 10000")
    configure_logging(settings.eda_log_level, settings.eda_log_format)
    try:
        run(args.url, count=args.count, timeout=args.timeout, keep=args.keep)
    except (redis.RedisError, TimeoutError) as exc:
        log.error("the Redis demo failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
