"""A worker that loses nothing: manual acks, dedup by event id, a DLQ, and reconnects.

What happens to each delivery (:class:`EventProcessor` decides, :class:`Worker` acts):

1. the body is parsed as the common Event JSON; a body that is not one is **poison**: it is
   published to the dead-letter exchange with the reason in the ``x-dead-letter-reason``
   header (confirmed), then acked — it never comes back;
2. an event whose id this worker has handled before (a redelivery after a crash or a lost
   ack) is acked without running the handler again: **idempotent by event id**;
3. the handler runs; if it raises, the message is requeued (``basic_nack(requeue=True)``) and
   retried, up to ``max_attempts``; then it is dead-lettered with the exception as reason;
4. on success, the handler's result is appended to the worker's journal together with the
   event id (one line, one write), and only **then** the message is acked. The journal is
   the record of the effect and the dedup store at once, so a worker restarted after
   ``kill -9`` skips what it had done but not acked.

Acks are sent with ``multiple=True`` every ``ack_every`` messages and whenever the worker
goes idle: at-least-once is kept (nothing is acked before it is handled), and one ack frame
covers many messages. ``ack_every=1`` acks each message on its own.

The reconnect loop separates fatal errors (bad credentials, channel errors such as a queue
declared with other arguments: raised) from retryable ones (connection refused or lost,
``320 CONNECTION_FORCED`` while the broker restarts: reconnect after a capped exponential
:class:`common.retry.Backoff`, reset after a healthy session). :meth:`Worker.stop` is safe
from any thread and from a signal handler.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from common.config import Settings
from common.events import Event, InvalidEventError, dumps, loads
from common.logger import configure_logging, get_logger
from common.retry import Backoff
from common.storage import AppendLog, LineReader
from level_3_advanced.rabbitmq_simulation.broker import Target, connect, redact
from level_3_advanced.rabbitmq_simulation.channel import BasicProperties, Channel
from level_3_advanced.rabbitmq_simulation.errors import BrokerError, ConnectionLost, PublishError
from level_3_advanced.rabbitmq_simulation.topology import (
    EXCHANGE,
    ROUTING_KEY,
    dead_letter_exchange,
    dead_letter_queue,
    declare_worker_queue,
)

__all__ = [
    "DEAD",
    "DUPLICATE",
    "HANDLED",
    "RETRY",
    "EventProcessor",
    "Handler",
    "Journal",
    "Worker",
    "WorkerStats",
    "run_reconnecting",
    "run_worker_cli",
    "start_in_thread",
]

log = get_logger(__name__)

REASON_HEADER = "x-dead-letter-reason"
RECONNECT_BACKOFF = Backoff(base=0.2, factor=2.0, cap=10.0)


class Handler(Protocol):
    """Does the work for one event; returns a JSON-able record of what it did (or None)."""

    def __call__(self, event: Event) -> dict[str, Any] | None: ...


@dataclass
class WorkerStats:
    handled: int = 0  # handler ran and succeeded (then acked)
    duplicates: int = 0  # redelivered or republished events skipped by id
    retried: int = 0  # handler failures requeued for another attempt
    dead_lettered: int = 0  # poison messages sent to the DLQ
    redelivered: int = 0  # deliveries flagged redelivered by the broker
    reconnects: int = 0
    sessions: int = 0
    last_dead_letter_reason: str | None = None


class Journal:
    """What a worker has handled: one JSON line per event, ``{"id", "worker", "result", ...}``.

    Written with :class:`common.storage.AppendLog` (``durability="flush"`` survives the
    process dying; ``"fsync"`` a power cut) before the message is acked. Reading it back
    gives the ids already handled: the dedup store that survives a restart.
    """

    def __init__(self, path: str | Path, *, durability: str = "flush") -> None:
        self.path = Path(path)
        self._log = AppendLog(self.path, durability=durability)

    def handled_ids(self, limit: int | None = None) -> list[str]:
        """Ids in the journal, oldest first (the last ``limit`` of them)."""
        ids = [loads(line)["id"] for _, line in LineReader(self.path)]
        return ids if limit is None else ids[-limit:]

    def records(self) -> list[dict[str, Any]]:
        return [loads(line) for _, line in LineReader(self.path)]

    def append(self, line: bytes) -> None:
        self._log.append(line)

    def close(self) -> None:
        self._log.close()


# What EventProcessor.process() decided about one message.
HANDLED = "handled"  # the handler ran and succeeded: ack
DUPLICATE = "duplicate"  # handled before (by id): ack without running the handler
RETRY = "retry"  # the handler failed, attempts remain: deliver it again
DEAD = "dead"  # poison: dead-letter it with the reason, then ack
Outcome = tuple[str, str | None, int]  # (kind, reason for DEAD, attempts)
_HANDLED: Outcome = (HANDLED, None, 0)
_DUPLICATE: Outcome = (DUPLICATE, None, 0)


class EventProcessor:
    """Parse, deduplicate, handle, record: the part of a worker that no broker changes.

    The RabbitMQ :class:`Worker` and the Redis workers (:mod:`.redis_pubsub`) turn its
    :class:`Outcome` into their own ack, requeue and dead-letter operations. ``journal`` (a
    path) records each handled event before the caller acks it and seeds the dedup store on
    start; without it, dedup is in memory (the last ``dedup_limit`` ids).
    """

    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        max_attempts: int = 3,
        journal: str | Path | None = None,
        durability: str = "flush",
        dedup_limit: int = 100_000,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.name = name
        self.handler = handler
        self.max_attempts = max_attempts
        self.dedup_limit = dedup_limit
        self.stats = WorkerStats()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._attempts: dict[str, int] = {}
        self.journal = Journal(journal, durability=durability) if journal is not None else None
        if self.journal is not None:
            for event_id in self.journal.handled_ids(dedup_limit):
                self._seen[event_id] = None
            if self._seen:
                log.info("%s: %d handled event(s) in %s", name, len(self._seen), journal)

    def has_handled(self, event_id: str) -> bool:
        return event_id in self._seen

    def process(self, body: bytes, redelivered: bool = False) -> Outcome:
        """Decide about one message body; runs the handler at most once per call."""
        stats = self.stats
        if redelivered:
            stats.redelivered += 1
        try:
            event = Event.from_json(body)
        except InvalidEventError as exc:
            return self._dead(f"invalid event: {exc}", 1)
        event_id = event.id
        if event_id in self._seen:
            stats.duplicates += 1
            return _DUPLICATE
        try:
            result = self.handler(event)
            line = (
                dumps(
                    {
                        "id": event_id,
                        "event": event.name,
                        "worker": self.name,
                        "redelivered": redelivered,
                        "result": result,
                    }
                )
                if self.journal is not None
                else None
            )
        except Exception as exc:
            return self._failed(event_id, exc)
        if line is not None:
            self.journal.append(line)  # type: ignore[union-attr]  # the effect's record
        seen = self._seen
        seen[event_id] = None
        if len(seen) > self.dedup_limit:
            seen.popitem(last=False)
        if self._attempts:
            self._attempts.pop(event_id, None)
        stats.handled += 1
        return _HANDLED

    def _failed(self, event_id: str, exc: Exception) -> Outcome:
        attempts = self._attempts.pop(event_id, 0) + 1
        reason = f"handler failed {attempts} time(s): {type(exc).__name__}: {exc}"
        if attempts >= self.max_attempts:
            return self._dead(reason, attempts)
        if len(self._attempts) >= 10_000:  # bounded: forget the oldest counts
            del self._attempts[next(iter(self._attempts))]
        self._attempts[event_id] = attempts
        self.stats.retried += 1
        log.warning(
            "%s: %s on %s (attempt %d of %d); retrying",
            self.name,
            reason,
            event_id,
            attempts,
            self.max_attempts,
        )
        return (RETRY, reason, attempts)

    def _dead(self, reason: str, attempts: int) -> Outcome:
        return (DEAD, reason, attempts)

    def dead_lettered(self, reason: str) -> None:
        """The caller stored a DEAD message in its dead-letter queue: count it."""
        self.stats.last_dead_letter_reason = reason
        self.stats.dead_lettered += 1

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()


class Worker:
    """Consume one queue with ``handler``; see the module docstring for the semantics.

    ``target`` is what :func:`broker.connect` takes (a URL, a SimulatedBroker, None). The
    queue (default: the worker's name) is declared durable, bound to ``exchange`` with
    ``binding_keys``, with its dead-letter queue ``<queue>.dlq``. ``journal`` (a path) keeps
    the handled events across restarts (see :class:`EventProcessor`). ``max_messages``
    stops the worker after that many handled events.
    """

    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        target: Target = None,
        exchange: str = EXCHANGE,
        queue: str | None = None,
        binding_keys: Iterable[str] = (ROUTING_KEY,),
        prefetch: int = 100,
        ack_every: int | None = None,
        max_attempts: int = 3,
        journal: str | Path | None = None,
        durability: str = "flush",
        backoff: Backoff = RECONNECT_BACKOFF,
        healthy_after: float = 5.0,
        poll_interval: float = 0.2,
        connect_timeout: float = 5.0,
        dedup_limit: int = 100_000,
        max_messages: int | None = None,
    ) -> None:
        if not 1 <= prefetch <= 65535:
            raise ValueError(f"prefetch must be 1..65535, got {prefetch}")
        self.ack_every = ack_every if ack_every is not None else max(1, prefetch // 2)
        if not 1 <= self.ack_every <= prefetch:
            raise ValueError(f"ack_every must be 1..prefetch ({prefetch}), got {self.ack_every}")
        self.processor = EventProcessor(
            name,
            handler,
            max_attempts=max_attempts,
            journal=journal,
            durability=durability,
            dedup_limit=dedup_limit,
        )
        self.name = name
        self.handler = handler
        self.target = target
        self.exchange = exchange
        self.queue = queue or name
        self.binding_keys = tuple(binding_keys)
        self.prefetch = prefetch
        self.backoff = backoff
        self.healthy_after = healthy_after
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self.max_messages = max_messages
        self.dlx = dead_letter_exchange(exchange)
        self.dlq = dead_letter_queue(self.queue)
        self.stats = self.processor.stats
        self.ready = threading.Event()  # set while consuming
        self._stop = threading.Event()
        self._channel: Channel | None = None
        self._ack_tag = 0
        self._ack_count = 0

    def __repr__(self) -> str:
        return f"<Worker {self.name} queue={self.queue!r} handled={self.stats.handled}>"

    # -- public -----------------------------------------------------------------------------
    def has_handled(self, event_id: str) -> bool:
        return self.processor.has_handled(event_id)

    def run(self) -> WorkerStats:
        """Consume until :meth:`stop` (or ``max_messages``); reconnect on retryable errors.

        A fatal :class:`~.errors.BrokerError` is logged and raised.
        """
        run_reconnecting(
            self.name,
            self._session,
            retryable=lambda exc: isinstance(exc, BrokerError) and exc.retryable,
            stop=self._stop,
            backoff=self.backoff,
            healthy_after=self.healthy_after,
            stats=self.stats,
        )
        return self.stats

    def start(self) -> threading.Thread:
        """Run in a daemon thread; returns it (join it after :meth:`stop`)."""
        return start_in_thread(self.name, self.run)

    def stop(self) -> None:
        """Ask the worker to finish: it acks what it handled, closes, and :meth:`run` returns."""
        self._stop.set()
        channel = self._channel
        if channel is not None:
            # Wake process_data_events now; if the connection is gone, the loop ends anyway.
            with contextlib.suppress(BrokerError):
                channel.add_callback_threadsafe(_nothing)

    def close(self) -> None:
        """Stop and close the journal (call after :meth:`run` returned)."""
        self.stop()
        self.processor.close()

    # -- one connection's life --------------------------------------------------------------
    def _session(self) -> None:
        channel = connect(self.target, name=self.name, timeout=self.connect_timeout)
        self._channel = channel
        self.stats.sessions += 1
        try:
            channel.confirm_delivery()  # the DLQ publish waits for its confirm
            declare_worker_queue(
                channel, self.queue, exchange=self.exchange, binding_keys=self.binding_keys
            )
            channel.basic_qos(prefetch_count=self.prefetch)
            channel.basic_consume(self.queue, self._on_message)
            self._ack_tag = self._ack_count = 0
            self.ready.set()
            log.info(
                "%s: consuming %r (prefetch %d, ack every %d)",
                self.name,
                self.queue,
                self.prefetch,
                self.ack_every,
            )
            while not self._stop.is_set():
                channel.process_data_events(time_limit=self.poll_interval)
                if self._ack_count:
                    self._flush_acks(channel)
                if not channel.consumer_tags:
                    raise ConnectionLost(f"the broker cancelled the consumer of {self.queue!r}")
            self._flush_acks(channel)
        finally:
            self.ready.clear()
            self._channel = None
            try:
                channel.close()
            except BrokerError as exc:
                log.debug("%s: close: %s", self.name, exc)

    # -- one delivery -----------------------------------------------------------------------
    def _on_message(
        self, channel: Channel, method: Any, properties: BasicProperties, body: bytes
    ) -> None:
        kind, reason, attempts = self.processor.process(body, method.redelivered)
        if kind is HANDLED or kind is DUPLICATE:
            self._ack(channel, method.delivery_tag)
            if self.max_messages is not None and self.stats.handled >= self.max_messages:
                self._stop.set()
        elif kind is RETRY:
            channel.basic_nack(method.delivery_tag, requeue=True)
        else:
            self._dead_letter(channel, method, properties, body, reason or "poison", attempts)

    def _dead_letter(
        self,
        channel: Channel,
        method: Any,
        properties: BasicProperties,
        body: bytes,
        reason: str,
        attempts: int,
    ) -> None:
        """Publish to the DLQ with the reason (confirmed), then ack; reject if that fails."""
        headers = dict(properties.headers or {})
        headers.update(
            {
                REASON_HEADER: reason[:1000],
                "x-dead-letter-worker": self.name,
                "x-attempts": attempts,
                "x-original-exchange": method.exchange,
                "x-original-routing-key": method.routing_key,
            }
        )
        dead = BasicProperties(
            content_type=properties.content_type,
            delivery_mode=2,
            message_id=properties.message_id,
            correlation_id=properties.correlation_id,
            timestamp=properties.timestamp,
            type=properties.type,
            headers=headers,
        )
        try:
            channel.basic_publish(self.dlx, self.queue, body, dead, mandatory=True)
        except PublishError as exc:
            # The queue's own dead-letter exchange takes it (with x-death, without our reason).
            log.error("%s: DLQ publish failed (%s); rejecting instead", self.name, exc)
            channel.basic_nack(method.delivery_tag, requeue=False)
        else:
            self._ack(channel, method.delivery_tag)
        self.processor.dead_lettered(reason)
        log.error(
            "%s: message %s dead-lettered to %s: %s",
            self.name,
            properties.message_id,
            self.dlq,
            reason,
        )

    def _ack(self, channel: Channel, tag: int) -> None:
        self._ack_tag = tag
        self._ack_count += 1
        if self._ack_count >= self.ack_every:
            channel.basic_ack(tag, multiple=self.ack_every > 1)
            self._ack_count = 0

    def _flush_acks(self, channel: Channel) -> None:
        if self._ack_count:
            channel.basic_ack(self._ack_tag, multiple=True)
            self._ack_count = 0


def run_reconnecting(
    name: str,
    session: Callable[[], None],
    *,
    retryable: Callable[[Exception], bool],
    stop: threading.Event,
    backoff: Backoff,
    healthy_after: float,
    stats: WorkerStats,
) -> None:
    """Run ``session`` (connect, consume, close) again and again until ``stop`` is set.

    After a retryable failure, wait ``backoff.delay(attempt)`` (interrupted by ``stop``) and
    reconnect; the attempt count starts again after a session that lasted ``healthy_after``
    seconds. Any other failure is logged as fatal and raised. Shared by the RabbitMQ worker
    and the Redis workers.
    """
    attempt = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            session()
        except Exception as exc:
            if not retryable(exc):  # a bug (not a BrokerError) gets its traceback logged
                log.error("%s: fatal: %s", name, exc, exc_info=not isinstance(exc, BrokerError))
                raise
            if stop.is_set():
                break
            attempt = 1 if time.monotonic() - started >= healthy_after else attempt + 1
            delay = backoff.delay(attempt)
            stats.reconnects += 1
            log.warning("%s: %s; reconnecting in %.2fs (attempt %d)", name, exc, delay, attempt)
            stop.wait(delay)


def start_in_thread(name: str, run: Callable[[], Any]) -> threading.Thread:
    """Start ``run`` in a daemon thread named ``name``. A fatal error ends the thread as it
    would end a process: :func:`run_reconnecting` has logged it already."""

    def target() -> None:
        try:
            run()
        except Exception as exc:
            log.debug("%s: thread ends: %r", name, exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def _nothing() -> None:
    """A no-op callback: scheduling it wakes a worker blocked in process_data_events."""


# -- the command line shared by consumer_email.py and consumer_analytics.py ------------------
def run_worker_cli(
    name: str,
    make_handler: Callable[[argparse.Namespace], Handler],
    argv: list[str] | None,
    description: str,
) -> int:
    """Parse the worker options, run until SIGINT/SIGTERM or ``--max-messages``; exit code."""
    settings = Settings.load()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default=settings.rabbitmq_url, help="amqp:// URL of RabbitMQ")
    parser.add_argument("--exchange", default=EXCHANGE, help="topic exchange (%(default)s)")
    parser.add_argument("--queue", default=name, help="queue to consume (%(default)s)")
    parser.add_argument("--prefetch", type=int, default=100, help="unacked messages (1..65535)")
    parser.add_argument("--ack-every", type=int, help="ack multiple every N (default prefetch/2)")
    parser.add_argument("--max-attempts", type=int, default=3, help="before the DLQ (>= 1)")
    parser.add_argument("--max-messages", type=int, help="exit after handling this many")
    parser.add_argument("--work-ms", type=float, default=0.0, help="simulated work per event")
    parser.add_argument(
        "--journal",
        type=Path,
        help="JSON-lines record of handled events, the dedup store across restarts "
        "(default: <EDA_DATA_DIR>/rabbitmq/<queue>.jsonl)",
    )
    parser.add_argument("--no-journal", action="store_true", help="dedup in memory only")
    args = parser.parse_args(argv)
    if not 0 <= args.work_ms <= 60_000:
        parser.error("--work-ms must be between 0 and 60000")
    if args.max_messages is not None and args.max_messages < 1:
        parser.error("--max-messages must be at least 1")
    configure_logging(settings.eda_log_level, settings.eda_log_format)
    journal = None
    if not args.no_journal:
        journal = args.journal or settings.data_dir / "rabbitmq" / f"{args.queue}.jsonl"
    try:
        worker = Worker(
            name,
            make_handler(args),
            target=args.url,
            exchange=args.exchange,
            queue=args.queue,
            prefetch=args.prefetch,
            ack_every=args.ack_every,
            max_attempts=args.max_attempts,
            journal=journal,
            max_messages=args.max_messages,
        )
    except ValueError as exc:
        parser.error(str(exc))

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: %s received, stopping", name, signal.Signals(signum).name)
        worker.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    log.info("%s: starting on %s (journal: %s)", name, redact(args.url), journal or "none")
    try:
        stats = worker.run()
    except BrokerError:
        return 1
    finally:
        worker.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("%s: stopped: %s", name, asdict(stats))
    return 0
