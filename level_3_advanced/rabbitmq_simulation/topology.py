"""The names and the declarations of the level's exchanges and queues, in one place.

::

    producer --user.registered--> [user_events] (topic, durable)
                                    |-- user.registered --> (email_worker)     --> email handler
                                    '-- user.registered --> (analytics_worker) --> analytics
    poison:  (email_worker) --dead letter--> [user_events.dlx] --email_worker--> (email_worker.dlq)

Each worker owns a durable queue bound to the topic exchange, so each gets its own copy of
every event (a fanout by bindings); both queues dead-letter into one direct exchange, keyed by
the queue's name, so each has its own dead-letter queue. Declaring is idempotent: every worker
and the producer declare what they use, whoever starts first.
"""

from __future__ import annotations

from collections.abc import Iterable

from level_3_advanced.rabbitmq_simulation.channel import Channel
from level_3_advanced.rabbitmq_simulation.errors import BrokerError

__all__ = [
    "ANALYTICS_QUEUE",
    "EMAIL_QUEUE",
    "EXCHANGE",
    "ROUTING_KEY",
    "dead_letter_exchange",
    "dead_letter_queue",
    "declare_exchange",
    "declare_worker_queue",
    "delete_topology",
]

EXCHANGE = "user_events"
ROUTING_KEY = "user.registered"
EMAIL_QUEUE = "email_worker"
ANALYTICS_QUEUE = "analytics_worker"


def dead_letter_exchange(exchange: str) -> str:
    return f"{exchange}.dlx"


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"


def declare_exchange(channel: Channel, exchange: str = EXCHANGE) -> None:
    """The durable topic exchange that events are published to."""
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)


def declare_worker_queue(
    channel: Channel,
    queue: str,
    *,
    exchange: str = EXCHANGE,
    binding_keys: Iterable[str] = (ROUTING_KEY,),
) -> None:
    """A worker's durable queue, bound to ``exchange``, with its dead-letter queue."""
    dlx = dead_letter_exchange(exchange)
    dlq = dead_letter_queue(queue)
    declare_exchange(channel, exchange)
    channel.exchange_declare(dlx, exchange_type="direct", durable=True)
    channel.queue_declare(dlq, durable=True)
    channel.queue_bind(dlq, dlx, routing_key=queue)
    channel.queue_declare(
        queue,
        durable=True,
        arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": queue},
    )
    for key in binding_keys:
        channel.queue_bind(queue, exchange, routing_key=key)


def delete_topology(channel: Channel, exchange: str, queues: Iterable[str]) -> None:
    """Delete the queues (with their DLQs) and both exchanges; missing ones are skipped."""
    for queue in queues:
        for name in (queue, dead_letter_queue(queue)):
            try:
                channel.queue_delete(name)
            except BrokerError:  # pragma: no cover - only when the broker went away
                return
    channel.exchange_delete(exchange)
    channel.exchange_delete(dead_letter_exchange(exchange))
