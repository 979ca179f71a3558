"""The same producer and the same two workers over Redis: pub/sub, and Streams.

Same producer: :class:`~.producer.UserRegistrationService` over a
:class:`RedisPubSubPublisher` or a :class:`RedisStreamPublisher`. Same workers: the email and
analytics handlers, run by :class:`RedisPubSubWorker` or :class:`RedisStreamWorker` through the
same :class:`~.worker.EventProcessor` (parse, dedup by id, handle, journal, dead-letter).

The difference that matters:

* **pub/sub** (``PUBLISH``/``SUBSCRIBE``) delivers to the subscribers connected *right now*
  and keeps nothing: a worker that is down, restarting or reconnecting misses what was
  published meanwhile, and there is no ack, so a worker that dies mid-message loses it. The
  only signal is ``PUBLISH``'s count of receivers, which the publisher checks
  (``min_receivers``): fewer is an :class:`~.errors.UnroutableError`, never silence;
* **Streams** (``XADD`` + consumer groups, ``XREADGROUP``/``XACK``) keep every entry in the
  stream; each group (one per worker) has its own position and a pending list of entries
  delivered but not acked. A worker that was down reads what it missed when it comes back;
  a worker that died re-reads its own pending entries on restart (same consumer name), and
  another consumer takes over entries idle for ``claim_idle_ms`` with ``XAUTOCLAIM``. That is
  RabbitMQ's at-least-once, with Kafka's retention: an entry trimmed by ``MAXLEN`` before a
  slow group read it is gone.

Durability: Redis acknowledges ``XADD`` once it is in memory; it survives a restart only as
far as the server's ``appendonly``/``appendfsync`` settings go.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis

from common.events import Event
from common.logger import get_logger
from common.retry import Backoff
from level_3_advanced.rabbitmq_simulation.channel import Confirmation
from level_3_advanced.rabbitmq_simulation.errors import ConnectionLost, UnroutableError
from level_3_advanced.rabbitmq_simulation.worker import (
    DEAD,
    RETRY,
    EventProcessor,
    Handler,
    WorkerStats,
    run_reconnecting,
    start_in_thread,
)

__all__ = [
    "RedisPubSubPublisher",
    "RedisPubSubWorker",
    "RedisStreamPublisher",
    "RedisStreamWorker",
    "redis_client",
]

log = get_logger(__name__)

CHANNEL_PREFIX = "user_events"
STREAM = "user_events"
RECONNECT_BACKOFF = Backoff(base=0.2, factor=2.0, cap=10.0)
_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def redis_client(url: str, *, timeout: float = 5.0) -> redis.Redis:
    """A client for ``redis://`` URLs with bounded connect and socket timeouts."""
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)


