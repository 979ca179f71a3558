"""Snapshots: rebuild state from the latest snapshot plus the events that follow it.

Replaying a whole log costs time in proportion to its length. A snapshot stores a projection's
state together with the log position it covers (byte offset and line number, the
:class:`~level_3_advanced.event_replay.eventbus_replay.LogPosition` a replay reports), so a
rebuild restores the state and replays only the lines after that position: its cost stops
growing with the history.

Snapshots are taken by the *reader*, during a replay, because only the reader knows exactly
which line its state covers: a writer appending with ``O_APPEND`` next to other processes does
not learn the offset of its own line. A snapshot is only a cache, so every doubt leads to a
full replay, never to a wrong state: a snapshot file that cannot be read, one written for
another shape of the state (``snapshot_version``), or one whose log position no longer holds
the event it recorded (the log was truncated or replaced) is ignored with a warning.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from common.events import Event, InvalidEventError, dumps, loads
from common.logger import get_logger
from common.storage import atomic_write
from level_3_advanced.event_replay.eventbus_replay import LogPosition, ReplayableEventBus

__all__ = ["RebuildResult", "Snapshot", "SnapshotStore", "Snapshottable", "rebuild"]

log = get_logger(__name__)
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_FORMAT = 1  # the layout of a snapshot file


class Snapshottable(Protocol):
    """What :func:`rebuild` needs from a projection (an aggregate, a read model)."""

    snapshot_version: int  # bump it when the shape of the state changes

    def apply(self, event: Event) -> None: ...  # the listener that changes the state

    def snapshot_state(self) -> dict[str, Any]: ...  # JSON-serialisable

    def restore(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Snapshot:
    """A projection's state and the log position it covers (the line of ``event_id``)."""

    key: str
    state: dict[str, Any]
    position: LogPosition
    event_id: str
    version: int
    created: float  # time.time() when it was stored


