"""Topics on disk: names, configuration, the directory layout and the key partitioner.

Layout under a data directory (Kafka keeps ``<topic>-<partition>`` directories in a log dir;
here a topic is a directory and each partition a directory of segments inside it)::

    <data_dir>/topics/orders/topic.json                      the topic's configuration
    <data_dir>/topics/orders/partition-0/00000000000000000000.log    segment, named by base offset
    <data_dir>/topics/orders/partition-0/00000000000000000000.index  its sparse offset index
    <data_dir>/topics/orders/partition-0/writer.state        writers' lock + end-of-log hint
    <data_dir>/groups/billing/offsets.json                   committed offsets of a group

A topic is created in a hidden temporary directory and renamed into place, so two processes
that create the same topic at once end up with one complete topic, never a half-made one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from common.events import InvalidEventError, dumps, loads
from common.patterns import validate_name
from common.storage import atomic_write, fsync_dir
from level_4_hard.file_kafka.errors import (
    FileKafkaError,
    InvalidTopicError,
    TopicExistsError,
    UnknownTopicError,
)

__all__ = [
    "CLEANUP_POLICIES",
    "TopicConfig",
    "create_topic",
    "groups_dir",
    "list_topics",
    "load_topic",
    "murmur2",
    "partition_dir",
    "partition_for_key",
    "save_topic_config",
    "topic_dir",
    "topics_dir",
    "validate_topic_name",
]

CLEANUP_POLICIES = ("delete", "compact", "compact,delete")
TOPIC_FILE = "topic.json"
_LEGAL = re.compile(r"[A-Za-z0-9._-]{1,249}")
_MIN_SEGMENT_BYTES = 128
_MAX_SEGMENT_BYTES = 1 << 30  # index positions are 32-bit, as in Kafka


def validate_topic_name(name: object, what: str = "topic name") -> str:
    """Return ``name`` if Kafka would accept it and it is a valid event name; else raise.

    Kafka allows 1-249 ASCII letters, digits, ``.``, ``_`` and ``-``. On top of that the
    name must be a valid event name of the repository (no empty ``.``-segment), because it
    becomes the ``event`` of each stored line; that also rules out ``.``, ``..`` and hidden
    names. ``common.patterns.validate_name`` alone would accept ``a/b`` or a name with
    unicode, which must not reach the file system.
    """
    if not isinstance(name, str):
        raise InvalidTopicError(f"{what} must be a string, got {type(name).__name__}")
    if not _LEGAL.fullmatch(name):
        raise InvalidTopicError(
            f"illegal {what} {name!r}: use 1-249 ASCII letters, digits, '.', '_' or '-' "
            "(as Kafka does)"
        )
    try:
        validate_name(name)
    except ValueError as exc:
        raise InvalidTopicError(f"illegal {what}: {exc}") from None
    return name


def topics_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "topics"


def groups_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "groups"


def topic_dir(data_dir: str | os.PathLike[str], topic: str) -> Path:
    return topics_dir(data_dir) / validate_topic_name(topic)


def partition_dir(data_dir: str | os.PathLike[str], topic: str, partition: int) -> Path:
    return topic_dir(data_dir, topic) / f"partition-{partition}"


@dataclass(frozen=True)
class TopicConfig:
    """A topic's settings, stored in ``topic.json`` and shared by every client.

    ``retention_ms`` / ``retention_bytes`` of ``None`` keep everything (Kafka defaults to
    7 days and unlimited size). ``cleanup_policy`` is ``"delete"`` (retention deletes old
    segments), ``"compact"`` (keep the latest value per key) or ``"compact,delete"``.
    """

    name: str
    partitions: int = 1
    segment_bytes: int = 64 << 20
    index_interval_bytes: int = 4096
    retention_ms: int | None = None
    retention_bytes: int | None = None
    cleanup_policy: str = "delete"
    delete_retention_ms: int = 86_400_000
    created: str = ""

    def __post_init__(self) -> None:
        validate_topic_name(self.name)
        _check_int("partitions", self.partitions, 1, 10_000)
        _check_int("segment_bytes", self.segment_bytes, _MIN_SEGMENT_BYTES, _MAX_SEGMENT_BYTES)
        _check_int("index_interval_bytes", self.index_interval_bytes, 64, 1 << 24)
        if self.retention_ms is not None:
            _check_int("retention_ms", self.retention_ms, 0, 1 << 62)
        if self.retention_bytes is not None:
            _check_int("retention_bytes", self.retention_bytes, 0, 1 << 62)
        _check_int("delete_retention_ms", self.delete_retention_ms, 0, 1 << 62)
        if self.cleanup_policy not in CLEANUP_POLICIES:
            raise ValueError(
                f"cleanup_policy must be one of {CLEANUP_POLICIES}, got {self.cleanup_policy!r}"
            )

    @property
    def compacted(self) -> bool:
        return "compact" in self.cleanup_policy

    @property
    def deletes(self) -> bool:
        return "delete" in self.cleanup_policy

    def to_json_bytes(self) -> bytes:
        return dumps(asdict(self))

    @classmethod
    def from_json_bytes(cls, raw: bytes, source: str = "topic.json") -> TopicConfig:
        try:
            obj = loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in obj.items() if k in known})
        except (InvalidEventError, ValueError, TypeError) as exc:
            raise FileKafkaError(f"bad topic configuration in {source}: {exc}") from None


def _check_int(what: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {value!r}")


def load_topic(data_dir: str | os.PathLike[str], topic: str) -> TopicConfig:
    """Read a topic's configuration; UnknownTopicError when it does not exist."""
    path = topic_dir(data_dir, topic) / TOPIC_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UnknownTopicError(f"topic {topic!r} does not exist in {data_dir}") from None
    config = TopicConfig.from_json_bytes(raw, str(path))
    if config.name != topic:
        raise FileKafkaError(f"{path} describes topic {config.name!r}, not {topic!r}")
    return config