# -- publishers (the producer's side) ----------------------------------------------------------
class RedisPubSubPublisher:
    """``PUBLISH <prefix>.<event name> <event JSON>``; too few receivers is an error."""

    def __init__(
        self, client: redis.Redis, prefix: str = CHANNEL_PREFIX, *, min_receivers: int = 1
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.min_receivers = min_receivers

    def channel_for(self, event_name: str) -> str:
        return f"{self.prefix}.{event_name}"

    def publish_event(self, event: Event) -> Confirmation:
        channel = self.channel_for(event.name)
        try:
            receivers = self.client.publish(channel, event.to_json_bytes())
        except _REDIS_ERRORS as exc:
            raise ConnectionLost(f"redis: {exc}") from exc
        error = None
        if receivers < self.min_receivers:
            error = UnroutableError(
                f"{receivers} subscriber(s) of {channel!r} received {event.id} "
                f"(at least {self.min_receivers} expected): pub/sub keeps nothing for absent ones",
                message_id=event.id,
            )
        return Confirmation.resolved(event.id, error)

    def flush(self, timeout: float | None = None) -> bool:
        return True  # PUBLISH answers synchronously

    def close(self) -> None:
        self.client.close()


class RedisStreamPublisher:
    """``XADD <stream> MAXLEN ~ <maxlen> * event <JSON> id <event id>``."""

    def __init__(self, client: redis.Redis, stream: str = STREAM, *, maxlen: int = 100_000):
        self.client = client
        self.stream = stream
        self.maxlen = maxlen

    def publish_event(self, event: Event) -> Confirmation:
        try:
            self.client.xadd(
                self.stream,
                {"event": event.to_json_bytes(), "id": event.id},
                maxlen=self.maxlen,
                approximate=True,
            )
        except _REDIS_ERRORS as exc:
            raise ConnectionLost(f"redis: {exc}") from exc
        return Confirmation.resolved(event.id)

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        self.client.close()


# -- workers ------------------------------------------------------------------------------------
class _RedisWorker:
    """The reconnect loop and the stop flag the two Redis workers share."""

    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        url: str,
        max_attempts: int,
        journal: str | Path | None,
        backoff: Backoff,
        poll_interval: float,
    ) -> None:
        self.name = name
        self.url = url
        self.processor = EventProcessor(name, handler, max_attempts=max_attempts, journal=journal)
        self.stats: WorkerStats = self.processor.stats
        self.backoff = backoff
        self.poll_interval = poll_interval
        self.ready = threading.Event()
        self._stop = threading.Event()

    def has_handled(self, event_id: str) -> bool:
        return self.processor.has_handled(event_id)

    def run(self) -> WorkerStats:
        """Consume until :meth:`stop`; reconnect (capped backoff) when Redis goes away."""
        run_reconnecting(
            self.name,
            self._connected_session,
            # NOGROUP: Redis restarted without its data; the next session creates the group.
            retryable=lambda exc: isinstance(exc, _REDIS_ERRORS) or "NOGROUP" in str(exc),
            stop=self._stop,
            backoff=self.backoff,
            healthy_after=5.0,
            stats=self.stats,
        )
        return self.stats

    def _connected_session(self) -> None:
        client = redis_client(self.url)
        self.stats.sessions += 1
        try:
            self._session(client)
        finally:
            self.ready.clear()
            client.close()

    def start(self) -> threading.Thread:
        """Run in a daemon thread; returns it (join it after :meth:`stop`)."""
        return start_in_thread(self.name, self.run)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.stop()
        self.processor.close()

    def _session(self, client: redis.Redis) -> None:
        raise NotImplementedError


class RedisPubSubWorker(_RedisWorker):
    """Subscribes to ``<prefix>.<event name>``; at most once (see the module docstring).

    A failing handler is retried at once, in process (nothing would redeliver it); after
    ``max_attempts`` the message goes to the Redis stream ``dead_letter_key`` with the
    reason.
    """

    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        url: str,
        prefix: str = CHANNEL_PREFIX,
        event_names: Iterable[str] = ("user.registered",),
        dead_letter_key: str | None = None,
        max_attempts: int = 3,
        journal: str | Path | None = None,
        backoff: Backoff = RECONNECT_BACKOFF,
        poll_interval: float = 0.2,
    ) -> None:
        super().__init__(
            name,
            handler,
            url=url,
            max_attempts=max_attempts,
            journal=journal,
            backoff=backoff,
            poll_interval=poll_interval,
        )
        self.channels = [f"{prefix}.{n}" for n in event_names]
        self.dead_letter_key = dead_letter_key or f"{prefix}.{name}.dlq"

    def _session(self, client: redis.Redis) -> None:
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(*self.channels)
            # Live once Redis confirmed every subscription: only then is the worker "ready".
            confirmed = 0
            while confirmed < len(self.channels) and not self._stop.is_set():
                message = pubsub.get_message(timeout=self.poll_interval)
                if message is not None and message["type"] == "subscribe":
                    confirmed += 1
            self.ready.set()
            log.info("%s: subscribed to %s", self.name, ", ".join(self.channels))
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=self.poll_interval)
                if message is not None and message["type"] == "message":
                    self._handle(client, message["data"])
        finally:
            pubsub.close()

    def _handle(self, client: redis.Redis, body: bytes) -> None:
        kind, reason, attempts = self.processor.process(body)
        while kind is RETRY:
            kind, reason, attempts = self.processor.process(body)
        if kind is DEAD:
            client.xadd(
                self.dead_letter_key,
                {"body": body, "reason": reason or "", "worker": self.name, "attempts": attempts},
            )
            self.processor.dead_lettered(reason or "")
            log.error("%s: dead-lettered to %s: %s", self.name, self.dead_letter_key, reason)


