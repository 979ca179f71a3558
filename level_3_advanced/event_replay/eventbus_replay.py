"""ReplayableEventBus: a write-ahead event log, and replay of it to the current subscribers.

Level 1's :class:`~level_1_basic.eventbus.EventBus` already appends every emitted event to a
JSON-lines file before its listeners run (the ``_sink`` hook of the base bus, through
:class:`common.storage.AppendLog`: ``O_APPEND`` plus ``flock``, so writers in several threads
and processes never interleave). This level reads that file back:

* :meth:`ReplayableEventBus.replay_from_file` re-dispatches the logged events, in file order,
  to the subscribers the bus has *now*, through the bus's own delivery path (so ordering, error
  isolation and re-entrancy are the same as for a live emit) and without calling the sink: a
  replay never writes the log. This is how an event-sourced system rebuilds state "without a
  database", and how Kafka consumers re-read a topic.
* ``bus.replaying`` is true in the replaying thread while a replay runs, so a listener with a
  side effect (an email, a payment, emitting a new event) can skip history.
* Upcasting: an event written with an older schema ``version`` is upgraded, one version at a
  time, by the functions registered with :meth:`ReplayableEventBus.register_upcaster`.

Failure semantics of a replay (``bus.replay_stats`` holds the numbers of the latest one):

* a corrupt line (not JSON, or JSON that is not a valid event) is skipped, counted, and logged
  with its line number; the replay goes on;
* a torn last line (a writer was killed in the middle of a write) is never replayed. A *reader*
  leaves the file alone, reports the torn bytes (``torn_tail_bytes``) and stops just before
  them: the writer may still be alive and finishing that very line. A *writer* that opens the
  log (``ReplayableEventBus(path)``) cuts the torn tail first, under the log's lock, because
  the emit that wrote it never returned, so it was never acknowledged; the cut is reported in
  ``bus.repaired_bytes`` and in the stats of the bus's first replay of its own log;
* an event that no registered upcaster can bring to the current version raises
  :class:`UpcastError` naming the line: that is a bug in the code, not in the data, and
  skipping it would silently give the wrong state;
* a missing file raises ``FileNotFoundError``.

A replay reads the log as it stood when the call began: lines appended meanwhile (by other
writers, or by listeners that emit) are left for the next replay, so a replay always ends.
It streams: memory does not grow with the size of the file.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from threading import get_ident
from typing import Any, NamedTuple

from common.base_eventbus import Subscription
from common.events import Event, InvalidEventError
from common.logger import get_logger
from common.patterns import matches, validate_name, validate_pattern
from common.storage import LineReader
from level_1_basic.eventbus import EventBus

__all__ = [
    "LogPosition",
    "ReplayError",
    "ReplayStats",
    "ReplayableEventBus",
    "UpcastError",
    "Upcaster",
]

log = get_logger(__name__)

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_WARN_LINES = 100  # corrupt lines logged one by one (and listed in the stats); then a summary


class ReplayError(Exception):
    """A replay that cannot go on (the base of this package's errors)."""


class UpcastError(ReplayError):
    """An event of an old schema version that no registered upcaster can upgrade."""


class LogPosition(NamedTuple):
    """A place in a log: ``offset`` is the byte just past line number ``line``.

    ``LogPosition(0, 0)`` is the start. A replay that starts at a position reads line
    ``line + 1`` next, which is what a snapshot stores ("next to read", as a Kafka offset).
    """

    offset: int
    line: int


@dataclass(slots=True)
class ReplayStats:
    """What one replay did; ``bus.replay_stats`` keeps the latest."""

    path: Path
    start: LogPosition
    position: LogPosition  # where the replay stopped: resume here
    lines: int = 0  # complete lines read
    replayed: int = 0  # events dispatched (what replay_from_file returns)
    filtered: int = 0  # valid events left out by pattern / since / until
    upcasted: int = 0
    corrupt: int = 0
    corrupt_lines: list[int] = field(default_factory=list)  # the first 100 of them
    torn_tail_bytes: int = 0  # an incomplete last line this replay found and left alone
    repaired_bytes: int = 0  # a torn tail this bus cut when it opened its own log
    listener_failures: int = 0
    # The line being dispatched, for listeners that need it (snapshots): see replay_position.
    current_offset: int = 0
    current_line: int = 0


class ReplayableEventBus(EventBus):
    """A synchronous bus with a durable write-ahead log that it can replay.

    ``log_path``: the JSON-lines log every emitted event is appended to *before* its listeners
    run, so an event whose listener crashes the process is already in the log. ``None`` makes
    a bus that only replays logs written elsewhere. ``durability``: ``"flush"`` (default; one
    ``write()`` per event, survives the process dying), ``"fsync"`` (survives a power cut) or
    ``"none"`` (buffered in memory: fastest, but events buffered when the process dies are
    lost, so the write-ahead promise holds only for the two others).
    """

    def __init__(
        self,
        log_path: str | os.PathLike[str] | None,
        *,
        durability: str = "flush",
        history_limit: int | None = 10_000,
        error_limit: int = 1_000,
    ) -> None:
        super().__init__(
            log_path, durability=durability, history_limit=history_limit, error_limit=error_limit
        )
        # A torn tail cut by AppendLog on open: reported once, by the first replay of this log.
        self.repaired_bytes = self._file.repaired_bytes if self._file is not None else 0
        self._repair_unreported = self.repaired_bytes
        self._upcasters: dict[str, dict[int, Upcaster]] = {}
        self._schema: dict[str, int] = {}  # name -> current version (upcasters lead there)
        self._replays: dict[int, ReplayStats] = {}  # thread id -> the replay it is running
        self.replay_stats: ReplayStats | None = None

    # -- replay state -----------------------------------------------------------------------
    @property
    def replaying(self) -> bool:
        """True in a thread that is running :meth:`replay_from_file` (only in that thread).

        Listeners with side effects check it. A live emit from another thread during a replay
        sees False; an event a listener emits during the replay is delivered in the replaying
        thread and sees True, which is right: a listener that emits is itself a side effect.
        """
        return get_ident() in self._replays

    @property
    def replay_position(self) -> LogPosition | None:
        """While replaying, the position just past the line being dispatched; else None.

        A listener that stores a snapshot records it, so a later replay starts right after.
        """
        stats = self._replays.get(get_ident())
        if stats is None:
            return None
        return LogPosition(stats.current_offset, stats.current_line)

    # -- upcasting --------------------------------------------------------------------------
    def register_upcaster(self, name: str, from_version: int, fn: Upcaster) -> None:
        """Upgrade the ``data`` of ``name`` events from ``from_version`` to ``from_version + 1``.

        ``fn`` receives a shallow copy of the old data (it may change it) and returns the new
        data. Register one per step (1->2, 2->3); the highest step sets the current version of
        that event, and a replay upgrades older events step by step before dispatching them.
        Registering the same step twice is an error.
        """
        validate_name(name)
        if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
            raise ValueError(f"from_version must be a positive integer, got {from_version!r}")
        if not callable(fn):
            raise TypeError(f"upcaster must be callable, got {type(fn).__name__}")
        steps = self._upcasters.setdefault(name, {})
        if from_version in steps:
            raise ValueError(f"an upcaster for {name} v{from_version} is already registered")
        steps[from_version] = fn
        self._schema[name] = max(self._schema.get(name, 1), from_version + 1)

    def schema_version(self, name: str) -> int:
        """The current version of ``name`` events: 1 unless upcasters lead further."""
        return self._schema.get(name, 1)

    def upcast(self, event: Event) -> Event:
        """``event`` brought to the current schema version (itself when already current).

        Raises UpcastError when a step is missing or an upcaster fails or returns no dict.
        An event *newer* than every upcaster is returned as it is (written by newer code).
        """
        target = self._schema.get(event.name, 1)
        steps = self._upcasters.get(event.name, {})
        while event.version < target:
            version = event.version
            fn = steps.get(version)
            if fn is None:
                raise UpcastError(
                    f"{event.name} v{version} [{event.id}] cannot be upgraded: no upcaster "
                    f"registered from v{version} (current schema is v{target})"
                )
            try:
                data = fn(dict(event.data))
            except Exception as exc:
                raise UpcastError(
                    f"upcaster {event.name} v{version}->v{version + 1} failed on "
                    f"[{event.id}]: {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(data, dict):
                raise UpcastError(
                    f"upcaster {event.name} v{version}->v{version + 1} returned "
                    f"{type(data).__name__}, not a dict"
                )
            event = event.replace(data=data, version=version + 1)
        return event

    # -- replay -----------------------------------------------------------------------------
    def replay_from_file(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        pattern: str = "#",
        since: datetime | None = None,
        until: datetime | None = None,
        start: LogPosition | None = None,
    ) -> int:
        """Re-dispatch the events of a log, in file order, to the current subscribers.

        ``path`` defaults to the bus's own log. Only events whose name matches ``pattern`` and
        whose timestamp lies in ``since <= timestamp <= until`` (aware datetimes; either may be
        omitted) are dispatched; the filters apply event by event, because events from several
        processes need not be in timestamp order. ``start`` (a :class:`LogPosition`, e.g. from
        a snapshot) skips what precedes it. Nothing is appended to the log and ``event_log`` is
        left alone. Returns the number of events dispatched; ``replay_stats`` has the details
        (of the latest replay of this bus, whichever thread ran it). See the module docstring
        for corrupt lines, torn tails and upcasting errors.
        """
        source = self._source(path)
        validate_pattern(pattern)
        since_ns = _as_ns(since, "since")
        until_ns = _as_ns(until, "until")
        if since_ns is not None and until_ns is not None and since_ns > until_ns:
            raise ValueError(f"since ({since}) is later than until ({until})")
        tid = get_ident()
        if tid in self._busy:
            raise RuntimeError(
                "replay_from_file cannot run inside a listener: the replayed events would "
                "queue up behind the current one; start the replay outside the dispatch"
            )
        if self._file is not None:
            self._file.flush()  # durability "none": what this bus emitted must be readable
        start = LogPosition(0, 0) if start is None else LogPosition(*start)
        reader = LineReader(source, offset=start.offset, first_line=start.line + 1)
        end = os.path.getsize(source)  # replay the log as it stands now
        _check_start(source, start, end)

        stats = ReplayStats(path=source, start=start, position=start)
        if self._repair_unreported and _same_file(source, self.log_path):
            stats.repaired_bytes, self._repair_unreported = self._repair_unreported, 0
        self._replays[tid] = stats
        batches = reader.batches()
        try:
            with self._delivering() as (deliver, pending):
                self._replay_lines(
                    batches, reader, stats, end, pattern, since_ns, until_ns, deliver, pending
                )
        finally:
            batches.close()  # closes the file now, also when a listener or upcaster raised
            del self._replays[tid]
            self.replay_stats = stats
            _report(stats)
        return stats.replayed

    def _replay_lines(
        self,
        batches: Iterator[list[bytes]],
        reader: LineReader,
        stats: ReplayStats,
        end: int,
        pattern: str,
        since_ns: int | None,
        until_ns: int | None,
        deliver: Callable[..., object],
        pending: deque[tuple[Event, tuple[Subscription, ...]]],
    ) -> None:
        # The hot loop: everything it needs is a local, and the lines come a block at a time
        # (a list loop, not a generator step per line). Per line it parses and validates (the
        # one validation, Event.from_json), filters, upcasts when needed and delivers.
        from_json = Event.from_json
        schema = self._schema
        wanted = _name_filter(pattern)
        filtering = wanted is not None or since_ns is not None or until_ns is not None
        offset, number = stats.start
        replayed = filtered = upcasted = 0
        try:
            for batch in batches:
                for line in batch:
                    offset += len(line) + 1
                    if offset > end:  # a line completed after the replay began
                        offset -= len(line) + 1
                        return  # left for the next replay
                    number += 1
                    try:
                        event = from_json(line)
                    except InvalidEventError as exc:
                        stats.corrupt += 1
                        if stats.corrupt <= _WARN_LINES:
                            stats.corrupt_lines.append(number)
                            log.warning(
                                "%s line %d: skipped a corrupt event: %s", stats.path, number, exc
                            )
                        continue
                    name = event.name
                    if filtering and (
                        (wanted is not None and not wanted(name))
                        or (since_ns is not None and event.timestamp_ns < since_ns)
                        or (until_ns is not None and event.timestamp_ns > until_ns)
                    ):
                        filtered += 1
                        continue
                    if schema and event.version < schema.get(name, 1):
                        try:
                            event = self.upcast(event)
                        except UpcastError as exc:
                            message = f"{stats.path} line {number}: {exc}"
                            number -= 1  # stop before the line that could not be upgraded
                            offset -= len(line) + 1
                            raise UpcastError(message) from exc
                        upcasted += 1
                    subs = self._matches.get(name)
                    if subs is None:
                        subs = self._match(name)
                    stats.current_offset = offset
                    stats.current_line = number
                    replayed += 1
                    deliver(event, subs)
                    while pending:  # what the listeners emitted, breadth first
                        deliver(*pending.popleft())
            if reader.torn_tail is not None:
                stats.torn_tail_bytes = len(reader.torn_tail)
        finally:
            stats.position = LogPosition(offset, number)
            stats.lines = number - stats.start.line
            stats.replayed = replayed
            stats.filtered = filtered
            stats.upcasted = upcasted

    def _source(self, path: str | os.PathLike[str] | None) -> Path:
        if path is not None:
            return Path(path)
        if self.log_path is None:
            raise ValueError("no path given, and this bus has no log of its own (log_path=None)")
        return self.log_path

    def _listener_failed(self, event: Event, sub: Subscription, exc: Exception) -> None:
        stats = self._replays.get(get_ident())
        if stats is not None:
            stats.listener_failures += 1
        super()._listener_failed(event, sub, exc)

    def __enter__(self) -> ReplayableEventBus:
        return self


def _as_ns(moment: datetime | None, label: str) -> int | None:
    """An aware datetime as nanoseconds since the epoch, at the wire's microsecond precision."""
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        raise TypeError(f"{label} must be a datetime, got {type(moment).__name__}")
    if moment.tzinfo is None:
        raise ValueError(
            f"{label} must be timezone-aware (a naive datetime could be local time or UTC); "
            "use e.g. datetime.now(timezone.utc) or event.timestamp"
        )
    return ((moment - _EPOCH) // timedelta(microseconds=1)) * 1000


def _name_filter(pattern: str) -> Callable[[str], bool] | None:
    """A cached ``matches(pattern, name)``; None when the pattern lets everything through."""
    if pattern == "#":
        return None
    seen: dict[str, bool] = {}

    def wanted(name: str) -> bool:
        result = seen.get(name)
        if result is None:
            result = seen[name] = matches(pattern, name)
        return result

    return wanted


def _check_start(path: Path, start: LogPosition, end: int) -> None:
    if start.offset < 0 or start.line < 0:
        raise ValueError(f"start position must not be negative, got {start}")
    if start.offset > end:
        raise ValueError(
            f"start offset {start.offset} is past the end of {path} ({end} bytes): "
            "the log was truncated or replaced since that position was taken"
        )
    if start.offset > 0:
        with open(path, "rb") as fh:
            fh.seek(start.offset - 1)
            if fh.read(1) != b"\n":
                raise ValueError(f"start offset {start.offset} is not at a line boundary in {path}")


def _same_file(a: Path, b: Path | None) -> bool:
    return b is not None and a.resolve() == b.resolve()


def _report(stats: ReplayStats) -> None:
    if stats.corrupt > _WARN_LINES:
        log.warning(
            "%s: %d corrupt lines skipped in all (only the first %d were logged one by one)",
            stats.path,
            stats.corrupt,
            _WARN_LINES,
        )
    if stats.torn_tail_bytes:
        log.warning(
            "%s: ignored an incomplete last line of %d bytes after line %d (a writer died "
            "mid-write, or is writing it now); the file is left as it is",
            stats.path,
            stats.torn_tail_bytes,
            stats.position.line,
        )
    if stats.repaired_bytes:
        log.warning(
            "%s: a torn last line of %d bytes was cut when this bus opened the log",
            stats.path,
            stats.repaired_bytes,
        )
