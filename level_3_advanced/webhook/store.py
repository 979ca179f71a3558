"""The webhook's durable record: what was accepted, what was handled, and group commit.

Two append-only files in the data directory, both in the one wire format of
:class:`common.events.Event` (one JSON object per line), both written through
:class:`common.storage.AppendLog`:

* ``accepted.log`` — every accepted order event. A request is answered 202 only after its line
  is written AND fsync'd. One fsync covers every request that arrived while the previous fsync
  ran (group commit, leader/follower: the first waiting request thread writes and fsyncs the
  whole batch, the others wait for it), so durability costs one fsync per batch, not one per
  request.
* ``handled.log`` — one ``webhook.handled`` event per handled order event, holding the order
  event's id, whether a listener failed, and the *effects* the listeners decided on (the email
  to send, the analytics count). The marker and the effects are ONE line written with ONE
  ``write()``: they exist together or not at all.

Why this gives exactly-once handling across ``kill -9`` at any point:

* killed before the accepted line is fsync'd: the client got no 202 (it retries, with the same
  ``webhook-id``); a line that did reach the file is recovered and the retry is a duplicate;
* killed after the 202 but before the handled line is written: the event is in
  ``accepted.log`` and not in ``handled.log``, so the next start hands it to the bus again.
  The listeners' effects of the first try only lived in memory, so they died with it;
* killed after the handled line is written: the event is never handled again, and its effects
  are on disk exactly once.

A line torn by a crash (no newline) is cut on open by AppendLog: it was never acknowledged.
State derived from the effects (emails in the outbox, counts) is rebuilt from ``handled.log``
on start, never recomputed by handling events twice. One process owns a data directory at a
time (``webhook.lock``, an ``flock`` the kernel releases when the process dies).

The idempotency index (``webhook-id`` / ``Idempotency-Key`` -> event id) is rebuilt from
``accepted.log`` on start, so a retry after a restart is still recognised.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.events import Event, InvalidEventError
from common.logger import get_logger
from common.storage import AppendLog, LineReader, OwnerLock, OwnerLockBusy, fsync_dir

__all__ = [
    "SYNC_MODES",
    "Accepted",
    "HandledRecord",
    "IdempotencyConflict",
    "StorageError",
    "WebhookStore",
]

log = get_logger(__name__)

SYNC_MODES = ("group", "each", "none")
HANDLED_EVENT = "webhook.handled"
KEY_FIELD = "idempotency_key"
HANDLED_BATCH = 512  # handled lines that are written at once without waiting longer
HANDLED_DELAY = 0.02  # seconds the flusher lets handled lines gather before one write
_DUPLICATE_WAIT = 30.0  # seconds a repeated key waits for its original's fsync


class StorageError(RuntimeError):
    """The record cannot be written (or read back); nothing was acknowledged."""


class IdempotencyConflict(ValueError):
    """An idempotency key was reused with a different payload."""


@dataclass(frozen=True)
class Accepted:
    """What :meth:`WebhookStore.accept` decided: the event id, and whether it is new."""

    event_id: str
    created: bool


@dataclass(frozen=True)
class HandledRecord:
    """One line of handled.log: the outcome of handling one accepted event."""

    event_id: str
    name: str
    failed: bool
    effects: tuple[dict[str, Any], ...]
    error: str | None

    @classmethod
    def from_event(cls, event: Event) -> HandledRecord:
        data = event.data
        effects = data.get("effects") or ()
        if not isinstance(data.get("event_id"), str) or not isinstance(effects, list):
            raise InvalidEventError("a webhook.handled record needs 'event_id' and 'effects'")
        return cls(
            event_id=data["event_id"],
            name=str(data.get("event", "")),
            failed=bool(data.get("failed", False)),
            effects=tuple(effects),
            error=data.get("error"),
        )


_IN_FLIGHT, _DURABLE, _FAILED, _LEAD = range(4)


class _KeyEntry:
    """One idempotency key: the event id, a fingerprint of the payload, and its state."""

    __slots__ = ("event_id", "fingerprint", "state")

    def __init__(self, event_id: str, fingerprint: int, state: int) -> None:
        self.event_id = event_id
        self.fingerprint = fingerprint
        self.state = state  # _IN_FLIGHT until its commit ends, then _DURABLE or _FAILED


class _Ticket:
    """One request waiting in a group commit. Its lock starts locked: the waiter blocks on
    it until a leader releases it with a verdict (durable, failed, or "lead the next batch").
    One lock per waiter, so a commit wakes exactly the requests it covered."""

    __slots__ = ("event", "line", "lock", "state")

    def __init__(self, line: bytes, event: Event) -> None:
        self.line = line
        self.event = event
        self.state = _IN_FLIGHT
        self.lock = threading.Lock()
        self.lock.acquire()


def fingerprint(data: dict[str, Any]) -> int:
    """A process-local hash of an event's payload without its idempotency key."""
    return hash(tuple(sorted((k, repr(v)) for k, v in data.items() if k != KEY_FIELD)))