class RedisStreamWorker(_RedisWorker):
    """A consumer in the group ``group`` (default: the worker's name) of ``stream``.

    Each loop: re-read this consumer's own pending entries when there may be some (after a
    restart, or a failed handler left one for retry), take over entries that another
    consumer left idle for ``claim_idle_ms`` (``XAUTOCLAIM``), then block up to
    ``poll_interval`` for new ones (``XREADGROUP ... >``). Handled and duplicate entries are
    acked in one ``XACK`` per batch; poison ones go to ``dead_letter_key`` (a stream) with
    the reason, then are acked. ``consumer`` must stay the same across restarts of one
    worker so that it finds its own pending entries.
    """

    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        url: str,
        stream: str = STREAM,
        group: str | None = None,
        consumer: str | None = None,
        start_id: str = "0",
        batch: int = 100,
        claim_idle_ms: int = 30_000,
        dead_letter_key: str | None = None,
        max_attempts: int = 3,
        journal: str | Path | None = None,
        backoff: Backoff = RECONNECT_BACKOFF,
        poll_interval: float = 0.2,
    ) -> None:
        super().__init__(
            name,
            handler,
            url=url,
            max_attempts=max_attempts,
            journal=journal,
            backoff=backoff,
            poll_interval=poll_interval,
        )
        self.stream = stream
        self.group = group or name
        self.consumer = consumer or f"{name}@{socket.gethostname()}"
        self.start_id = start_id
        self.batch = batch
        self.claim_idle_ms = claim_idle_ms
        self.dead_letter_key = dead_letter_key or f"{stream}.{self.group}.dlq"
        self._backlog = True  # read our own pending entries first
        self._claim_from = "0-0"
        self._next_claim = 0.0

    def ensure_group(self, client: redis.Redis) -> None:
        """Create the stream and the group if needed (``start_id`` "0": the whole stream)."""
        try:
            client.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _session(self, client: redis.Redis) -> None:
        self.ensure_group(client)
        self._backlog = True
        self.ready.set()
        log.info(
            "%s: consumer %s of group %s on %s", self.name, self.consumer, self.group, self.stream
        )
        block_ms = max(1, int(self.poll_interval * 1000))
        while not self._stop.is_set():
            if self._backlog:
                entries = self._read(client, "0", None)
                self._backlog = bool(entries)
                if entries:
                    self._handle(client, entries, redelivered=True)
                    continue
            now = time.monotonic()
            if now >= self._next_claim:
                self._next_claim = now + max(self.claim_idle_ms / 1000 / 2, self.poll_interval)
                claimed = self._claim(client)
                if claimed:
                    self._handle(client, claimed, redelivered=True)
                    continue
            entries = self._read(client, ">", block_ms)
            if entries:
                self._handle(client, entries, redelivered=False)

    def _read(self, client: redis.Redis, position: str, block_ms: int | None) -> list[Any]:
        response = client.xreadgroup(
            self.group, self.consumer, {self.stream: position}, count=self.batch, block=block_ms
        )
        return [entry for _, entries in response or () for entry in entries]

    def _claim(self, client: redis.Redis) -> list[Any]:
        result = client.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=self._claim_from,
            count=self.batch,
        )
        next_id, claimed = result[0], result[1]
        self._claim_from = next_id.decode() if isinstance(next_id, bytes) else str(next_id)
        if claimed:
            log.info("%s: took over %d idle entries", self.name, len(claimed))
        return claimed

    def _handle(self, client: redis.Redis, entries: list[Any], *, redelivered: bool) -> None:
        acks = []
        dead: list[str] = []
        for entry_id, fields in entries:
            if not fields:  # trimmed or deleted while pending: nothing left to handle
                acks.append(entry_id)
                continue
            body = fields.get(b"event", b"")
            kind, reason, attempts = self.processor.process(body, redelivered)
            if kind is RETRY:
                self._backlog = True  # stays pending: re-read from our pending list
                continue
            if kind is DEAD:
                client.xadd(
                    self.dead_letter_key,
                    {
                        "body": body,
                        "reason": reason or "",
                        "worker": self.name,
                        "attempts": attempts,
                        "entry": entry_id,
                    },
                )
                dead.append(reason or "")
                log.error("%s: dead-lettered %r: %s", self.name, entry_id, reason)
            acks.append(entry_id)
        if acks:
            client.xack(self.stream, self.group, *acks)
        for reason in dead:
            self.processor.dead_lettered(reason)
