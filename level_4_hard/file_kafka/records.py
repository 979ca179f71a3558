"""The values a producer returns and a consumer receives: RecordMetadata, Record, TopicPartition.

A stored record is one JSON line: the repository's Event wire object plus ``offset`` and
``key``, offset first so a human (and the sparse index check) can read it at a glance::

    {"offset":7,"key":"customer-7","id":"5f0c1a2b3c4d-0000002a","event":"orders",
     "data":{"id":15},"timestamp":"2024-06-01T12:00:00.123Z","version":1,"correlation_id":null}

``data`` is the record's value (any JSON value; ``null`` is a tombstone in a compacted topic)
and ``event`` is the topic name unless an :class:`~common.events.Event` was sent, in which case
the line is that event's own wire form. So ``Event.from_dict(line)`` reads a record back.

The classes are named tuples: a consumer builds hundreds of thousands of them per second, and a
tuple is the cheapest immutable object Python has. Derived fields (the timestamp in
milliseconds, the event id...) are properties computed only when asked for.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, NamedTuple

from common.events import Event, InvalidEventError

__all__ = ["Record", "RecordMetadata", "TopicPartition", "iso_to_ms", "ms_to_iso"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def ms_to_iso(ms: int) -> str:
    """Milliseconds since the epoch as the wire's ISO-8601 UTC form with a ``Z``."""
    seconds, millis = divmod(ms, 1000)
    stamp = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{millis:03d}Z"


def iso_to_ms(text: str) -> int:
    """The wire's ISO-8601 timestamp as milliseconds since the epoch (Kafka's unit)."""
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        raise InvalidEventError(f"'timestamp' is not ISO-8601: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


class TopicPartition(NamedTuple):
    """A partition of a topic: the unit of ordering, of assignment and of committed offsets."""

    topic: str
    partition: int


class RecordMetadata(NamedTuple):
    """Where ``Producer.send`` put a record.

    ``offset`` is -1 when the producer buffers (durability ``"none"``): the offset is chosen
    when the batch is written, as Kafka reports -1 for ``acks=0``.
    """

    topic: str
    partition: int
    offset: int
    timestamp: int  # milliseconds since the epoch


class Record(NamedTuple):
    """One consumed record. ``timestamp`` is the stored ISO-8601 string (UTC);
    ``timestamp_ms`` gives Kafka's milliseconds. ``envelope`` is the whole stored line."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: Any
    timestamp: str
    envelope: dict[str, Any]

    @property
    def timestamp_ms(self) -> int:
        return iso_to_ms(self.timestamp)

    @property
    def id(self) -> str:
        """The event id: unique across processes, so an idempotent consumer can skip repeats."""
        return self.envelope["id"]

    @property
    def event(self) -> str:
        """The event name: the topic, unless an Event with its own name was sent."""
        return self.envelope["event"]

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def to_event(self) -> Event:
        """The record as the repository's Event (InvalidEventError if the value is no object)."""
        return Event.from_dict(self.envelope)

    def __repr__(self) -> str:
        return (
            f"Record(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
            f"key={self.key!r}, value={self.value!r}, timestamp={self.timestamp!r})"
        )