def _handled_line(
    event: Event, failed: bool, effects: Iterable[dict[str, Any]], error: str | None
) -> bytes:
    record = Event(  # the name is a constant and the fields are built here: no validation
        HANDLED_EVENT,
        {
            "event_id": event.id,
            "event": event.name,
            "failed": failed,
            "effects": list(effects),
            "error": error,
        },
        correlation_id=event.correlation_id,
    )
    return record.to_json_bytes()


class WebhookStore:
    """accepted.log + handled.log in ``data_dir``; see the module docstring for the design.

    ``sync`` is ``"group"`` (fsync per batch, the default), ``"each"`` (an fsync per request,
    serialised: the naive way, kept to measure against) or ``"none"`` (written, not fsync'd:
    survives the process dying but not a power cut). ``on_durable(events)`` is called, in
    accept order, with the events whose lines are durable (the server hands them to its bus);
    ``on_records(records)`` with handled records once their lines are written (the server
    applies their effects then). ``open()`` starts one thread, the handled-log flusher.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        sync: str = "group",
        idempotency_limit: int = 1_000_000,
        on_durable: Callable[[list[Event]], None] | None = None,
        on_records: Callable[[list[HandledRecord]], None] | None = None,
    ) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        if idempotency_limit < 1:
            raise ValueError("idempotency_limit must be at least 1")
        self.data_dir = Path(data_dir)
        self.sync_mode = sync
        self.idempotency_limit = idempotency_limit
        self.on_durable = on_durable
        self.accepted_path = self.data_dir / "accepted.log"
        self.handled_path = self.data_dir / "handled.log"
        self.lock_path = self.data_dir / "webhook.lock"
        self._accepted: AppendLog | None = None
        self._handled: AppendLog | None = None
        self._owner = OwnerLock(self.lock_path)
        # Group commit: requests waiting for the next batch, and whether a leader is at work.
        self._mutex = threading.Lock()
        self._pending: list[_Ticket] = []
        self._leader = False
        self._broken: BaseException | None = None  # accepted.log failed: refuse everything
        self._handled_broken: BaseException | None = None
        self._each_lock = threading.Lock()
        # Idempotency keys, oldest first; and accepted events not yet handled.
        self._keys: OrderedDict[str, _KeyEntry] = OrderedDict()
        self._keys_lock = threading.Lock()
        self._keys_cond = threading.Condition()  # repeated keys waiting for their original
        self._keys_waiters = 0
        self._unhandled: dict[str, Event] = {}
        self.on_records = on_records
        self._handled_lock = threading.Lock()
        self._handled_buffer: list[tuple[bytes, HandledRecord]] = []
        self._flush_wanted = threading.Event()
        self._stopping = threading.Event()
        self._flusher: threading.Thread | None = None
        self.batches = 0  # commits done (group mode: fsyncs of accepted.log)
        self.batched = 0  # lines they covered

    # -- life cycle -------------------------------------------------------------------------
    def open(self) -> tuple[list[Event], list[HandledRecord]]:
        """Lock the directory, repair torn tails, and recover.

        Returns the events accepted but not handled (in accept order) and every handled
        record (to rebuild derived state). Raises StorageError if another live process owns
        the directory or a file holds a line that is not a valid record.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            created = not self.accepted_path.exists() or not self.handled_path.exists()
            self._accepted = AppendLog(self.accepted_path, durability="flush")
            self._handled = AppendLog(self.handled_path, durability="flush")
            if created:
                fsync_dir(self.data_dir)  # the new files' names survive a power cut
            handled = list(self._read_handled())
            done = {record.event_id for record in handled}
            pending: list[Event] = []
            for event in self._read(self.accepted_path):
                key = event.data.get(KEY_FIELD)
                if isinstance(key, str):
                    self._remember(key, _KeyEntry(event.id, fingerprint(event.data), _DURABLE))
                if event.id not in done:
                    pending.append(event)
                    self._unhandled[event.id] = event
        except BaseException:
            self.close()
            raise
        self._stopping.clear()
        self._flusher = threading.Thread(
            target=self._flush_loop, name=f"webhook-flusher-{self.data_dir.name}", daemon=True
        )
        self._flusher.start()
        if pending:
            log.info(
                "recovered %d accepted event(s) not yet handled from %s",
                len(pending),
                self.accepted_path,
            )
        return pending, handled

    def _take_lock(self) -> None:
        try:
            self._owner.acquire()
        except OwnerLockBusy as exc:
            raise StorageError(
                f"{self.data_dir} is in use by another webhook server, pid {exc.holder} "
                "(one process per data directory)"
            ) from None

    def close(self) -> None:
        """Write what waits in memory, close the files, release the directory (idempotent)."""
        flusher = self._flusher
        if flusher is not None:
            self._stopping.set()
            self._flush_wanted.set()
            flusher.join(10.0)
            self._flusher = None
        if self._handled is not None:
            self._flush_and_report()
        for attr in ("_accepted", "_handled"):
            file = getattr(self, attr)
            if file is not None:
                with contextlib.suppress(OSError):
                    file.close()
                setattr(self, attr, None)
        self._owner.release()

    @property
    def closed(self) -> bool:
        return self._accepted is None

    @property
    def broken(self) -> BaseException | None:
        """The write error that stopped the store, if one did (the server answers 503)."""
        return self._broken or self._handled_broken

    def _read(self, path: Path) -> Iterator[Event]:
        reader = LineReader(path)
        for number, line in reader:
            try:
                yield Event.from_json(line)
            except InvalidEventError as exc:
                raise StorageError(f"{path}:{number}: not a valid record: {exc}") from None

    def _read_handled(self) -> Iterator[HandledRecord]:
        seen: set[str] = set()
        for event in self._read(self.handled_path):
            if event.name != HANDLED_EVENT:
                continue
            try:
                record = HandledRecord.from_event(event)
            except InvalidEventError as exc:
                raise StorageError(f"{self.handled_path}: {exc}") from None
            if record.event_id in seen:  # cannot happen with one owner; tolerate it anyway
                log.warning("event %s is marked handled twice; keeping the first", record.event_id)
                continue
            seen.add(record.event_id)
            yield record

    # -- accepting --------------------------------------------------------------------------
    def accept(self, event: Event) -> Accepted:
        """Make ``event`` durable, or find the original of a repeated idempotency key.

        Returns once the line is fsync'd (per ``sync``). A key seen before returns the
        original event id with ``created=False`` (after the original is durable); a key seen
        with a different payload raises IdempotencyConflict. A write failure raises
        StorageError, and so does every later call (the file's state is unknown).
        """
        if self._accepted is None:
            raise StorageError("the store is not open")
        if self._broken is not None:
            raise StorageError(f"storage failed earlier: {self._broken}")
        raw_key = event.data.get(KEY_FIELD)
        key = raw_key if isinstance(raw_key, str) else None
        entry: _KeyEntry | None = None
        if key is not None:
            fp = fingerprint(event.data)
            with self._keys_lock:
                existing = self._keys.get(key)
                if existing is None:
                    entry = _KeyEntry(event.id, fp, _IN_FLIGHT)
                    self._remember(key, entry)
            if existing is not None:
                return self._duplicate(key, existing, fp)
        line = event.to_json_bytes()
        try:
            if self.sync_mode == "group":
                self._group_commit(line, event)
            else:
                self._commit_alone(line, event)
        except BaseException:
            if entry is not None and key is not None:
                with self._keys_lock:
                    if self._keys.get(key) is entry:
                        del self._keys[key]
                self._settle_key(entry, _FAILED)
            raise
        if entry is not None:
            self._settle_key(entry, _DURABLE)
        return Accepted(event.id, True)

    def _settle_key(self, entry: _KeyEntry, state: int) -> None:
        entry.state = state
        if self._keys_waiters:  # rare: a retry arrived while its original was being written
            with self._keys_cond:
                self._keys_cond.notify_all()

    def _duplicate(self, key: str, entry: _KeyEntry, fp: int) -> Accepted:
        if entry.state == _IN_FLIGHT:  # the original is still being written: wait for it
            with self._keys_cond:
                self._keys_waiters += 1
                try:
                    settled = self._keys_cond.wait_for(
                        lambda: entry.state != _IN_FLIGHT, _DUPLICATE_WAIT
                    )
                finally:
                    self._keys_waiters -= 1
            if not settled:
                raise StorageError("the original request with this key is still being stored")
        if entry.state == _FAILED:
            raise StorageError("the original request with this key failed to be stored")
        if entry.fingerprint != fp:
            raise IdempotencyConflict(
                f"idempotency key {key!r} was already used with a different payload"
            )
        return Accepted(entry.event_id, False)

    def _remember(self, key: str, entry: _KeyEntry) -> None:
        keys = self._keys
        keys[key] = entry
        keys.move_to_end(key)
        while len(keys) > self.idempotency_limit:
            oldest_key, oldest = next(iter(keys.items()))
            if oldest.state == _IN_FLIGHT:
                break  # never forget a key whose commit is in flight
            del keys[oldest_key]

    def _commit_alone(self, line: bytes, event: Event) -> None:
        # "each" and "none": one write (and for "each" one fsync) per request, serialised.
        with self._each_lock:
            try:
                assert self._accepted is not None
                self._accepted.append(line)
                if self.sync_mode == "each":
                    self._accepted.sync()
            except (OSError, ValueError) as exc:
                self._broken = exc
                raise StorageError(f"cannot write {self.accepted_path}: {exc}") from exc
            self.batches += 1
            self.batched += 1
            self._unhandled[event.id] = event
            self._hand_over([event])

    def _group_commit(self, line: bytes, event: Event) -> None:
        ticket = _Ticket(line, event)
        with self._mutex:
            if self._broken is not None:
                raise StorageError(f"cannot write {self.accepted_path}: {self._broken}")
            self._pending.append(ticket)
            lead = not self._leader
            self._leader = True
        if not lead:
            ticket.lock.acquire()  # until a leader gives the verdict
            if ticket.state == _DURABLE:
                return
            if ticket.state == _FAILED:
                raise StorageError(f"cannot write {self.accepted_path}: {self._broken}")
        self._lead()  # our line is in the batch this takes
        if ticket.state != _DURABLE:
            raise StorageError(f"cannot write {self.accepted_path}: {self._broken}")

    def _lead(self) -> None:
        """Write and fsync everything pending as one batch, then pass the leadership on."""
        with self._mutex:
            batch = self._pending
            self._pending = []
        try:
            assert self._accepted is not None
            self._accepted.append_many([t.line for t in batch])
            self._accepted.sync()
        except BaseException as exc:
            with self._mutex:
                self._broken = exc
                batch += self._pending  # later requests fail too: the file's state is unknown
                self._pending = []
                self._leader = False
            for t in batch:
                t.state = _FAILED
                t.lock.release()
            return
        events = [t.event for t in batch]
        unhandled = self._unhandled
        for t in batch:
            unhandled[t.event.id] = t.event
            t.state = _DURABLE
            t.lock.release()  # each request of the batch answers now
        self.batches += 1
        self.batched += len(batch)
        # Still the leader: hand this batch over before the next batch can, to keep order.
        try:
            self._hand_over(events)
        finally:
            with self._mutex:
                following = self._pending[0] if self._pending else None
                if following is None:
                    self._leader = False
            if following is not None:
                following.state = _LEAD  # it stays pending; its _lead() takes the batch
                following.lock.release()

    def _hand_over(self, events: list[Event]) -> None:
        if self.on_durable is None:
            return
        try:
            self.on_durable(events)
        except Exception:  # the events are durable: a restart recovers them
            log.exception("handing %d durable event(s) over failed", len(events))

    # -- handling ---------------------------------------------------------------------------
    def mark_handled(
        self,
        event: Event,
        *,
        failed: bool = False,
        effects: list[dict[str, Any]] | tuple[dict[str, Any], ...] = (),
        error: str | None = None,
    ) -> None:
        """Record, in one line, that ``event`` was handled and what its effects are.

        The line waits in memory for at most ``HANDLED_DELAY`` seconds, then the flusher
        writes every waiting line with one ``write()`` and passes the records to
        ``on_records``: apply their effects only then. Batching is safe here: a line lost
        with the process takes its effects with it, and the event is handled again after the
        restart. If writing fails, those events stay unhandled on disk (handled again after
        a restart) and this raises StorageError from then on.
        """
        if self._handled_broken is not None:
            raise StorageError(f"{self.handled_path} failed earlier: {self._handled_broken}")
        try:
            line = _handled_line(event, failed, effects, error)
        except InvalidEventError as exc:  # a listener's effect is not JSON: settle, loudly
            log.error("effects of %s [%s] cannot be recorded: %s", event.name, event.id, exc)
            failed, effects, error = True, (), f"effects not recordable: {exc}"
            line = _handled_line(event, failed, effects, error)
        outcome = HandledRecord(event.id, event.name, failed, tuple(effects), error)
        with self._handled_lock:
            self._handled_buffer.append((line, outcome))
            waiting = len(self._handled_buffer)
        if waiting == 1 or waiting >= HANDLED_BATCH:
            self._flush_wanted.set()
        if self._flusher is None:  # not opened by open() (or closing): write at once
            self._flush_and_report()

    def _flush_loop(self) -> None:
        wanted, stopping = self._flush_wanted, self._stopping
        while not stopping.is_set():
            wanted.wait()
            if len(self._handled_buffer) < HANDLED_BATCH:
                stopping.wait(HANDLED_DELAY)  # let a batch gather (close() cuts this short)
            wanted.clear()  # before taking the buffer: a line added later sets it again
            self._flush_and_report()

    def _flush_and_report(self) -> None:
        try:
            records = self.flush_handled()
        except StorageError as exc:
            log.error("handled records lost (their events are handled again on restart): %s", exc)
            return
        if records and self.on_records is not None:
            try:
                self.on_records(records)
            except Exception:
                log.exception("on_records failed for %d record(s)", len(records))

    def flush_handled(self) -> list[HandledRecord]:
        """Write the handled lines waiting in memory now; returns their records."""
        with self._handled_lock:
            return self._flush_handled_locked()

    def _flush_handled_locked(self) -> list[HandledRecord]:
        buffer = self._handled_buffer
        if not buffer:
            return []
        self._handled_buffer = []
        handled = self._handled
        if handled is None:
            raise StorageError("the store is closed")
        if self._handled_broken is not None:
            raise StorageError(f"{self.handled_path} failed earlier: {self._handled_broken}")
        try:
            handled.append_many([line for line, _ in buffer])
        except (OSError, ValueError) as exc:
            # A failed write may have left part of a line. Writing more after it would glue
            # the next record to that fragment, so stop here: the restart cuts the fragment
            # (a torn tail) and handles these events again.
            self._handled_broken = exc
            raise StorageError(f"cannot write {self.handled_path}: {exc}") from exc
        records = [outcome for _, outcome in buffer]
        for outcome in records:
            self._unhandled.pop(outcome.event_id, None)
        return records

    # -- inspection -------------------------------------------------------------------------
    @property
    def unhandled(self) -> int:
        """Accepted events whose handled record is not written yet."""
        return len(self._unhandled)

    def keys_remembered(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return (
            f"<WebhookStore {self.data_dir} sync={self.sync_mode} "
            f"unhandled={self.unhandled} batches={self.batches}>"
        )
