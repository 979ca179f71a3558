"""Writing one partition: offsets, the per-partition lock, crash recovery, retention, compaction.

Every process that appends to a partition goes through :class:`PartitionWriter`. The rules:

* **One lock per partition, across processes.** An exclusive ``flock`` on
  ``partition-N/writer.state`` is held while an offset is chosen and its line written, so
  offsets are dense (0, 1, 2, ...) and unique, and lines never interleave, whatever the number
  of producer processes. A killed writer's lock is released by the kernel.
* **The end of the log is shared through the lock file.** ``writer.state`` is also mapped into
  memory (``mmap``) by every writer: the active segment's base offset, the next offset, the end
  position and a *dirty* flag. Under the lock a writer reads it instead of ``fstat``-ing the
  segment (that saves a system call per record). The dirty flag is raised before a write and
  lowered after the state is updated, so a writer killed in between leaves it raised and the
  next writer repairs the tail before appending. The state is a cache: every writer that opens
  the partition rebuilds it from the segments first (after a power cut it may be stale).
* **Recovery never cuts committed data.** From the last valid index entry, every line must be
  a record with the next offset. A torn or invalid *tail* (a writer died mid-write: nothing
  valid follows it) is truncated; an invalid line *followed by valid records* is corruption of
  committed data and raises :class:`CorruptLogError` without touching the file.

Why not ``common.storage.AppendLog``: its lock is taken inside each ``write()``, on the segment
file itself, so a caller cannot read the shared end offset, number the lines and add index
entries under the same lock; after a segment roll a writer that still holds the old file
would lock and append to the wrong file; and its tail repair only knows "no trailing
newline", not "a line whose offset is not the next one". The recovery scans do reuse
``common.storage.LineReader`` (through ``segment.iter_records``).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import queue
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.events import InvalidEventError
from common.logger import get_logger
from common.speedups import load
from common.storage import fsync_dir
from level_4_hard.file_kafka.errors import CorruptLogError, FileKafkaError, IllegalStateError
from level_4_hard.file_kafka.records import iso_to_ms
from level_4_hard.file_kafka.segment import (
    INDEX_ENTRY,
    create_segment,
    entry_valid,
    file_size,
    index_path,
    iter_records,
    last_complete_line,
    list_segments,
    log_path,
    parse_record_line,
    read_index,
    rebuild_index,
)
from level_4_hard.file_kafka.topic import TOPIC_FILE, TopicConfig

__all__ = [
    "C_APPEND",
    "DURABILITY_MODES",
    "STATE_FILE",
    "CompactionResult",
    "PartitionWriter",
    "log_bounds",
]

log = get_logger(__name__)

DURABILITY_MODES = ("none", "flush", "batch", "fsync")
STATE_FILE = "writer.state"
_MAGIC = 0x46494C454B41464B  # "FILEKAFK"
_STATE_BYTES = 64
MAGIC, DIRTY, BASE, NEXT, END, INDEXED = range(6)  # u64 slots of writer.state
_MAX_CHUNK = 4 << 20  # a batch is written in chunks of at most this many bytes
_flock = fcntl.flock
_LOCK_EX = fcntl.LOCK_EX
_LOCK_UN = fcntl.LOCK_UN
_write = os.write
_pack_entry = INDEX_ENTRY.pack
_LOCK_EX_NB = fcntl.LOCK_EX | fcntl.LOCK_NB
_SPINS = 20
_CONTENDED_RECORDS = 64  # after a renumbered line, guess from the shared state this long
_STATE = struct.Struct("8x5Q")  # slots 1..5 above, read under the lock with one call
# The same per-record append in C (_appender.c), or None: then the Python below runs alone.
_appender = load("level_4_hard.file_kafka._appender")
_c_append = None if _appender is None else _appender.append
C_APPEND = _c_append is not None


def _acquire(fd: int) -> None:
    """Take the partition lock; spin briefly before sleeping on it.

    Another writer holds it for about a microsecond (one ``write()``), usually while running
    on another core: retrying at once, then yielding the CPU, gets it back sooner than
    sleeping in ``flock`` (two context switches, and a wake-up that may wait for a free core).
    If the holder was preempted, or died mid-write, the blocking ``flock`` waits for it
    properly (the kernel releases a dead process's lock).
    """
    try:
        _flock(fd, _LOCK_EX_NB)
        return
    except BlockingIOError:
        pass
    for attempt in range(2 * _SPINS):
        if attempt >= _SPINS:
            os.sched_yield()
        try:
            _flock(fd, _LOCK_EX_NB)
            return
        except BlockingIOError:
            continue
    _flock(fd, _LOCK_EX)


@dataclass(frozen=True)
class CompactionResult:
    partition: int
    segments_cleaned: int
    records_removed: int
    records_kept: int


class PartitionWriter:
    """Appends records to one partition of a topic; safe across threads and processes.

    ``durability``: ``"none"`` buffers lines until :meth:`flush` (or ``batch_bytes``);
    ``"flush"`` writes each append to the OS before returning; ``"batch"`` also ``fsync``\\ s
    every ``fsync_interval`` records and on :meth:`flush`; ``"fsync"`` ``fsync``\\ s each append.
    """

    def __init__(
        self,
        pdir: Path,
        config: TopicConfig,
        partition: int,
        *,
        durability: str = "flush",
        fsync_interval: int = 1000,
        batch_bytes: int = 1 << 16,
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        if not pdir.is_dir():
            raise FileKafkaError(f"partition directory {pdir} is missing")
        self.pdir = pdir
        self.partition = partition
        self.config = config
        self.durability = durability
        self._interval = config.index_interval_bytes
        self._segment_bytes = config.segment_bytes
        self._fsync_each = durability == "fsync"
        self._fsync_every = max(1, fsync_interval) if durability == "batch" else 0
        self._syncing = durability in ("batch", "fsync")
        self._batch_bytes = batch_bytes
        self._unsynced = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        # The threads of this process take turns with a one-token queue: a mutex whose
        # uncontended get/put cost half of Lock.acquire/release (whose argument parsing
        # dominates), and whose get() blocks properly when another thread has the token.
        self._turn: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._turn.put(None)
        self._take_turn = self._turn.get
        self._give_turn = self._turn.put
        self._seg_fd: int | None = None
        self._idx_fd: int | None = None
        self._base = -1
        self._closed = False
        # The offset this writer expects its next record to get, or -1 while other processes
        # append too (then the shared state says it better): a hint, checked under the lock.
        self.next_offset = 0
        self._contended = 0
        self._lock_fd = os.open(pdir / STATE_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        self._mm: mmap.mmap | None = None
        try:
            with self._flocked():
                if os.fstat(self._lock_fd).st_size < _STATE_BYTES:
                    os.ftruncate(self._lock_fd, _STATE_BYTES)
                self._mm = mmap.mmap(self._lock_fd, _STATE_BYTES)
                self._st = memoryview(self._mm).cast("Q")
                self._recover(full=True)
        except BaseException:
            self._release()
            raise

    # -- the hot path ----------------------------------------------------------------------
    def append(self, body: bytes) -> int:
        """Write one record (its JSON object without the offset) and return its offset.

        ``body`` must start with ``{`` and not be ``{}``: the offset is put in front. With the
        C module (:data:`C_APPEND`) the offset is written in front of the body, under the
        lock, with one ``writev``; without it the line is built here and numbered with a guess
        that :meth:`append_line` corrects under the lock.
        """
        if _c_append is None:
            guess = self.guess_next_offset()
            return self.append_line(b'{"offset":%d,%b\n' % (guess, body[1:]), guess)
        self._take_turn()
        try:
            if self._closed:
                raise IllegalStateError(f"writer for {self.pdir} is closed")
            while True:
                offset = _c_append(
                    self._lock_fd,
                    self._seg_fd,
                    self._idx_fd,
                    self._mm,
                    body,
                    self._base,
                    self._interval,
                    self._segment_bytes,
                )
                if offset >= 0:
                    break
                # The lock is still held: the state needs Python (dirty, or another writer
                # rolled the segment; nothing was written, so resync and try again), or this
                # record filled the segment (-2 - offset: roll).
                try:
                    if offset == -1:
                        self._resync()
                    else:
                        offset = -2 - offset
                        self._roll(offset + 1)
                finally:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                if offset >= 0:
                    break
            if self._syncing:
                self._sync_after(1)
            return offset
        finally:
            self._give_turn(None)

    def append_line(
        self,
        line: bytes,
        guess: int,
        _flock: Any = fcntl.flock,
        _ex_nb: int = fcntl.LOCK_EX | fcntl.LOCK_NB,
        _un: int = fcntl.LOCK_UN,
        _write: Any = os.write,
        _unpack: Any = _STATE.unpack_from,
    ) -> int:
        """Write one complete record line numbered ``guess``; returns the offset it got.

        ``line`` is ``{"offset":<guess>,...}`` plus its newline, encoded before the lock is
        taken with the offset this writer expects next (:attr:`next_offset`): so a producer
        encodes each record once, with no copy to splice an offset in. If another writer
        appended meanwhile, the line is renumbered here, under the lock (offsets stay dense).
        This is the per-record hot path (the defaults bind globals as locals), so the state
        slots are used by number: 1 dirty, 2 active base, 3 next offset, 4 end position,
        5 last indexed position.
        """
        self._take_turn()  # cheaper than ``with``: this runs once per record
        try:
            if self._closed:
                raise IllegalStateError(f"writer for {self.pdir} is closed")
            lock_fd = self._lock_fd
            try:
                _flock(lock_fd, _ex_nb)
            except BlockingIOError:
                _acquire(lock_fd)
            end = -1
            try:
                dirty, base, offset, end, indexed = _unpack(self._mm)  # slots 1..5, one call
                if dirty or base != self._base:
                    end = -1
                    self._resync()
                    _, _, offset, end, indexed = _unpack(self._mm)
                if offset != guess:  # another writer appended since: renumber the line
                    line = b'{"offset":%d,%b' % (offset, line[line.index(b",") + 1 :])
                    self._contended = _CONTENDED_RECORDS
                size = len(line)
                st = self._st
                st[1] = 1
                written = _write(self._seg_fd, line)
                if written != size:
                    self._write_rest(line, written)
                if end - indexed >= self._interval:
                    _write(self._idx_fd, _pack_entry(offset - self._base, end))
                    st[5] = end
                end += size
                st[3] = offset + 1
                st[4] = end
                st[1] = 0
                if self._contended:  # others append too: the next guess reads the shared state
                    self._contended -= 1
                    self.next_offset = -1
                else:
                    self.next_offset = offset + 1
                if end >= self._segment_bytes:
                    self._roll(offset + 1)
            except OSError:
                self._undo_write(end)
                raise
            finally:
                _flock(lock_fd, _un)
            if self._syncing:
                self._sync_after(1)
            return offset
        finally:
            self._give_turn(None)

    def guess_next_offset(self) -> int:
        """The offset the next record will probably get (read without the lock: a hint)."""
        guess = self.next_offset
        if guess >= 0:
            return guess
        try:
            return self._st[NEXT]
        except ValueError:  # closed meanwhile (the state is unmapped): append says so
            return guess

    def _sync_after(self, records: int) -> None:
        """fsync per the durability mode, outside the partition lock (tlock held)."""
        if self._fsync_each:
            os.fsync(self._seg_fd)
            return
        self._unsynced += records
        if self._unsynced >= self._fsync_every:
            os.fsync(self._seg_fd)
            self._unsynced = 0

    def append_many(self, bodies: Sequence[bytes]) -> int:
        """Write several records with one ``write()`` per chunk; returns the first offset.

        The records get consecutive offsets: no other writer's record lands between them.
        """
        if not bodies:
            return -1
        with self._thread_turn():
            if self._closed:
                raise IllegalStateError(f"writer for {self.pdir} is closed")
            first = self._append_many_locked(bodies)
            if self._syncing:
                self._sync_after(len(bodies))
            return first

    def buffer(self, body: bytes) -> None:
        """Durability ``"none"``: keep the record in memory until the buffer fills or flush()."""
        self._take_turn()  # per record, like append_line
        try:
            if self._closed:
                raise IllegalStateError(f"writer for {self.pdir} is closed")
            self._buffer.append(body)
            self._buffered += len(body)
            if self._buffered >= self._batch_bytes:
                self._drain_locked()
        finally:
            self._give_turn(None)

    def _append_many_locked(self, bodies: Sequence[bytes]) -> int:
        lock_fd = self._lock_fd
        _acquire(lock_fd)
        try:
            st = self._st
            if st[DIRTY] or st[BASE] != self._base:
                self._resync()
            first = st[NEXT]
            i = 0
            while i < len(bodies):
                offset = st[NEXT]
                end = st[END]
                indexed = st[INDEXED]
                base = self._base
                parts: list[bytes] = []
                entries: list[bytes] = []
                size = 0
                limit = max(1, min(_MAX_CHUNK, self._segment_bytes - end))
                while i < len(bodies) and size < limit:  # a chunk never spans a roll
                    if end + size - indexed >= self._interval:
                        entries.append(INDEX_ENTRY.pack(offset - base, end + size))
                        indexed = end + size
                    line = b'{"offset":%d,%b\n' % (offset, bodies[i][1:])
                    parts.append(line)
                    size += len(line)
                    offset += 1
                    i += 1
                st[DIRTY] = 1
                chunk = b"".join(parts)
                try:
                    written = _write(self._seg_fd, chunk)
                    if written != len(chunk):
                        self._write_rest(chunk, written)
                except OSError:
                    self._undo_write(end)
                    raise
                if entries:
                    os.write(self._idx_fd, b"".join(entries))
                self.next_offset = st[NEXT] = offset
                st[END] = end + size
                st[INDEXED] = indexed
                st[DIRTY] = 0
                if end + size >= self._segment_bytes:
                    self._roll(offset)
            return first
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)

    def _write_rest(self, chunk: bytes, done: int) -> None:
        """After a short write (rare on a regular file) write the rest, or raise OSError."""
        view = memoryview(chunk)
        while done < len(chunk):
            written = _write(self._seg_fd, view[done:])
            if written == 0:
                raise OSError(f"no progress writing to {self.pdir}")
            done += written

    def _undo_write(self, end: int) -> None:
        """A write failed (disk full...): cut what part of it landed.

        The dirty flag stays raised, so the next writer (maybe this one) checks the tail.
        """
        if end < 0:
            return
        with contextlib.suppress(OSError):
            if self._seg_fd is not None and os.fstat(self._seg_fd).st_size > end:
                os.ftruncate(self._seg_fd, end)

    def _drain_locked(self) -> None:
        if self._buffer:
            bodies, self._buffer, self._buffered = self._buffer, [], 0
            self._append_many_locked(bodies)
            self._unsynced += len(bodies)

    # -- flushing and closing --------------------------------------------------------------
    def flush(self) -> None:
        """Write buffered records; in ``"batch"`` mode also fsync what is not yet synced."""
        with self._thread_turn():
            if self._closed:
                return
            self._drain_locked()
            if self.durability in ("batch", "fsync") and self._unsynced:
                os.fsync(self._seg_fd)
            self._unsynced = 0

    def close(self) -> None:
        """Flush, then release the files. Idempotent."""
        if self._closed:
            return
        self.flush()
        with self._thread_turn():
            self._closed = True
            self._release()

    def _release(self) -> None:
        for name in ("_seg_fd", "_idx_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        if self._mm is not None:
            if hasattr(self, "_st"):
                self._st.release()
            self._mm.close()
            self._mm = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None  # type: ignore[assignment]

    # -- shared state, rolling and recovery (the partition lock is held) --------------------
    @contextlib.contextmanager
    def _thread_turn(self) -> Iterator[None]:
        """This writer's turn among the threads of the process (see ``_turn``)."""
        self._take_turn()
        try:
            yield
        finally:
            self._give_turn(None)

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        _acquire(self._lock_fd)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this writer's thread lock and the partition lock (for maintenance)."""
        with self._thread_turn():
            if self._closed:
                raise IllegalStateError(f"writer for {self.pdir} is closed")
            with self._flocked():
                if self._st[DIRTY] or self._st[BASE] != self._base:
                    self._resync()
                yield

    def _resync(self) -> None:
        st = self._st
        if st[MAGIC] != _MAGIC or st[DIRTY]:
            log.warning(
                "partition %s: a writer died mid-write (dirty state); repairing the tail",
                self.pdir,
            )
            self._recover(full=False)
        else:
            self._open_active(st[BASE])

    def _open_active(self, base: int) -> None:
        for name in ("_seg_fd", "_idx_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self._seg_fd = os.open(log_path(self.pdir, base), flags, 0o644)
        self._idx_fd = os.open(index_path(self.pdir, base), flags, 0o644)
        self._base = base

    def _roll(self, new_base: int) -> None:
        """Start a new segment at ``new_base`` (the next offset); the old one is closed."""
        if self.durability in ("batch", "fsync"):
            os.fsync(self._seg_fd)
            self._unsynced = 0
        self._start_segment(new_base)
        config = self.reload_config()
        if config.deletes and (
            config.retention_ms is not None or config.retention_bytes is not None
        ):
            self._enforce_retention_locked(time.time_ns() // 1_000_000, config)

    def _start_segment(self, new_base: int) -> None:
        create_segment(self.pdir, new_base)
        if self.durability in ("batch", "fsync"):
            fsync_dir(self.pdir)
        st = self._st
        st[DIRTY] = 1
        st[BASE] = new_base
        st[END] = 0
        st[INDEXED] = 0
        st[DIRTY] = 0
        self._open_active(new_base)

    def _recover(self, *, full: bool) -> None:
        """Rebuild the shared state from the segments (lock held)."""
        st = self._st
        st[DIRTY] = 1
        pdir = self.pdir
        if full:
            for leftover in pdir.glob("*.cleaned"):
                leftover.unlink()
            for leftover in pdir.glob("*.rebuild"):
                leftover.unlink()
        bases = list_segments(pdir)
        if not bases:
            create_segment(pdir, 0)
            bases = [0]
        if full:
            for base in bases[:-1]:
                self._check_closed_index(base)
        active = bases[-1]
        end, next_offset, indexed = self._recover_active(active)
        st[BASE] = active
        self.next_offset = st[NEXT] = next_offset
        st[END] = end
        st[INDEXED] = indexed
        st[MAGIC] = _MAGIC
        st[DIRTY] = 0
        self._open_active(active)

    def _check_closed_index(self, base: int) -> None:
        """Rebuild a closed segment's index if it is missing, ragged or points nowhere."""
        ipath = index_path(self.pdir, base)
        try:
            ragged = ipath.stat().st_size % INDEX_ENTRY.size != 0
        except FileNotFoundError:
            ragged = True
        entries = [] if ragged else read_index(ipath)
        if not ragged and entries:
            rel, pos = entries[-1]
            fd = os.open(log_path(self.pdir, base), os.O_RDONLY)
            try:
                if entry_valid(fd, pos, base + rel):
                    return
            finally:
                os.close(fd)
        elif not ragged:
            return  # no entries: a small segment, scanned from its start
        count = rebuild_index(self.pdir, base, self._interval)
        log.info(
            "partition %s: rebuilt the index of segment %d (%d entries)",
            pdir_name(self),
            base,
            count,
        )

    def _recover_active(self, base: int) -> tuple[int, int, int]:
        """Validate the active segment's tail; returns (end position, next offset, indexed)."""
        path = log_path(self.pdir, base)
        entries = read_index(index_path(self.pdir, base))
        seg_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(seg_fd).st_size
            valid = len(entries)
            while valid:
                rel, pos = entries[valid - 1]
                if pos < size and entry_valid(seg_fd, pos, base + rel):
                    break
                valid -= 1
            if valid:
                rel, start_pos = entries[valid - 1]
                expected = base + rel
            else:
                start_pos, expected = 0, base
            indexed = start_pos
            good_end = start_pos
            bad_at: int | None = None
            new_entries: list[tuple[int, int]] = []
            for start, end, line in iter_records(path, start_pos):
                try:
                    offset = parse_record_line(line)["offset"]
                except InvalidEventError:
                    offset = None
                if offset != expected:
                    if bad_at is None:
                        bad_at = start
                    if offset is not None and offset > expected:
                        raise CorruptLogError(_mid_corruption(path, bad_at, start, offset))
                    continue
                if bad_at is not None:
                    raise CorruptLogError(_mid_corruption(path, bad_at, start, offset))
                if start - indexed >= self._interval:
                    new_entries.append((expected - base, start))
                    indexed = start
                expected += 1
                good_end = end
            if size > good_end:
                os.ftruncate(seg_fd, good_end)
                log.warning(
                    "partition %s: cut %d bytes of torn or invalid tail from segment %d "
                    "(never acknowledged); the log ends at offset %d",
                    pdir_name(self),
                    size - good_end,
                    base,
                    expected,
                )
            if valid != len(entries) or new_entries:
                kept = entries[:valid] + new_entries
                tmp = index_path(self.pdir, base).with_suffix(".index.rebuild")
                tmp.write_bytes(b"".join(INDEX_ENTRY.pack(r, p) for r, p in kept))
                os.replace(tmp, index_path(self.pdir, base))
                indexed = kept[-1][1] if kept else 0
            return good_end, expected, indexed
        finally:
            os.close(seg_fd)

    # -- maintenance: retention and compaction ----------------------------------------------
    def reload_config(self) -> TopicConfig:
        """Re-read ``topic.json`` (retention settings may have changed since we opened)."""
        path = self.pdir.parent / TOPIC_FILE
        config = TopicConfig.from_json_bytes(path.read_bytes(), str(path))
        self.config = config
        return config

    def enforce_retention(self, now_ms: int | None = None) -> list[int]:
        """Delete whole old segments by age and by size; returns the deleted base offsets."""
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        with self.locked():
            config = self.reload_config()
            if not config.deletes:
                return []
            return self._enforce_retention_locked(now_ms, config)

    def _enforce_retention_locked(self, now_ms: int, config: TopicConfig) -> list[int]:
        bases = list_segments(self.pdir)
        closed = [b for b in bases if b < self._base]
        doomed: list[int] = []
        if config.retention_bytes is not None:
            sizes = {b: file_size(log_path(self.pdir, b)) for b in bases}
            excess = sum(sizes.values()) - config.retention_bytes
            for base in closed:
                if excess - sizes[base] < 0:
                    break
                doomed.append(base)
                excess -= sizes[base]
        if config.retention_ms is not None:
            cutoff = now_ms - config.retention_ms
            for base in closed[len(doomed) :]:
                newest = _last_timestamp(log_path(self.pdir, base))
                if newest is not None and newest >= cutoff:
                    break
                doomed.append(base)
            if len(doomed) == len(closed) and self._st[END] > 0:
                newest = _last_timestamp(log_path(self.pdir, self._base))
                if newest is not None and newest < cutoff:
                    # Everything has expired: roll, so that the old active segment can go and
                    # the next record still gets the next offset (offsets never go back).
                    old = self._base
                    self._start_segment(self._st[NEXT])
                    doomed.append(old)
        for base in doomed:
            with contextlib.suppress(FileNotFoundError):
                log_path(self.pdir, base).unlink()
            with contextlib.suppress(FileNotFoundError):
                index_path(self.pdir, base).unlink()
        if doomed:
            fsync_dir(self.pdir)
            log.info(
                "partition %s: retention deleted %d segment(s), log now starts at %d",
                pdir_name(self),
                len(doomed),
                list_segments(self.pdir)[0],
            )
        return doomed

    def compact(self, now_ms: int | None = None) -> CompactionResult:
        """Keep only the latest record per key in the closed segments (offsets are kept).

        A ``None`` value is a tombstone: it removes the key's earlier values, and is itself
        removed once older than ``delete_retention_ms``. Records without a key are kept. Each
        cleaned segment replaces the old one with one atomic rename, so a crash leaves every
        segment either old or cleaned, both valid; a reader that has the old file open keeps
        reading it. The active segment is never cleaned (as in Kafka).
        """
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        with self.locked():
            config = self.reload_config()
            bases = list_segments(self.pdir)
            closed = [b for b in bases if b < self._base]
            if not closed:
                return CompactionResult(self.partition, 0, 0, 0)
            latest: dict[str, int] = {}
            for base in bases:
                for _, _, obj in self._records(base):
                    if obj["key"] is not None:
                        latest[obj["key"]] = obj["offset"]
            tombstone_cutoff = now_ms - config.delete_retention_ms
            cleaned = removed = kept = 0
            for base in closed:
                lines: list[bytes] = []
                dropped = 0
                for _, line, obj in self._records(base):
                    key = obj["key"]
                    keep = key is None or latest.get(key) == obj["offset"]
                    if keep and key is not None and obj["data"] is None:
                        keep = iso_to_ms(obj["timestamp"]) > tombstone_cutoff
                    if keep:
                        lines.append(line)
                    else:
                        dropped += 1
                kept += len(lines)
                if dropped:
                    self._replace_segment(base, lines)
                    cleaned += 1
                    removed += dropped
            return CompactionResult(self.partition, cleaned, removed, kept)

    def _records(self, base: int) -> Iterator[tuple[int, bytes, dict]]:
        path = log_path(self.pdir, base)
        for start, _, line in iter_records(path):
            try:
                obj = parse_record_line(line)
            except InvalidEventError as exc:
                raise CorruptLogError(f"{path} at byte {start}: {exc}") from None
            yield start, line, obj

    def _replace_segment(self, base: int, lines: list[bytes]) -> None:
        log_tmp = log_path(self.pdir, base).with_suffix(".log.cleaned")
        idx_tmp = index_path(self.pdir, base).with_suffix(".index.cleaned")
        entries = bytearray()
        position = indexed = 0
        with open(log_tmp, "wb") as fh:
            for line in lines:
                if position - indexed >= self._interval:
                    offset = parse_record_line(line)["offset"]
                    entries += INDEX_ENTRY.pack(offset - base, position)
                    indexed = position
                fh.write(line)
                fh.write(b"\n")
                position += len(line) + 1
            fh.flush()
            os.fsync(fh.fileno())
        idx_tmp.write_bytes(bytes(entries))
        # Old index first: in the short window a reader finds no index and scans (correct).
        with contextlib.suppress(FileNotFoundError):
            index_path(self.pdir, base).unlink()
        os.replace(log_tmp, log_path(self.pdir, base))
        os.replace(idx_tmp, index_path(self.pdir, base))
        fsync_dir(self.pdir)


def pdir_name(writer: PartitionWriter) -> str:
    return f"{writer.config.name}/{writer.pdir.name}"


def _mid_corruption(path: Path, bad_at: int | None, start: int, offset: int | None) -> str:
    return (
        f"{path}: bytes from position {bad_at} are not the record expected there, but record "
        f"{offset} follows at position {start}; committed data is corrupt and was left as "
        "it is (move the segment aside or restore it)"
    )


def _last_timestamp(path: Path) -> int | None:
    """The timestamp (ms) of a segment's last record: Kafka's "largest timestamp" here."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        found = last_complete_line(fd)
    finally:
        os.close(fd)
    if found is None:
        return None
    try:
        return iso_to_ms(parse_record_line(found[1])["timestamp"])
    except InvalidEventError:
        return None


def log_bounds(pdir: Path) -> tuple[int, int]:
    """(log start offset, log end offset) of a partition, read without any lock.

    The end offset is the offset the next record will get: the last complete record's
    offset + 1, or the active segment's base when it is empty.
    """
    for _ in range(5):  # a segment may vanish under us (retention): list again
        bases = list_segments(pdir)
        if not bases:
            return 0, 0
        try:
            return bases[0], _end_offset(pdir, bases[-1])
        except FileNotFoundError:
            continue
    raise FileKafkaError(f"partition {pdir} keeps changing under the reader")


def _end_offset(pdir: Path, base: int) -> int:
    path = log_path(pdir, base)
    fd = os.open(path, os.O_RDONLY)
    try:
        found = last_complete_line(fd)
    finally:
        os.close(fd)
    if found is None:
        return base
    try:
        return parse_record_line(found[1])["offset"] + 1
    except InvalidEventError:
        pass
    last = base - 1
    for _, _, line in iter_records(path):  # a bad last line: the last good offset counts
        with contextlib.suppress(InvalidEventError):
            last = parse_record_line(line)["offset"]
    return last + 1
