"""The consumer: subscribe to topics, ``poll()`` records, ``commit()`` where you are.

Semantics follow Kafka's consumer:

* a **position** per partition is the offset of the next record ``poll`` returns; a
  **committed offset** is the position stored for the group (the next record to read after a
  restart): ``commit()`` stores the current positions, i.e. the offset *after* the last record
  ``poll`` returned;
* where to start when the group has no committed offset, or the committed one no longer
  exists (retention deleted it): ``auto_offset_reset`` = ``"earliest"``, ``"latest"`` (Kafka's
  default) or ``"none"`` (raise);
* **delivery**: commit after processing is at-least-once (a crash between the two redelivers
  the records since the last commit: duplicates); commit before processing is at-most-once (a
  crash loses the records committed but not yet processed); ``enable_auto_commit`` commits the
  positions at the start of a later ``poll`` every ``auto_commit_interval`` seconds, and on
  ``close()`` and on a rebalance: duplicates after a crash, and loss if the records were handed
  to another thread that had not finished them (``demo_delivery.py`` shows all four);
* **groups**: the partitions of the subscribed topics are divided among the group's live
  members (see ``group.py``); ``group_id=None`` reads every partition and cannot commit.

Differences from Kafka: the assignment is made when ``subscribe`` returns (so ``seek`` works at
once, where Kafka needs a first ``poll``); a member that stops polling keeps its partitions
(Kafka evicts it after ``max.poll.interval.ms``), while a member whose process dies loses them
immediately (Kafka waits for ``session.timeout.ms``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from common.logger import get_logger
from level_4_hard.file_kafka.errors import (
    CorruptLogError,
    IllegalStateError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    UnknownTopicError,
)
from level_4_hard.file_kafka.group import GroupMembership, OffsetStore, assign_range
from level_4_hard.file_kafka.reader import PartitionReader
from level_4_hard.file_kafka.records import Record, TopicPartition
from level_4_hard.file_kafka.topic import load_topic, partition_dir, validate_topic_name

__all__ = ["OFFSET_RESET_POLICIES", "Consumer"]

log = get_logger(__name__)
OFFSET_RESET_POLICIES = ("earliest", "latest", "none")
RebalanceCallback = Callable[[list[TopicPartition]], None]


class Consumer:
    """Reads records from topics under ``data_dir`` as a member of group ``group_id``."""

    def __init__(
        self,
        group_id: str | None,
        *,
        data_dir: str | os.PathLike[str],
        auto_offset_reset: str = "latest",
        enable_auto_commit: bool = True,
        auto_commit_interval: float = 5.0,
        max_poll_records: int = 500,
        heartbeat_interval: float = 0.1,
        client_id: str = "consumer",
        fetch_bytes: int = 1 << 20,
    ) -> None:
        if auto_offset_reset not in OFFSET_RESET_POLICIES:
            raise ValueError(
                f"auto_offset_reset must be one of {OFFSET_RESET_POLICIES}, "
                f"got {auto_offset_reset!r}"
            )
        if max_poll_records < 1:
            raise ValueError("max_poll_records must be at least 1")
        if auto_commit_interval < 0 or heartbeat_interval < 0:
            raise ValueError("intervals must not be negative")
        validate_topic_name(client_id, "client id")
        self.data_dir = Path(data_dir)
        self.group_id = None if group_id is None else validate_topic_name(group_id, "group id")
        self.auto_offset_reset = auto_offset_reset
        self.enable_auto_commit = enable_auto_commit and group_id is not None
        self._auto_commit_interval = auto_commit_interval
        self._max_poll_records = max_poll_records
        self._heartbeat = heartbeat_interval
        self._fetch_bytes = fetch_bytes
        self._store = None if group_id is None else OffsetStore(data_dir, group_id)
        self._membership = (
            None if group_id is None else GroupMembership(data_dir, group_id, client_id)
        )
        self._topics: list[str] = []
        self._on_assign: RebalanceCallback | None = None
        self._on_revoke: RebalanceCallback | None = None
        self._readers: dict[TopicPartition, PartitionReader] = {}
        self._order: list[TopicPartition] = []
        self._rr = 0
        self._committed: dict[TopicPartition, int] = {}
        self._next_heartbeat = 0.0
        self._next_auto_commit = time.monotonic() + auto_commit_interval
        self._deferred: CorruptLogError | None = None
        self._closed = False

    @property
    def member_id(self) -> str | None:
        return None if self._membership is None else self._membership.member_id

    # -- subscription and assignment -------------------------------------------------------
    def subscribe(
        self,
        topics: str | Iterable[str],
        *,
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
    ) -> None:
        """Subscribe to a topic or a list of topics (replacing any earlier subscription).

        Joins the group and takes the partitions this member gets right away. ``on_revoke``
        is called with the partitions this member is about to give up (commit there if you
        commit by hand), ``on_assign`` with the partitions it has just taken.
        """
        self._check_open()
        names = [topics] if isinstance(topics, str) else list(topics)
        if not names:
            raise ValueError("subscribe to at least one topic")
        for name in names:
            validate_topic_name(name)
        if self._topics:
            self.unsubscribe()
        self._topics = sorted(set(names))
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        if self._membership is not None:
            self._membership.join(self._topics)
        self._rebalance(force=True)

    def unsubscribe(self) -> None:
        """Give up every partition (committing first with auto-commit) and leave the group."""
        self._revoke(set(self._readers))
        if self._membership is not None:
            self._membership.leave()
        self._topics = []

    def assignment(self) -> set[TopicPartition]:
        """The partitions this consumer reads now."""
        return set(self._readers)

    def _partition_counts(self) -> dict[str, int]:
        counts = {}
        for topic in self._topics:
            try:
                counts[topic] = load_topic(self.data_dir, topic).partitions
            except UnknownTopicError:
                continue  # not created yet: picked up at a later poll
        return counts

    def _rebalance(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self._heartbeat
        counts = self._partition_counts()
        if self._membership is None:
            target = {TopicPartition(t, p) for t, n in counts.items() for p in range(n)}
        else:
            members = self._membership.live_members()
            if self.member_id not in members:  # our file vanished (group deleted?): rejoin
                self._membership.join(self._topics)
                members = self._membership.live_members()
            target = assign_range(members, counts).get(self.member_id or "", set())
        revoked = set(self._readers) - target
        if revoked:
            self._revoke(revoked)
        added = []
        for tp in sorted(target - set(self._readers)):
            if self._membership is not None and not self._membership.try_acquire(tp):
                continue  # the previous owner has not let go yet: try at the next poll
            try:
                self._readers[tp] = self._open_reader(tp)
            except BaseException:
                if self._membership is not None:
                    self._membership.release(tp)
                raise
            added.append(tp)
        if revoked or added:
            self._order = sorted(self._readers)
            if self._membership is not None:
                self._membership.publish_assignment()
            log.info(
                "consumer %s: assigned %s",
                self.member_id or "(no group)",
                ", ".join(f"{tp.topic}/{tp.partition}" for tp in self._order) or "nothing",
            )
            if added and self._on_assign is not None:
                self._on_assign(added)

    def _revoke(self, tps: set[TopicPartition]) -> None:
        if not tps:
            return
        ordered = sorted(tps)
        if self._on_revoke is not None:
            self._on_revoke(ordered)
        if self.enable_auto_commit:
            self._commit_positions(ordered)
        for tp in ordered:
            reader = self._readers.pop(tp, None)
            if reader is not None:
                reader.close()
            self._committed.pop(tp, None)
            if self._membership is not None:
                self._membership.release(tp)
        self._order = sorted(self._readers)

    def _open_reader(self, tp: TopicPartition) -> PartitionReader:
        reader = PartitionReader(
            partition_dir(self.data_dir, tp.topic, tp.partition),
            tp.topic,
            tp.partition,
            fetch_bytes=self._fetch_bytes,
        )
        committed = None if self._store is None else self._store.committed(tp)
        try:
            if committed is None:
                self._reset(reader, tp, "no committed offset")
            else:
                self._committed[tp] = committed
                try:
                    reader.seek(committed)
                except OffsetOutOfRangeError as exc:
                    self._reset(reader, tp, str(exc))
        except BaseException:
            reader.close()
            raise
        return reader

    def _reset(self, reader: PartitionReader, tp: TopicPartition, why: str) -> None:
        """Apply ``auto_offset_reset`` to a partition without a usable position."""
        if self.auto_offset_reset == "none":
            if "no committed offset" in why:
                raise NoOffsetForPartitionError(
                    f"{tp.topic}/{tp.partition}: {why} and auto_offset_reset='none'"
                )
            raise OffsetOutOfRangeError(f"{why} (auto_offset_reset='none')")
        for _ in range(5):
            start, end = reader.bounds()
            try:
                reader.seek(start if self.auto_offset_reset == "earliest" else end)
            except OffsetOutOfRangeError:
                continue  # the log moved between reading its bounds and seeking
            log.info(
                "%s/%s: %s; starting at the %s offset %d",
                tp.topic,
                tp.partition,
                why,
                self.auto_offset_reset,
                reader.position,
            )
            return
        raise OffsetOutOfRangeError(f"{tp.topic}/{tp.partition} keeps moving: {why}")

    # -- polling ---------------------------------------------------------------------------
    def poll(self, timeout: float = 1.0, max_records: int | None = None) -> list[Record]:
        """Return the next records (at most ``max_records``), waiting up to ``timeout`` s.

        Returns as soon as at least one record is available; [] when the time runs out.
        Records of one partition come in offset order; partitions take turns.
        """
        self._check_open()
        if not self._topics:
            raise IllegalStateError("subscribe to a topic before polling")
        limit = self._max_poll_records if max_records is None else max_records
        if limit < 1:
            raise ValueError("max_records must be at least 1")
        deadline = time.monotonic() + max(0.0, timeout)
        delay = 0.001
        while True:
            self._rebalance()
            if self.enable_auto_commit and time.monotonic() >= self._next_auto_commit:
                self.commit()
            records = self._fetch(limit)
            if records:
                return records
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return records
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)

    def _fetch(self, limit: int) -> list[Record]:
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        out: list[Record] = []
        order = self._order
        count = len(order)
        if not count:
            return out
        start = self._rr % count
        self._rr += 1
        for i in range(count):
            tp = order[(start + i) % count]
            reader = self._readers[tp]
            try:
                reader.fetch(limit - len(out), out)
            except OffsetOutOfRangeError as exc:
                self._reset(reader, tp, str(exc))
            except CorruptLogError as exc:
                if not out:
                    raise
                # Return what other partitions gave first (their positions have moved), and
                # raise at the next poll: the reader still stands at the bad record.
                self._deferred = exc
                break
            if len(out) >= limit:
                break
        return out

    # -- positions and commits -------------------------------------------------------------
    def _tp(self, partition: int | TopicPartition, topic: str | None) -> TopicPartition:
        if isinstance(partition, TopicPartition):
            tp = partition
        else:
            if topic is None:
                if len(self._topics) != 1:
                    raise ValueError(
                        "subscribed to several topics: pass topic=... or a TopicPartition"
                    )
                topic = self._topics[0]
            tp = TopicPartition(topic, partition)
        if tp not in self._readers:
            raise IllegalStateError(
                f"partition {tp.topic}/{tp.partition} is not assigned to this consumer "
                f"(assigned: {sorted(self._readers)})"
            )
        return tp

    def position(self, partition: int | TopicPartition, *, topic: str | None = None) -> int:
        """The offset of the next record ``poll`` will return from this partition."""
        return self._readers[self._tp(partition, topic)].position

    def seek(
        self, partition: int | TopicPartition, offset: int, *, topic: str | None = None
    ) -> None:
        """Move to ``offset``: the next ``poll`` returns from there (replay, or skip ahead)."""
        self._check_open()
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        self._readers[self._tp(partition, topic)].seek(offset)

    def seek_to_beginning(self, *partitions: int | TopicPartition) -> None:
        """Move to the first record still in the log (all assigned partitions by default)."""
        for tp in self._targets(partitions):
            reader = self._readers[tp]
            reader.seek(reader.bounds()[0])

    def seek_to_end(self, *partitions: int | TopicPartition) -> None:
        """Move past the last record: only records produced from now on are returned."""
        for tp in self._targets(partitions):
            reader = self._readers[tp]
            reader.seek(reader.bounds()[1])

    def _targets(self, partitions: tuple[int | TopicPartition, ...]) -> list[TopicPartition]:
        self._check_open()
        if not partitions:
            return sorted(self._readers)
        return [self._tp(p, None) for p in partitions]

    def committed(self, partition: int | TopicPartition, *, topic: str | None = None) -> int | None:
        """The group's committed offset for a partition (None if it never committed)."""
        if self._store is None:
            return None
        if isinstance(partition, TopicPartition):
            return self._store.committed(partition)
        if topic is None:
            if len(self._topics) != 1:
                raise ValueError("subscribed to several topics: pass topic=... or a TopicPartition")
            topic = self._topics[0]
        return self._store.committed(TopicPartition(topic, partition))

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind the end of the log, per assigned partition."""
        return {tp: r.bounds()[1] - r.position for tp, r in sorted(self._readers.items())}

    def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        """Store positions for the group, durably (fsync) and atomically.

        With no argument: the current position of every assigned partition, i.e. the offset
        after the last record ``poll`` returned. Only partitions this member owns can be
        committed, so a member that lost a partition cannot overwrite its new owner's work.
        """
        self._check_open()
        if self._store is None:
            raise IllegalStateError("a consumer without a group id has nowhere to commit")
        if offsets is None:
            self._commit_positions(sorted(self._readers))
            return
        checked = {}
        for key, offset in offsets.items():
            tp = self._tp(key if isinstance(key, TopicPartition) else TopicPartition(*key), None)
            checked[tp] = offset
        self._store.commit(checked, member=self.member_id)
        self._committed.update(checked)

    def _commit_positions(self, tps: list[TopicPartition]) -> None:
        if self._store is None:
            return
        offsets = {}
        for tp in tps:
            reader = self._readers.get(tp)
            if reader is not None and self._committed.get(tp) != reader.position:
                offsets[tp] = reader.position
        if offsets:
            self._store.commit(offsets, member=self.member_id)
            self._committed.update(offsets)
        self._next_auto_commit = time.monotonic() + self._auto_commit_interval

    # -- closing ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise IllegalStateError("the consumer is closed")

    def close(self) -> None:
        """Commit (with auto-commit), release the partitions and leave the group."""
        if self._closed:
            return
        try:
            self.unsubscribe()
        finally:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()
            if self._membership is not None:
                self._membership.leave()
            self._closed = True

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
