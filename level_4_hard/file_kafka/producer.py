"""The producer: ``send(topic, value, key=None)`` appends a record and says where it went.

Partitioning is Kafka's: a keyed record goes to ``murmur2(key) % partitions`` (the same key
always lands in the same partition, in every process and every run, and in the partition a
Java client would pick); a record without a key goes round-robin.

Durability says what has happened when ``send`` returns (the cost is measured in
``benchmarks/bench_file_kafka.py``):

========  =====================================================  ===========================
mode      when ``send`` returns the record is                    it survives
========  =====================================================  ===========================
none      in this process's memory; written at ``batch_bytes``,  nothing until flush()
          ``flush()`` or ``close()`` (offset reported as -1)
flush     written to the OS (one ``write()`` per record)         the producer being killed
batch     written; ``fsync`` every ``fsync_interval`` records    a power cut, up to the last
          and on ``flush()``                                     fsync
fsync     written and ``fsync``'d                                a power cut
========  =====================================================  ===========================

``send_many`` writes many records with one ``write()`` per partition: use it for bulk loads.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.events import Event, dumps
from common.logger import get_logger
from level_4_hard.file_kafka.errors import (
    IllegalStateError,
    RecordTooLargeError,
    UnknownTopicError,
)
from level_4_hard.file_kafka.partition import C_APPEND, DURABILITY_MODES, PartitionWriter
from level_4_hard.file_kafka.records import RecordMetadata, ms_to_iso
from level_4_hard.file_kafka.topic import (
    TopicConfig,
    create_topic,
    load_topic,
    partition_dir,
    partition_for_key,
    validate_topic_name,
)

__all__ = ["Producer"]

log = get_logger(__name__)
_new = tuple.__new__
_time_ns = time.time_ns
_KEY_CACHE_LIMIT = 100_000


class _TopicState:
    """What a producer keeps per topic: config, open writers, key -> partition cache."""

    __slots__ = ("config", "keys", "robin", "writers")

    def __init__(self, config: TopicConfig) -> None:
        self.config = config
        self.writers: list[PartitionWriter | None] = [None] * config.partitions
        self.keys: dict[str, int] = {}
        start = int.from_bytes(os.urandom(2), "little") % config.partitions
        self.robin = itertools.count(start)


class Producer:
    """Appends records to topics under ``data_dir``; thread-safe and multi-process-safe.

    Topics are created on first use with ``partitions`` partitions (Kafka's
    ``auto.create.topics.enable``), unless ``auto_create_topics=False``. A producer error
    (bad value, bad topic, full disk) is raised to the caller and nothing is written.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        partitions: int = 1,
        durability: str = "flush",
        fsync_interval: int = 1000,
        batch_bytes: int = 1 << 16,
        segment_bytes: int | None = None,
        auto_create_topics: bool = True,
        max_record_bytes: int = 1 << 20,
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        if fsync_interval < 1:
            raise ValueError("fsync_interval must be at least 1")
        self.data_dir = Path(data_dir)
        self.partitions = partitions
        self.durability = durability
        self._fsync_interval = fsync_interval
        self._batch_bytes = batch_bytes
        self._segment_bytes = segment_bytes
        self._auto_create = auto_create_topics
        self._max_record_bytes = max_record_bytes
        self._buffering = durability == "none"
        self._topics: dict[str, _TopicState] = {}
        self._lock = threading.Lock()
        self._closed = False
        # Event ids: a random prefix per producer plus a counter (as Event ids are made).
        self._prefix = os.urandom(6).hex() + "-"
        self._ids = itertools.count(1)
        self._clock: tuple[int, str] = (-1, "")

    # -- sending ---------------------------------------------------------------------------
    def send(
        self,
        topic: str,
        value: Any,
        key: str | None = None,
        *,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> RecordMetadata:
        """Append one record; returns RecordMetadata(topic, partition, offset, timestamp).

        ``value`` is any JSON-serialisable value (``None`` is a tombstone for compaction), or
        an :class:`~common.events.Event`, stored as its own wire form. ``partition`` overrides
        the partitioner; ``timestamp_ms`` overrides the record time (Kafka's CreateTime).
        """
        state = self._topics.get(topic)
        if state is None:
            state = self._open_topic(topic)
        if partition is None:
            if key is None or (partition := state.keys.get(key)) is None:
                partition = self._choose(state, key)
        else:
            self._check_partition(state, partition, key)
        writer = state.writers[partition] or self._open_writer(topic, state, partition)
        if (
            not C_APPEND
            and timestamp_ms is None
            and not self._buffering
            and type(value) is not Event
        ):
            # The pure-Python hot path: the whole line is encoded at once, numbered with the
            # offset the writer expects (it renumbers the line, under its lock, if another
            # process appended meanwhile), so no copy splices the offset in; the clock formats
            # the ISO time once per millisecond. (The C append writes the offset in front of
            # the body itself: with it, every record takes the general path below.)
            ms = _time_ns() // 1_000_000
            clock = self._clock
            if clock[0] != ms:
                clock = self._clock = (ms, ms_to_iso(ms))
            guess = writer.next_offset
            if guess < 0:  # other processes append to this partition too
                guess = writer.guess_next_offset()
            line = (
                dumps(
                    {
                        "offset": guess,
                        "key": key,
                        "id": f"{self._prefix}{next(self._ids)}",
                        "event": topic,
                        "data": value,
                        "timestamp": clock[1],
                        "version": 1,
                        "correlation_id": None,
                    }
                )
                + b"\n"
            )
            if len(line) > self._max_record_bytes:
                self._check_line(line, guess)
            return _new(RecordMetadata, (topic, partition, writer.append_line(line, guess), ms))
        body, ms = self._encode(topic, value, key, timestamp_ms)
        if self._buffering:
            writer.buffer(body)
            return _new(RecordMetadata, (topic, partition, -1, ms))
        return _new(RecordMetadata, (topic, partition, writer.append(body), ms))

    def send_many(
        self,
        topic: str,
        values: Iterable[Any],
        keys: Iterable[str | None] | None = None,
    ) -> list[RecordMetadata]:
        """Append many records: one ``write()`` per partition, consecutive offsets in each.

        All values are encoded first, so a bad one raises before anything is written.
        """
        state = self._topics.get(topic)
        if state is None:
            state = self._open_topic(topic)
        values = values if isinstance(values, list) else list(values)
        key_list = [None] * len(values) if keys is None else list(keys)
        if len(key_list) != len(values):
            raise ValueError(f"{len(values)} values but {len(key_list)} keys")
        ms = _time_ns() // 1_000_000
        iso = ms_to_iso(ms)
        cache = state.keys
        per_partition: list[list[bytes]] = [[] for _ in range(state.config.partitions)]
        places: list[tuple[int, int, int]] = []  # (partition, index in its batch, ms)
        for value, key in zip(values, key_list, strict=True):
            partition = None if key is None else cache.get(key)
            if partition is None:
                partition = self._choose(state, key)
            if type(value) is Event:
                body, stamp = self._encode(topic, value, key, None)
            else:
                body, stamp = self._plain_body(topic, value, key, iso), ms
            batch = per_partition[partition]
            places.append((partition, len(batch), stamp))
            batch.append(body)
        first = [-1] * len(per_partition)
        for partition, bodies in enumerate(per_partition):
            if not bodies:
                continue
            writer = state.writers[partition] or self._open_writer(topic, state, partition)
            if self._buffering:
                for body in bodies:
                    writer.buffer(body)
            else:
                first[partition] = writer.append_many(bodies)
        new = _new
        return [
            new(RecordMetadata, (topic, p, -1 if first[p] < 0 else first[p] + i, stamp))
            for p, i, stamp in places
        ]

    def partition_for(self, topic: str, key: str) -> int:
        """The partition a record with ``key`` goes to (creating the topic if allowed)."""
        state = self._topics.get(topic) or self._open_topic(topic)
        return self._choose(state, key)

    def _choose(self, state: _TopicState, key: str | None) -> int:
        if key is None:
            if state.config.compacted:
                raise ValueError(
                    f"topic {state.config.name!r} is compacted: every record needs a key "
                    "(Kafka rejects keyless records on compacted topics too)"
                )
            return next(state.robin) % state.config.partitions
        try:
            partition = state.keys.get(key)
        except TypeError:  # unhashable
            partition = None
        if partition is None:
            if type(key) is not str:
                raise TypeError(f"key must be a str or None, got {type(key).__name__}")
            partition = partition_for_key(key, state.config.partitions)
            if len(state.keys) >= _KEY_CACHE_LIMIT:
                state.keys.clear()
            state.keys[key] = partition
        return partition

    def _check_partition(self, state: _TopicState, partition: int, key: str | None) -> None:
        count = state.config.partitions
        if isinstance(partition, bool) or not isinstance(partition, int):
            raise TypeError(f"partition must be an int, got {type(partition).__name__}")
        if not 0 <= partition < count:
            raise ValueError(
                f"partition {partition} does not exist: topic {state.config.name!r} has "
                f"partitions 0..{count - 1}"
            )
        if key is not None and type(key) is not str:
            raise TypeError(f"key must be a str or None, got {type(key).__name__}")
        if key is None and state.config.compacted:
            self._choose(state, None)  # raises the compacted-topic error

    def _encode(
        self, topic: str, value: Any, key: str | None, timestamp_ms: int | None
    ) -> tuple[bytes, int]:
        """The stored line (without its offset) of an Event, or of a value at a given time."""
        if type(value) is Event:
            ms = value.timestamp_ns // 1_000_000
            body = dumps(
                {
                    "key": key,
                    "id": value.id,
                    "event": value.name,
                    "data": value.data,
                    "timestamp": value.timestamp_iso,
                    "version": value.version,
                    "correlation_id": value.correlation_id,
                }
            )
            if len(body) > self._max_record_bytes:
                self._too_large(body)
            return body, ms
        if timestamp_ms is None:
            ms = _time_ns() // 1_000_000
            clock = self._clock
            if clock[0] != ms:
                clock = self._clock = (ms, ms_to_iso(ms))
            return self._plain_body(topic, value, key, clock[1]), ms
        if isinstance(timestamp_ms, bool) or not isinstance(timestamp_ms, int):
            raise TypeError("timestamp_ms must be an int (milliseconds since the epoch)")
        return self._plain_body(topic, value, key, ms_to_iso(timestamp_ms)), timestamp_ms

    def _plain_body(self, topic: str, value: Any, key: str | None, iso: str) -> bytes:
        """The stored line (without its offset) of a plain value (pure Python: ``send`` inlines
        a copy that starts with the offset)."""
        body = dumps(
            {
                "key": key,
                "id": f"{self._prefix}{next(self._ids)}",
                "event": topic,
                "data": value,
                "timestamp": iso,
                "version": 1,
                "correlation_id": None,
            }
        )
        if len(body) > self._max_record_bytes:
            self._too_large(body)
        return body

    def _check_line(self, line: bytes, offset: int) -> None:
        """The size limit applies to the record without its offset and newline (as in _encode)."""
        size = len(line) - len(b'"offset":%d,' % offset) - 1
        if size > self._max_record_bytes:
            raise RecordTooLargeError(
                f"record of {size} bytes exceeds max_record_bytes={self._max_record_bytes}"
            )

    def _too_large(self, body: bytes) -> None:
        raise RecordTooLargeError(
            f"record of {len(body)} bytes exceeds max_record_bytes={self._max_record_bytes}"
        )

    # -- topics and writers ----------------------------------------------------------------
    def _open_topic(self, topic: str) -> _TopicState:
        if self._closed:
            raise IllegalStateError("the producer is closed")
        validate_topic_name(topic)
        with self._lock:
            state = self._topics.get(topic)
            if state is not None:
                return state
            try:
                config = load_topic(self.data_dir, topic)
            except UnknownTopicError:
                if not self._auto_create:
                    raise
                wanted = TopicConfig(name=topic, partitions=self.partitions)
                if self._segment_bytes is not None:
                    wanted = TopicConfig(
                        name=topic, partitions=self.partitions, segment_bytes=self._segment_bytes
                    )
                config = create_topic(self.data_dir, wanted, exist_ok=True)
                log.info("created topic %r with %d partition(s)", topic, config.partitions)
            state = _TopicState(config)
            self._topics[topic] = state
            return state

    def _open_writer(self, topic: str, state: _TopicState, partition: int) -> PartitionWriter:
        with self._lock:
            if self._closed:
                raise IllegalStateError("the producer is closed")
            writer = state.writers[partition]
            if writer is None:
                writer = PartitionWriter(
                    partition_dir(self.data_dir, topic, partition),
                    state.config,
                    partition,
                    durability=self.durability,
                    fsync_interval=self._fsync_interval,
                    batch_bytes=self._batch_bytes,
                )
                state.writers[partition] = writer
            return writer

    def _writer(self, topic: str, partition: int) -> PartitionWriter:
        """The writer of one partition (opened if needed): for maintenance and fault tests."""
        state = self._topics.get(topic) or self._open_topic(topic)
        return state.writers[partition] or self._open_writer(topic, state, partition)

    # -- flushing and closing --------------------------------------------------------------
    def flush(self) -> None:
        """Write every buffered record; in ``"batch"`` mode also fsync."""
        for state in list(self._topics.values()):
            for writer in state.writers:
                if writer is not None:
                    writer.flush()

    def close(self) -> None:
        """Flush and release every file. Idempotent; sending afterwards raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for state in self._topics.values():
            for writer in state.writers:
                if writer is not None:
                    writer.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
