"""The package's exception tree: what a producer or a worker may see from either broker.

Both brokers (the in-process simulation and RabbitMQ through pika) raise these, never
pika's own exceptions: the adapter translates at the boundary (see ``pika_channel.translate``),
so the producer and the workers handle one set of errors whichever broker runs underneath.

Every error says whether retrying can help (``retryable``). The workers' reconnect loop
reconnects on a retryable error and stops on a fatal one:

* retryable: the connection was lost or refused, or the broker closed it on purpose
  (``320 CONNECTION_FORCED`` while it restarts — pika's README example exits on it, a
  long-lived worker must not); a publish that timed out;
* fatal: bad credentials or access refused; a channel error (``404 NOT_FOUND``,
  ``406 PRECONDITION_FAILED``: a missing exchange, a queue declared with other arguments, an
  ack for an unknown delivery tag) — a bug or a configuration mismatch that a retry repeats.
"""

from __future__ import annotations

__all__ = [
    "AccessRefused",
    "BrokerError",
    "ChannelError",
    "ConnectionLost",
    "NackError",
    "PublishError",
    "PublishFailed",
    "PublishTimeout",
    "UnroutableError",
]


class BrokerError(Exception):
    """Base class. ``retryable`` tells a reconnect loop whether trying again can help."""

    retryable = False


class ConnectionLost(BrokerError):
    """The connection is gone or could not be opened; reconnecting may help."""

    retryable = True

    def __init__(self, message: str, *, reply_code: int = 0) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class AccessRefused(BrokerError):
    """Bad credentials, a missing vhost or permissions: fatal until somebody fixes them."""


class ChannelError(BrokerError):
    """The broker closed the channel (AMQP channel exception); the channel is unusable.

    ``reply_code`` is the AMQP code: 404 NOT_FOUND, 405 RESOURCE_LOCKED, 406
    PRECONDITION_FAILED, 403 ACCESS_REFUSED; 0 when the client itself closed the channel.
    """

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"channel closed: ({reply_code}) {reply_text}")
        self.reply_code = reply_code
        self.reply_text = reply_text


class PublishError(BrokerError):
    """A published message was not confirmed by the broker."""

    def __init__(self, message: str, *, message_id: str | None = None) -> None:
        super().__init__(message)
        self.message_id = message_id


class UnroutableError(PublishError):
    """A mandatory message matched no queue: the broker returned it (312 NO_ROUTE)."""


class NackError(PublishError):
    """The broker refused the message (basic.nack): a full queue, an internal error."""


class PublishTimeout(PublishError):
    """No confirm arrived in time; the message may or may not have reached the broker."""

    retryable = True


class PublishFailed(PublishError):
    """Raised by a producer's ``flush``: one or more earlier publishes failed.

    ``failures`` holds ``(message_id, error)`` pairs, in the order the failures arrived.
    """

    def __init__(self, failures: list[tuple[str | None, BaseException]]) -> None:
        head = "; ".join(f"{mid}: {err}" for mid, err in failures[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        super().__init__(f"{len(failures)} publish(es) failed: {head}{more}")
        self.failures = failures
