"""Consumer groups on files: committed offsets, live members, and who owns which partition.

Kafka runs a group coordinator on a broker; here the file system and the kernel play its part:

* **Committed offsets** of a group live in ``groups/<group>/offsets.json``: one JSON object,
  replaced with ``common.storage.atomic_write`` (temp file, fsync, rename, fsync of the
  directory) under an exclusive ``flock`` on ``offsets.lock``, so members committing at the
  same time never lose each other's updates and a reader sees the old file or the new one.
* **A live member** holds an exclusive ``flock`` on its file ``members/<member-id>.member``
  for as long as it lives. Anyone can test whether a member is alive by trying to take that
  lock without waiting: success means the holder is gone (the kernel releases the locks of a
  killed process), and the tester removes the file. That is the "session timeout" here:
  immediate, and with no heartbeat traffic.
* **Ownership of a partition** within the group is an exclusive ``flock`` on
  ``partitions/<topic>/<n>.lock``, so at most one live member reads a partition at a time.
* **Assignment**: every member computes the same plan from the sorted list of live members and
  their subscriptions (Kafka's range assignor), releases what the plan gives to others and
  takes what it gives to itself once the previous owner has let go. A member that dies loses
  its locks at once, and the survivors pick its partitions up at their next poll, from the
  last committed offsets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.events import InvalidEventError, dumps, loads
from common.logger import get_logger
from common.storage import atomic_write, try_lock
from level_4_hard.file_kafka.errors import FileKafkaError
from level_4_hard.file_kafka.records import TopicPartition, ms_to_iso
from level_4_hard.file_kafka.topic import groups_dir, validate_topic_name

__all__ = [
    "GroupMembership",
    "OffsetStore",
    "assign_range",
    "group_dir",
    "list_groups",
    "live_members",
]

log = get_logger(__name__)
OFFSETS_FILE = "offsets.json"


def group_dir(data_dir: str | os.PathLike[str], group: str) -> Path:
    return groups_dir(data_dir) / validate_topic_name(group, "group id")


def list_groups(data_dir: str | os.PathLike[str]) -> list[str]:
    root = groups_dir(data_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


class OffsetStore:
    """The committed offsets of one group (offset = the next record to read)."""

    def __init__(self, data_dir: str | os.PathLike[str], group: str) -> None:
        self.dir = group_dir(data_dir, group)
        self.group = group
        self.path = self.dir / OFFSETS_FILE

    def read(self) -> dict[TopicPartition, int]:
        """Every committed offset of the group ({} if it never committed)."""
        return {tp: entry["offset"] for tp, entry in self._read_entries().items()}

    def _read_entries(self) -> dict[TopicPartition, dict[str, Any]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            obj = loads(raw)
            out = {}
            for topic, parts in obj["offsets"].items():
                for partition, entry in parts.items():
                    offset = entry["offset"]
                    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                        raise ValueError(f"bad offset {offset!r}")
                    out[TopicPartition(topic, int(partition))] = entry
            return out
        except (InvalidEventError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FileKafkaError(
                f"committed offsets in {self.path} are unreadable: {exc}"
            ) from None

    def committed(self, tp: TopicPartition) -> int | None:
        return self.read().get(tp)

    def commit(self, offsets: dict[TopicPartition, int], member: str | None = None) -> None:
        """Merge ``offsets`` into the file atomically (durable when this returns)."""
        if not offsets:
            return
        for tp, offset in offsets.items():
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ValueError(f"offset for {tp} must be a non-negative int, got {offset!r}")
        self.dir.mkdir(parents=True, exist_ok=True)
        now = ms_to_iso(time.time_ns() // 1_000_000)
        fd = os.open(self.dir / "offsets.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = self._read_entries()
            for tp, offset in offsets.items():
                entries[tp] = {"offset": offset, "committed_at": now, "member": member}
            tree: dict[str, dict[str, Any]] = {}
            for tp in sorted(entries):
                tree.setdefault(tp.topic, {})[str(tp.partition)] = entries[tp]
            atomic_write(self.path, dumps({"group": self.group, "offsets": tree}) + b"\n")
        finally:
            os.close(fd)  # closing releases the lock


def live_members(data_dir: str | os.PathLike[str], group: str) -> dict[str, dict[str, Any]]:
    """The group's live members: member id -> its description (topics, pid, assignment).

    Files of dead members (their lock is free) are removed on the way.
    """
    members_dir = group_dir(data_dir, group) / "members"
    try:
        names = sorted(os.listdir(members_dir))
    except FileNotFoundError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name.endswith(".joining"):
            _remove_if_unlocked(members_dir / name)
        if not name.endswith(".member"):
            continue
        path = members_dir / name
        member_id = name[: -len(".member")]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            if try_lock(fd):  # nobody holds it: the member is gone
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    (members_dir / f"{member_id}.assignment").unlink()
                log.info("group %s: member %s is gone (its lock was free)", group, member_id)
                continue
            raw = os.pread(fd, 1 << 16, 0)
        finally:
            os.close(fd)
        try:
            info = loads(raw)
        except InvalidEventError:
            continue  # being written right now; seen at the next look
        info["assignment"] = _read_assignment(members_dir / f"{member_id}.assignment")
        out[member_id] = info
    return out


def _remove_if_unlocked(path: Path) -> None:
    """Remove the file of a process that died while joining (old, and nobody holds its lock)."""
    try:
        if time.time() - path.stat().st_mtime < 60:
            return  # maybe being created right now, before its creator took the lock
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        if try_lock(fd):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    finally:
        os.close(fd)


def _read_assignment(path: Path) -> list[list[Any]]:
    try:
        return loads(path.read_bytes())
    except (FileNotFoundError, InvalidEventError):
        return []


def assign_range(
    members: dict[str, Iterable[str]], partitions: dict[str, int]
) -> dict[str, set[TopicPartition]]:
    """Kafka's range assignor: per topic, contiguous partition ranges over sorted members."""
    plan: dict[str, set[TopicPartition]] = {m: set() for m in members}
    for topic, count in sorted(partitions.items()):
        subscribers = sorted(m for m, topics in members.items() if topic in topics)
        if not subscribers:
            continue
        per, extra = divmod(count, len(subscribers))
        start = 0
        for i, member in enumerate(subscribers):
            size = per + (1 if i < extra else 0)
            plan[member].update(TopicPartition(topic, p) for p in range(start, start + size))
            start += size
    return plan