class SnapshotStore:
    """The latest snapshot per key, one JSON file each, replaced atomically.

    ``fsync=False`` skips the two fsyncs of :func:`common.storage.atomic_write` (for tests and
    benchmarks on throw-away data; a crash may then lose the newest snapshot, never corrupt it).
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.fsync = fsync

    def path_for(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(
                f"snapshot key must be 1-128 letters, digits, '_', '.' or '-' "
                f"(not starting with a dot), got {key!r}"
            )
        return self.directory / f"{key}.snapshot.json"

    def save(
        self,
        key: str,
        state: dict[str, Any],
        position: LogPosition,
        event_id: str,
        *,
        version: int = 1,
    ) -> Snapshot:
        """Store ``state`` as covering the log up to ``position`` (the line of ``event_id``)."""
        path = self.path_for(key)
        snapshot = Snapshot(key, state, LogPosition(*position), event_id, version, time.time())
        record = {
            "format": _FORMAT,
            "key": key,
            "version": version,
            "position": {"offset": snapshot.position.offset, "line": snapshot.position.line},
            "event_id": event_id,
            "created": snapshot.created,
            "state": state,
        }
        atomic_write(path, dumps(record), fsync=self.fsync)
        return snapshot

    def load(self, key: str) -> Snapshot | None:
        """The stored snapshot for ``key``, None if there is none or it cannot be read."""
        path = self.path_for(key)
        try:
            record = loads(path.read_bytes())
            position = record["position"]
            if record["format"] != _FORMAT or not isinstance(record["state"], dict):
                raise ValueError(f"unknown snapshot format {record['format']!r}")
            return Snapshot(
                key=record["key"],
                state=record["state"],
                position=LogPosition(int(position["offset"]), int(position["line"])),
                event_id=str(record["event_id"]),
                version=int(record["version"]),
                created=float(record["created"]),
            )
        except FileNotFoundError:
            return None
        except (InvalidEventError, KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring unreadable snapshot %s: %s", path, exc)
            return None

    def load_valid(
        self, key: str, log_path: str | os.PathLike[str], version: int
    ) -> Snapshot | None:
        """The snapshot for ``key`` if it can be trusted for ``log_path``, else None.

        Trusted means: written for this ``version`` of the state, and the line that ends at
        its position in the log is still the event it recorded.
        """
        snapshot = self.load(key)
        if snapshot is None:
            return None
        if snapshot.version != version:
            log.warning(
                "ignoring snapshot %r: written for state version %d, the projection is at %d",
                key,
                snapshot.version,
                version,
            )
            return None
        found = _event_id_before(Path(log_path), snapshot.position.offset)
        if found != snapshot.event_id:
            log.warning(
                "ignoring snapshot %r: %s no longer holds event %s at byte %d (found %s); "
                "the log was truncated or replaced",
                key,
                log_path,
                snapshot.event_id,
                snapshot.position.offset,
                found,
            )
            return None
        return snapshot

    def delete(self, key: str) -> bool:
        """Remove the snapshot for ``key``; False if there was none."""
        try:
            self.path_for(key).unlink()
        except FileNotFoundError:
            return False
        return True


def _event_id_before(path: Path, offset: int, block: int = 1 << 16) -> str | None:
    """The id of the event on the line that ends at byte ``offset`` of ``path``, if any."""
    if offset <= 0:
        return None
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if offset > size:
        return None
    with open(path, "rb") as fh:
        start, tail = offset, b""
        while start > 0:  # read backwards until the newline that opens the line
            start = max(0, start - block)
            fh.seek(start)
            tail = fh.read(offset - start)
            if tail[-1:] != b"\n":
                return None  # the offset is not at a line boundary
            if tail.rfind(b"\n", 0, len(tail) - 1) >= 0:
                break
    line = tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1 : -1]
    try:
        event_id = loads(line).get("id")
    except (InvalidEventError, AttributeError):
        return None
    return event_id if isinstance(event_id, str) else None


class _Snapshotter:
    """A listener that stores a snapshot every ``every`` replayed events."""

    def __init__(
        self,
        bus: ReplayableEventBus,
        projection: Snapshottable,
        store: SnapshotStore,
        key: str,
        every: int,
    ) -> None:
        self.bus = bus
        self.projection = projection
        self.store = store
        self.key = key
        self.every = every
        self.since_last = 0
        self.saved: list[Snapshot] = []

    def __call__(self, event: Event) -> None:
        position = self.bus.replay_position
        if position is None:  # a live event: its position in the log is unknown here
            return
        self.since_last += 1
        if self.since_last >= self.every:
            self.since_last = 0
            state = self.projection.snapshot_state()
            version = self.projection.snapshot_version
            self.saved.append(self.store.save(self.key, state, position, event.id, version=version))


@dataclass
class RebuildResult:
    """What :func:`rebuild` did."""

    snapshot: Snapshot | None  # the snapshot it started from, if any
    replayed: int  # events replayed after it
    position: LogPosition  # where the replay stopped
    saved: list[Snapshot] = field(default_factory=list)  # snapshots stored on the way


def rebuild(
    bus: ReplayableEventBus,
    projection: Snapshottable,
    *,
    store: SnapshotStore | None = None,
    key: str = "projection",
    path: str | os.PathLike[str] | None = None,
    pattern: str = "#",
    snapshot_every: int = 0,
) -> RebuildResult:
    """Bring a fresh ``projection`` up to date: latest snapshot, then replay what follows.

    ``projection.apply`` must already be subscribed to ``bus`` (for ``pattern``); ``rebuild``
    restores the snapshot into it, if ``store`` holds one that is valid for the log, and
    replays the lines after the snapshot's position. With ``snapshot_every=N`` (and a store)
    a new snapshot is stored after every N replayed events. ``path`` defaults to the bus's log.
    """
    if snapshot_every < 0:
        raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
    if snapshot_every and store is None:
        raise ValueError("snapshot_every needs a store")
    log_path = bus._source(path)
    snapshot = None
    if store is not None:
        snapshot = store.load_valid(key, log_path, projection.snapshot_version)
    if snapshot is not None:
        projection.restore(snapshot.state)
    snapshotter = None
    subscription = None
    if snapshot_every and store is not None:
        snapshotter = _Snapshotter(bus, projection, store, key, snapshot_every)
        subscription = bus.subscribe(pattern, snapshotter)  # after the projection: sees its state
    try:
        replayed = bus.replay_from_file(
            log_path, pattern=pattern, start=snapshot.position if snapshot else None
        )
    finally:
        if subscription is not None:
            subscription.cancel()
    stats = bus.replay_stats
    assert stats is not None
    saved = snapshotter.saved if snapshotter is not None else []
    return RebuildResult(snapshot, replayed, stats.position, saved)
