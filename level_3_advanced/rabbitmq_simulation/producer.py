"""The producer: ``UserRegistrationService.register(email, name)`` publishes ``user.registered``.

Run it as its own process (with the two workers in two other terminals)::

    python level_3_advanced/rabbitmq_simulation/producer.py --count 100
    python -m level_3_advanced.rabbitmq_simulation.producer --url amqp://guest:guest@localhost:5672/

Every message is the common Event JSON, persistent (``delivery_mode=2``), with its event id
as ``message_id`` and ``content_type: application/json``, published *mandatory* to the
durable topic exchange ``user_events`` with publisher confirms. Confirms are pipelined
(:meth:`Channel.publish`): ``register`` returns at once, and a message the broker nacks or
returns (no queue bound) fails its :class:`Registration` — and is raised by the next
``register``, by ``flush`` and by ``close``: never silence.
"""

from __future__ import annotations

import argparse
import re
import threading
import time
from collections import deque
from typing import Any, Protocol

from common.config import Settings
from common.events import Event, new_event
from common.logger import configure_logging, get_logger
from level_3_advanced.rabbitmq_simulation.broker import Target, connect, redact
from level_3_advanced.rabbitmq_simulation.channel import BasicProperties, Channel, Confirmation
from level_3_advanced.rabbitmq_simulation.errors import BrokerError, PublishFailed, PublishTimeout
from level_3_advanced.rabbitmq_simulation.topology import EXCHANGE, declare_exchange

__all__ = [
    "AmqpEventPublisher",
    "EventPublisher",
    "Registration",
    "UserRegistrationService",
    "main",
    "registration_event",
]

log = get_logger(__name__)

USER_REGISTERED = "user.registered"
# Deliberately simple: one @, no spaces, a dot in the domain. Real validation sends a link.
_EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+")


