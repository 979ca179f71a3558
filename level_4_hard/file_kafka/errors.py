"""The file-Kafka exception tree: one base class, and a subclass per thing a caller can act on.

Bad input that is a value problem is also a ``ValueError`` (a bad topic name, a record that is
too big); an unserialisable value raises the repository's
:class:`common.events.InvalidEventError` (a ``ValueError`` too), before anything is written.
"""

from __future__ import annotations

__all__ = [
    "CorruptLogError",
    "FileKafkaError",
    "GroupActiveError",
    "IllegalStateError",
    "InvalidOffsetError",
    "InvalidTopicError",
    "NoOffsetForPartitionError",
    "OffsetOutOfRangeError",
    "RecordTooLargeError",
    "TopicExistsError",
    "UnknownTopicError",
]


class FileKafkaError(Exception):
    """Base class of every error raised by the file-Kafka package."""


class InvalidTopicError(FileKafkaError, ValueError):
    """A topic or group name that Kafka would reject, or that would escape the data directory."""


class UnknownTopicError(FileKafkaError, LookupError):
    """The topic does not exist (and the caller did not ask to create it)."""


class TopicExistsError(FileKafkaError):
    """``create_topic`` for a name that is already taken."""


class RecordTooLargeError(FileKafkaError, ValueError):
    """A record whose encoded line exceeds ``max_record_bytes`` (Kafka: ``max.message.bytes``)."""


class CorruptLogError(FileKafkaError):
    """A segment holds bytes that are not a valid record where a committed record should be.

    The message names the file, the byte position and the offset concerned. Nothing is
    truncated or rewritten when this is raised: committed data is never cut to "repair" it.
    """


class InvalidOffsetError(FileKafkaError):
    """Base class for a position the consumer cannot use."""


class OffsetOutOfRangeError(InvalidOffsetError):
    """A position below the log start (deleted by retention) or beyond the log end."""


class NoOffsetForPartitionError(InvalidOffsetError):
    """No committed offset, and ``auto_offset_reset="none"`` forbids guessing one."""


class IllegalStateError(FileKafkaError):
    """An operation that the client's current state does not allow (closed, not assigned...)."""


class GroupActiveError(FileKafkaError):
    """``reset-offsets`` on a group that still has live members (Kafka refuses it too)."""