def list_topics(data_dir: str | os.PathLike[str]) -> list[str]:
    root = topics_dir(data_dir)
    if not root.is_dir():
        return []
    return sorted(
        entry.name
        for entry in root.iterdir()
        if not entry.name.startswith(".") and (entry / TOPIC_FILE).is_file()
    )


def create_topic(
    data_dir: str | os.PathLike[str], config: TopicConfig, *, exist_ok: bool = False
) -> TopicConfig:
    """Create a topic atomically and return its configuration.

    With ``exist_ok`` an existing topic is returned as it is (its partition count wins, as
    with Kafka's auto-creation); otherwise TopicExistsError.
    """
    from level_4_hard.file_kafka.segment import create_segment  # segment imports this module

    root = topics_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / config.name
    if (final / TOPIC_FILE).is_file():
        if exist_ok:
            return load_topic(data_dir, config.name)
        raise TopicExistsError(f"topic {config.name!r} already exists")
    if not config.created:
        config = TopicConfig(**{**asdict(config), "created": _now_iso()})
    staging = root / f".{config.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        for partition in range(config.partitions):
            pdir = staging / f"partition-{partition}"
            pdir.mkdir()
            create_segment(pdir, 0)
        atomic_write(staging / TOPIC_FILE, config.to_json_bytes())
        try:
            os.rename(staging, final)
        except OSError:  # somebody else created it first (ENOTEMPTY / EEXIST)
            if (final / TOPIC_FILE).is_file():
                if exist_ok:
                    return load_topic(data_dir, config.name)
                raise TopicExistsError(f"topic {config.name!r} already exists") from None
            raise
        fsync_dir(root)
        return config
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)


def save_topic_config(data_dir: str | os.PathLike[str], config: TopicConfig) -> None:
    """Replace a topic's configuration atomically (the partition count cannot change)."""
    current = load_topic(data_dir, config.name)
    if config.partitions != current.partitions:
        raise ValueError(
            f"topic {config.name!r} has {current.partitions} partitions; "
            "changing the count would move keys to other partitions"
        )
    atomic_write(topic_dir(data_dir, config.name) / TOPIC_FILE, config.to_json_bytes())


def _now_iso() -> str:
    from level_4_hard.file_kafka.records import ms_to_iso

    return ms_to_iso(time.time_ns() // 1_000_000)


# -- the key partitioner ---------------------------------------------------------------------
def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as a signed int.

    Using Kafka's own hash means a key lands in the partition a Java or librdkafka
    producer with the default partitioner would choose, and it never depends on Python's
    per-process ``hash()`` randomisation.
    """
    mask = 0xFFFFFFFF
    m = 0x5BD1E995
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    tail = length & ~3
    for i in range(0, tail, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for_key(key: str, partitions: int) -> int:
    """Kafka's default partitioner for a keyed record: ``toPositive(murmur2(key)) % n``."""
    return (murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % partitions