def registration_event(email: str, name: str, *, correlation_id: str | None = None) -> Event:
    """Validate the input and build the ``user.registered`` event (ValueError if invalid)."""
    if not isinstance(email, str):
        raise TypeError(f"email must be a string, got {type(email).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    email = email.strip()
    name = name.strip()
    if len(email) > 254 or not _EMAIL.fullmatch(email):
        raise ValueError(f"not an email address: {email[:60]!r}")
    if not name:
        raise ValueError("name must not be empty")
    if len(name) > 100:
        raise ValueError(f"name is longer than 100 characters: {name[:30]!r}...")
    data = {"email": email, "name": name}
    if correlation_id is None:
        return new_event(USER_REGISTERED, data)  # the name is a valid constant: the fast path
    return Event.create(USER_REGISTERED, data, correlation_id=correlation_id)


class EventPublisher(Protocol):
    """Where a producer sends events: RabbitMQ here, Redis in :mod:`.redis_pubsub`."""

    def publish_event(self, event: Event) -> Confirmation: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def close(self) -> None: ...


class AmqpEventPublisher:
    """Publishes events to a topic exchange, routing key = event name, confirms pipelined."""

    def __init__(
        self,
        channel: Channel,
        exchange: str = EXCHANGE,
        *,
        declare: bool = True,
        app_id: str = "user-registration",
    ) -> None:
        self.channel = channel
        self.exchange = exchange
        self.app_id = app_id
        if declare:
            declare_exchange(channel, exchange)

    def publish_event(self, event: Event) -> Confirmation:
        properties = BasicProperties(
            content_type="application/json",
            delivery_mode=2,  # persistent: written to disk by a durable queue
            message_id=event.id,
            type=event.name,
            timestamp=event.timestamp_ns // 1_000_000_000,
            correlation_id=event.correlation_id,
            app_id=self.app_id,
        )
        return self.channel.publish(
            self.exchange, event.name, event.to_json_bytes(), properties, mandatory=True
        )

    def flush(self, timeout: float | None = None) -> bool:
        return self.channel.flush(timeout)

    def close(self) -> None:
        self.channel.close()


class Registration:
    """One registration: its event and the broker's answer for it."""

    __slots__ = ("confirmation", "event")

    def __init__(self, event: Event, confirmation: Confirmation) -> None:
        self.event = event
        self.confirmation = confirmation

    def __repr__(self) -> str:
        return f"<Registration {self.event.id} {self.confirmation!r}>"

    @property
    def confirmed(self) -> bool:
        return self.confirmation.confirmed

    def wait(self, timeout: float | None = None) -> None:
        """Block until confirmed; raise the PublishError if it failed."""
        self.confirmation.result(timeout)


class UserRegistrationService:
    """Registers users by publishing ``user.registered`` (see the module docstring).

    Error policy (a producer's failures go to its caller): invalid input raises ValueError
    before anything is published; a publish the broker nacks, returns or does not confirm in
    time is recorded and raised as :class:`PublishFailed` by the next :meth:`register`,
    :meth:`flush` or :meth:`close`. ``register(..., wait=True)`` waits for this message's
    confirm and raises its error directly.
    """

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher
        self._lock = threading.Lock()
        self._failures: list[tuple[str | None, BaseException]] = []
        # Confirmations not yet looked at, oldest first: swept as they resolve (cheaper than
        # a done-callback per message, which would run on the publisher's I/O thread).
        self._unswept: deque[Confirmation] = deque()
        self.published = 0
        self.confirmed = 0  # as of the last sweep (exact after flush)
        self.failed = 0

    @classmethod
    def connect(
        cls, target: Target = None, *, exchange: str = EXCHANGE, **options: Any
    ) -> UserRegistrationService:
        """A service over a new channel (``options`` go to :func:`broker.connect`)."""
        options.setdefault("name", "user-registration")
        channel = connect(target, **options)
        try:
            return cls(AmqpEventPublisher(channel, exchange))
        except BaseException:
            channel.close()
            raise

    def register(
        self, email: str, name: str, *, wait: bool = False, timeout: float = 30.0
    ) -> Registration:
        """Validate, publish ``user.registered``; returns at once unless ``wait``."""
        unswept = self._unswept
        if unswept and unswept[0]._done:
            self._sweep()
        if self._failures:
            self._raise_failures()
        event = registration_event(email, name)
        confirmation = self.publisher.publish_event(event)
        self.published += 1
        if wait:
            try:
                confirmation.result(timeout)
            except TimeoutError:
                raise PublishTimeout(
                    f"no confirm for {event.id} within {timeout}s", message_id=event.id
                ) from None
            except BrokerError:
                with self._lock:
                    self.failed += 1
                raise
            with self._lock:
                self.confirmed += 1
        else:
            unswept.append(confirmation)
        return Registration(event, confirmation)

    def _sweep(self) -> None:
        """Count the resolved confirmations at the front; keep the failures to raise."""
        with self._lock:
            unswept = self._unswept
            while unswept and unswept[0]._done:
                confirmation = unswept.popleft()
                error = confirmation._error
                if error is None:
                    self.confirmed += 1
                else:
                    self.failed += 1
                    self._failures.append((confirmation.message_id, error))
                    log.error("publish of %s failed: %s", confirmation.message_id, error)

    def _raise_failures(self) -> None:
        with self._lock:
            failures, self._failures = self._failures, []
        if failures:
            raise PublishFailed(failures)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for every confirm; raise PublishFailed / PublishTimeout for what failed."""
        done = self.publisher.flush(timeout)
        self._sweep()
        if not done:
            self._raise_failures()
            raise PublishTimeout(f"publishes still unconfirmed after {timeout}s")
        self._raise_failures()

    def close(self, timeout: float = 30.0) -> None:
        """Flush, then close the connection (raising what flush raises, after closing)."""
        try:
            self.flush(timeout)
        finally:
            self.publisher.close()

    def __enter__(self) -> UserRegistrationService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """Publish ``--count`` registrations and wait for their confirms."""
    settings = Settings.load()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=settings.rabbitmq_url, help="amqp:// URL of RabbitMQ")
    parser.add_argument("--exchange", default=EXCHANGE, help="topic exchange (%(default)s)")
    parser.add_argument("--count", type=int, default=10, help="registrations (1..1000000)")
    parser.add_argument("--domain", default="example.com", help="email domain of the users")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for confirms")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 1_000_000:
        parser.error("--count must be between 1 and 1000000")
    configure_logging(settings.eda_log_level, settings.eda_log_format)
    start = time.perf_counter()
    try:
        service = UserRegistrationService.connect(
            args.url, exchange=args.exchange, publish_timeout=args.timeout
        )
    except BrokerError as exc:
        log.error("cannot connect to %s: %s", redact(args.url), exc)
        return 1
    try:
        with service:
            for i in range(args.count):
                service.register(f"user{i}@{args.domain}", f"User {i}")
    except BrokerError as exc:
        log.error(
            "stopped after %d of %d registrations (%d confirmed, %d failed): %s",
            service.published,
            args.count,
            service.confirmed,
            service.failed,
            exc,
        )
        return 1
    elapsed = time.perf_counter() - start
    log.info(
        "%d user.registered events confirmed by %s in %.2fs (%.0f/s)",
        service.confirmed,
        redact(args.url),
        elapsed,
        service.confirmed / elapsed if elapsed else 0.0,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
