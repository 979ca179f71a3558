"""Administration: topics, consumer-group lag, offset resets and retention (Kafka's tools' API).

The CLI (``python -m level_4_hard.file_kafka``) is a thin layer over :class:`Admin`; the demo
and the tests call it directly.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from level_4_hard.file_kafka.errors import GroupActiveError, UnknownTopicError
from level_4_hard.file_kafka.group import OffsetStore, list_groups, live_members
from level_4_hard.file_kafka.partition import CompactionResult, PartitionWriter, log_bounds
from level_4_hard.file_kafka.records import TopicPartition
from level_4_hard.file_kafka.segment import file_size, list_segments, log_path
from level_4_hard.file_kafka.topic import (
    TopicConfig,
    create_topic,
    list_topics,
    load_topic,
    partition_dir,
    save_topic_config,
)

__all__ = [
    "GROUP_HEADER",
    "Admin",
    "GroupPartitionLag",
    "OffsetReset",
    "PartitionInfo",
    "RetentionReport",
    "TopicDescription",
    "format_table",
    "group_rows",
]

GROUP_HEADER = [
    "GROUP",
    "TOPIC",
    "PARTITION",
    "CURRENT-OFFSET",
    "LOG-END-OFFSET",
    "LAG",
    "CONSUMER-ID",
]


def format_table(rows: list[list[Any]]) -> list[str]:
    """Rows as left-aligned text columns (the first row is the header); None prints as -."""
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


@dataclass(frozen=True)
class PartitionInfo:
    partition: int
    log_start: int
    log_end: int
    segments: int
    size_bytes: int


@dataclass(frozen=True)
class TopicDescription:
    config: TopicConfig
    partitions: list[PartitionInfo]


@dataclass(frozen=True)
class GroupPartitionLag:
    """One row of ``groups --describe``: how far a group is behind in one partition."""

    group: str
    topic: str
    partition: int
    committed: int | None
    log_end: int
    lag: int | None
    member: str | None


@dataclass(frozen=True)
class OffsetReset:
    topic: str
    partition: int
    current: int | None
    new: int


@dataclass(frozen=True)
class RetentionReport:
    topic: str
    partition: int
    deleted_segments: list[int]
    log_start: int
    log_end: int
    compaction: CompactionResult | None


def group_rows(rows: list[GroupPartitionLag]) -> list[list[Any]]:
    """``describe_group`` rows in the column order of Kafka's kafka-consumer-groups.sh."""
    return [GROUP_HEADER] + [
        [r.group, r.topic, r.partition, r.committed, r.log_end, r.lag, r.member] for r in rows
    ]