class GroupMembership:
    """This process's membership of a group: its member lock and its partition locks."""

    def __init__(
        self, data_dir: str | os.PathLike[str], group: str, client_id: str = "consumer"
    ) -> None:
        self.data_dir = Path(data_dir)
        self.group = group
        self.dir = group_dir(data_dir, group)
        self.member_id = f"{client_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._member_fd: int | None = None
        self._owned: dict[TopicPartition, int] = {}

    @property
    def members_dir(self) -> Path:
        return self.dir / "members"

    def join(self, topics: Iterable[str]) -> None:
        """Announce this member (hold its lock from before its file becomes visible)."""
        self.members_dir.mkdir(parents=True, exist_ok=True)
        if self._member_fd is not None:
            self._leave_member_file()
        info = {"member_id": self.member_id, "pid": os.getpid(), "topics": sorted(topics)}
        joining = self.members_dir / f".{self.member_id}.joining"
        fd = os.open(joining, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, dumps(info))
            os.rename(joining, self.members_dir / f"{self.member_id}.member")
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                joining.unlink()
            raise
        self._member_fd = fd

    def live_members(self) -> dict[str, list[str]]:
        """member id -> subscribed topics, for every live member (this one included)."""
        members = live_members(self.data_dir, self.group)
        return {m: list(info.get("topics", [])) for m, info in members.items()}

    def try_acquire(self, tp: TopicPartition) -> bool:
        """Take ownership of a partition if no live member holds it."""
        if tp in self._owned:
            return True
        lock_dir = self.dir / "partitions" / validate_topic_name(tp.topic)
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / f"{tp.partition}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        if not try_lock(fd):
            os.close(fd)
            return False
        self._owned[tp] = fd
        return True

    def release(self, tp: TopicPartition) -> None:
        fd = self._owned.pop(tp, None)
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the lock

    def publish_assignment(self) -> None:
        """Record what this member owns (for ``groups --describe``)."""
        if self._member_fd is None:
            return
        owned = sorted([tp.topic, tp.partition] for tp in self._owned)
        atomic_write(self.members_dir / f"{self.member_id}.assignment", dumps(owned), fsync=False)

    def leave(self) -> None:
        """Release every partition and leave the group (the others rebalance)."""
        for tp in list(self._owned):
            self.release(tp)
        self._leave_member_file()

    def _leave_member_file(self) -> None:
        if self._member_fd is None:
            return
        for suffix in (".member", ".assignment"):
            with contextlib.suppress(FileNotFoundError):
                (self.members_dir / f"{self.member_id}{suffix}").unlink()
        os.close(self._member_fd)
        self._member_fd = None
