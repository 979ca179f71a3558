"""The Redis variants: pub/sub forgets absent subscribers, Streams keep and redeliver.

Every test uses keys under its own unique prefix and deletes them afterwards (the Redis
server is shared).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from common.events import Event
from common.waiting import wait_until
from level_3_advanced.rabbitmq_simulation import demo_redis
from level_3_advanced.rabbitmq_simulation.consumer_analytics import AnalyticsHandler
from level_3_advanced.rabbitmq_simulation.consumer_email import EmailHandler
from level_3_advanced.rabbitmq_simulation.errors import PublishFailed, UnroutableError
from level_3_advanced.rabbitmq_simulation.producer import UserRegistrationService
from level_3_advanced.rabbitmq_simulation.redis_pubsub import (
    RedisPubSubPublisher,
    RedisPubSubWorker,
    RedisStreamPublisher,
    RedisStreamWorker,
    redis_client,
)

pytestmark = pytest.mark.redis
DEADLINE = 20.0


@pytest.fixture
def prefix(redis_url: str, unique_name: str) -> Iterator[str]:
    prefix = f"eda:test:{unique_name}"
    yield prefix
    client = redis_client(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis_client(redis_url)
    yield client
    client.close()


@pytest.fixture
def run() -> Iterator[Callable[[Any], Any]]:
    started: list[tuple[Any, Any]] = []

    def start(worker: Any) -> Any:
        started.append((worker, worker.start()))
        assert worker.ready.wait(DEADLINE), f"{worker.name} did not start"
        return worker

    yield start
    for worker, _ in started:
        worker.stop()
    for worker, thread in started:
        thread.join(DEADLINE)
        worker.close()
        assert not thread.is_alive()


def register(service: UserRegistrationService, tag: str, n: int) -> list[str]:
    return [service.register(f"{tag}{i}@example.com", f"{tag} {i}").event.id for i in range(n)]


def test_pubsub_delivers_every_event_to_both_subscribed_workers(
    redis_url: str, prefix: str, client: redis.Redis, run: Callable[[Any], Any]
) -> None:
    email = run(RedisPubSubWorker("email_worker", EmailHandler(), url=redis_url, prefix=prefix))
    stats = run(
        RedisPubSubWorker("analytics_worker", AnalyticsHandler(), url=redis_url, prefix=prefix)
    )
    service = UserRegistrationService(RedisPubSubPublisher(client, prefix, min_receivers=2))
    ids = register(service, "u", 20)
    service.flush()
    assert service.confirmed == 20
    wait_until(
        lambda: all(w.has_handled(i) for w in (email, stats) for i in ids),
        DEADLINE,
        message="both subscribers to handle all 20",
    )
    assert stats.processor.handler.total == 20


def test_pubsub_loses_what_was_published_while_a_worker_was_down_and_says_so(
    redis_url: str, prefix: str, client: redis.Redis, run: Callable[[Any], Any]
) -> None:
    email = run(RedisPubSubWorker("email_worker", EmailHandler(), url=redis_url, prefix=prefix))
    service = UserRegistrationService(RedisPubSubPublisher(client, prefix, min_receivers=2))
    with pytest.raises(PublishFailed) as info:  # only one of the two is listening
        register(service, "early", 2)
    assert isinstance(info.value.failures[0][1], UnroutableError)
    assert "1 subscriber(s)" in str(info.value)
    early = [f for f, _ in info.value.failures]
    stats = run(
        RedisPubSubWorker("analytics_worker", AnalyticsHandler(), url=redis_url, prefix=prefix)
    )
    late = register(service, "late", 3)
    wait_until(lambda: all(stats.has_handled(i) for i in late), DEADLINE, message="late ones")
    wait_until(lambda: all(email.has_handled(i) for i in early), DEADLINE, message="email")
    assert not any(stats.has_handled(i) for i in early)  # gone for good: nothing kept them
    assert stats.stats.handled == 3


def test_streams_keep_events_for_a_worker_that_was_down(
    redis_url: str, prefix: str, client: redis.Redis, run: Callable[[Any], Any]
) -> None:
    stream = f"{prefix}.stream"
    email = run(RedisStreamWorker("email_worker", EmailHandler(), url=redis_url, stream=stream))
    stats = RedisStreamWorker("analytics_worker", AnalyticsHandler(), url=redis_url, stream=stream)
    stats.ensure_group(client)  # the group exists (deployed) but its worker is down
    service = UserRegistrationService(RedisStreamPublisher(client, stream))
    while_down = register(service, "a", 10)
    run(stats)
    after = register(service, "b", 5)
    wait_until(
        lambda: all(w.has_handled(i) for w in (email, stats) for i in while_down + after),
        DEADLINE,
        message="both groups to read all 15",
    )
    assert stats.stats.handled == 15
    for group in ("email_worker", "analytics_worker"):
        assert client.xpending(stream, group)["pending"] == 0  # all acked


def test_streams_entries_left_pending_by_a_dead_consumer_are_taken_over_once(
    redis_url: str, prefix: str, client: redis.Redis, run: Callable[[Any], Any]
) -> None:
    stream = f"{prefix}.stream"
    calls: Counter[str] = Counter()

    def handler(event: Event) -> None:
        calls[event.id] += 1

    worker = RedisStreamWorker(
        "email_worker", handler, url=redis_url, stream=stream, claim_idle_ms=100
    )
    worker.ensure_group(client)
    ids = register(UserRegistrationService(RedisStreamPublisher(client, stream)), "u", 6)
    # A consumer reads four entries and dies before acking them: they stay pending for it.
    taken = client.xreadgroup("email_worker", "crashed-1", {stream: ">"}, count=4)
    assert len(taken[0][1]) == 4
    run(worker)
    wait_until(lambda: all(worker.has_handled(i) for i in ids), DEADLINE, message="all 6")
    assert set(calls) == set(ids)
    assert set(calls.values()) == {1}
    assert worker.stats.redelivered == 4
    wait_until(
        lambda: client.xpending(stream, "email_worker")["pending"] == 0,
        DEADLINE,
        message="nothing pending",
    )


def test_streams_poison_entries_go_to_the_dead_letter_stream_with_the_reason(
    redis_url: str, prefix: str, client: redis.Redis, run: Callable[[Any], Any]
) -> None:
    stream = f"{prefix}.stream"
    worker = RedisStreamWorker(
        "email_worker", EmailHandler(), url=redis_url, stream=stream, max_attempts=2
    )
    worker.ensure_group(client)
    client.xadd(stream, {"event": b"{broken"})
    no_email = Event.create("user.registered", {"name": "nobody"})
    client.xadd(stream, {"event": no_email.to_json_bytes()})
    good = register(UserRegistrationService(RedisStreamPublisher(client, stream)), "u", 2)
    run(worker)
    wait_until(
        lambda: worker.stats.dead_lettered == 2 and all(worker.has_handled(i) for i in good),
        DEADLINE,
        message=lambda: f"2 dead letters and 2 handled: {worker.stats}",
    )
    dead = client.xrange(worker.dead_letter_key)
    reasons = sorted(fields[b"reason"].decode() for _, fields in dead)
    assert reasons[0].startswith("handler failed 2 time(s): ValueError")
    assert reasons[1].startswith("invalid event: malformed JSON")
    wait_until(
        lambda: client.xpending(stream, "email_worker")["pending"] == 0,
        DEADLINE,
        message="poison entries acked",
    )


def test_pubsub_poison_messages_are_dead_lettered_too(
    redis_url: str, prefix: str, client: redis.Redis, run: Callable[[Any], Any]
) -> None:
    worker = run(RedisPubSubWorker("email_worker", EmailHandler(), url=redis_url, prefix=prefix))
    client.publish(f"{prefix}.user.registered", b"not an event")
    wait_until(lambda: worker.stats.dead_lettered == 1, DEADLINE, message="one dead letter")
    [(_, fields)] = client.xrange(worker.dead_letter_key)
    assert fields[b"body"] == b"not an event"
    assert fields[b"reason"].startswith(b"invalid event")


def test_redis_demo_shows_the_difference(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo_redis.main(["--url", redis_url, "--count", "8"]) == 0
    out = capsys.readouterr().out
    assert "| pub/sub |          8/8 |              4/8 |    4 of 4" in out
    assert "| streams |          8/8 |              8/8 |    0 of 4" in out
    assert "deleted" in out