class Admin:
    """Topic and group administration for one data directory."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)

    # -- topics ----------------------------------------------------------------------------
    def create_topic(
        self, name: str, partitions: int = 1, *, exist_ok: bool = False, **config: Any
    ) -> TopicConfig:
        """Create a topic; ``config`` takes any :class:`TopicConfig` field (retention...)."""
        return create_topic(
            self.data_dir,
            TopicConfig(name=name, partitions=partitions, **config),
            exist_ok=exist_ok,
        )

    def list_topics(self) -> list[str]:
        return list_topics(self.data_dir)

    def describe_topic(self, name: str) -> TopicDescription:
        config = load_topic(self.data_dir, name)
        infos = []
        for partition in range(config.partitions):
            pdir = partition_dir(self.data_dir, name, partition)
            start, end = log_bounds(pdir)
            bases = list_segments(pdir)
            size = sum(file_size(log_path(pdir, b)) for b in bases)
            infos.append(PartitionInfo(partition, start, end, len(bases), size))
        return TopicDescription(config, infos)

    def alter_topic(self, name: str, **changes: Any) -> TopicConfig:
        """Change a topic's settings (retention, cleanup policy, segment size)."""
        if "name" in changes or "partitions" in changes:
            raise ValueError("a topic's name and partition count cannot be altered")
        config = TopicConfig(**{**asdict(load_topic(self.data_dir, name)), **changes})
        save_topic_config(self.data_dir, config)
        return config

    # -- groups ----------------------------------------------------------------------------
    def list_groups(self) -> list[str]:
        return list_groups(self.data_dir)

    def group_members(self, group: str) -> dict[str, dict[str, Any]]:
        """Live members of a group with their subscriptions and assignments."""
        return live_members(self.data_dir, group)

    def describe_group(self, group: str) -> list[GroupPartitionLag]:
        """Per partition: committed offset, log end offset, lag, and the member reading it."""
        committed = OffsetStore(self.data_dir, group).read()
        members = live_members(self.data_dir, group)
        owner: dict[TopicPartition, str] = {}
        topics = {tp.topic for tp in committed}
        for member_id, info in members.items():
            topics.update(info.get("topics", []))
            for topic, partition in info.get("assignment", []):
                owner[TopicPartition(topic, partition)] = member_id
        rows = []
        for topic in sorted(topics):
            try:
                config = load_topic(self.data_dir, topic)
            except UnknownTopicError:
                continue
            for partition in range(config.partitions):
                tp = TopicPartition(topic, partition)
                _, end = log_bounds(partition_dir(self.data_dir, topic, partition))
                offset = committed.get(tp)
                lag = None if offset is None else max(0, end - offset)
                rows.append(
                    GroupPartitionLag(group, topic, partition, offset, end, lag, owner.get(tp))
                )
        return rows

    def reset_offsets(
        self,
        group: str,
        topic: str,
        *,
        to: str | int | None = None,
        shift_by: int | None = None,
        partitions: list[int] | None = None,
        execute: bool = False,
    ) -> list[OffsetReset]:
        """Plan (and with ``execute=True`` apply) new committed offsets for a group.

        ``to`` is ``"earliest"``, ``"latest"`` or an offset; ``shift_by`` moves the committed
        offsets by n. Targets are clamped into the log, as Kafka's tool does. Like Kafka, it
        refuses while the group has live members (they would overwrite the reset).
        """
        if (to is None) == (shift_by is None):
            raise ValueError("give exactly one of to=... or shift_by=...")
        config = load_topic(self.data_dir, topic)
        chosen = list(range(config.partitions)) if partitions is None else partitions
        for partition in chosen:
            if not 0 <= partition < config.partitions:
                raise ValueError(f"topic {topic!r} has no partition {partition}")
        members = live_members(self.data_dir, group)
        if members:
            raise GroupActiveError(
                f"group {group!r} has {len(members)} live member(s) "
                f"({', '.join(sorted(members))}); stop them before resetting offsets"
            )
        store = OffsetStore(self.data_dir, group)
        current = store.read()
        plan = []
        for partition in chosen:
            tp = TopicPartition(topic, partition)
            start, end = log_bounds(partition_dir(self.data_dir, topic, partition))
            now = current.get(tp)
            if shift_by is not None:
                target = (start if now is None else now) + shift_by
            elif to == "earliest":
                target = start
            elif to == "latest":
                target = end
            elif isinstance(to, int) and not isinstance(to, bool):
                target = to
            else:
                raise ValueError(f"to must be 'earliest', 'latest' or an offset, got {to!r}")
            plan.append(OffsetReset(topic, partition, now, min(max(target, start), end)))
        if execute:
            store.commit(
                {TopicPartition(r.topic, r.partition): r.new for r in plan}, member="reset-offsets"
            )
        return plan

    # -- retention -------------------------------------------------------------------------
    def enforce_retention(
        self, topic: str | None = None, *, now_ms: int | None = None
    ) -> list[RetentionReport]:
        """Apply each topic's cleanup policy now: delete old segments and/or compact."""
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        names = [topic] if topic is not None else self.list_topics()
        reports = []
        for name in names:
            config = load_topic(self.data_dir, name)
            for partition in range(config.partitions):
                pdir = partition_dir(self.data_dir, name, partition)
                writer = PartitionWriter(pdir, config, partition)
                try:
                    deleted = writer.enforce_retention(now_ms) if config.deletes else []
                    compaction = writer.compact(now_ms) if config.compacted else None
                finally:
                    writer.close()
                start, end = log_bounds(pdir)
                reports.append(RetentionReport(name, partition, deleted, start, end, compaction))
        return reports
