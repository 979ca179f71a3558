"""Files that survive crashes: the atomic write and the append-only JSON-lines log.

Every level that keeps something on disk (events.log, file-Kafka segments and offsets, saga
logs, webhook records, snapshots) goes through these two pieces, so the crash rules live in
one place:

* :func:`atomic_write` — temp file in the same directory, fsync, ``os.replace``, fsync of the
  directory: a reader sees the old content or the new, never a mix.
* :class:`AppendLog` — ``O_APPEND`` plus an exclusive ``flock`` around each write of whole
  lines, so appends from several threads and several processes never interleave; on open, a
  torn tail left by a writer killed mid-line is cut off (it was never acknowledged).
* :class:`LineReader` — streams complete lines with their numbers and byte positions, and
  reports (never yields) a torn last line.
* :class:`OwnerLock` — one live owner at a time for a data directory or a log: an exclusive
  ``flock`` that the kernel releases when the owner dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from common.logger import get_logger

__all__ = [
    "DURABILITY_MODES",
    "AppendLog",
    "LineReader",
    "OwnerLock",
    "OwnerLockBusy",
    "atomic_write",
    "fsync_dir",
    "try_lock",
]

log = get_logger(__name__)
DURABILITY_MODES = ("none", "flush", "fsync")
_NONE_BUFFER_LIMIT = 1 << 16


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so that a rename or a new file in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (temp file + fsync + rename + fsync dir)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(target.parent)


class AppendLog:
    """An append-only file of lines, safe across threads and processes.

    ``durability`` says when an append is acknowledged:

    * ``"none"``  — buffered in memory, written when the buffer fills, on :meth:`flush` or
      :meth:`close` (lost if the process dies; fastest);
    * ``"flush"`` — written to the OS with one ``write()`` per append (survives the process
      dying, not a power cut);
    * ``"fsync"`` — written and ``fsync``'d before the call returns (survives a power cut).

    Each append writes whole lines with one ``write()`` under an exclusive ``flock``, so lines
    from several writers never interleave. Lines must not contain a newline; one is added.

    A writer killed mid-line leaves a torn tail. It is cut (under the lock, so never a line a
    live writer is still writing) when a log is opened, and also before an append whenever the
    file grew since this writer's last write and does not end with a newline — otherwise a
    surviving writer's next line would be glued onto the fragment and lost with it.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, durability: str = "flush", repair: bool = True
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.durability = durability
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        self._end = -1  # the file size after this writer's last write (-1: not known)
        self._repair = repair
        self.repaired_bytes = 0  # torn-tail bytes this writer has cut, in all
        if repair:
            self.repair_tail()

    # -- writing ----------------------------------------------------------------------------
    def append(self, line: bytes) -> None:
        """Append one line (without its newline)."""
        self.append_many((line,))

    def append_many(self, lines: Iterable[bytes]) -> None:
        """Append several lines as one write: they land together and contiguously."""
        chunk = b"\n".join(lines) + b"\n"
        if chunk == b"\n":
            return
        with self._lock:
            if self._fd is None:
                raise ValueError(f"append to closed log {self.path}")
            if self.durability == "none":
                self._buffer.append(chunk)
                self._buffered += len(chunk)
                if self._buffered >= _NONE_BUFFER_LIMIT:
                    self._write_locked(b"".join(self._buffer))
                    self._buffer.clear()
                    self._buffered = 0
                return
            self._write_locked(chunk)
            if self.durability == "fsync":
                os.fsync(self._fd)

    def _write_locked(self, chunk: bytes) -> None:
        fd = self._fd
        assert fd is not None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if self._repair and size != self._end:  # somebody else wrote since our last write
                cut = self._cut_torn_tail(fd, size)
                self.repaired_bytes += cut
                size -= cut
            view = memoryview(chunk)
            while view:  # a regular file takes it all at once; loop for the rare short write
                written = os.write(fd, view)
                view = view[written:]
            self._end = size + len(chunk)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def flush(self, *, fsync: bool = False) -> None:
        """Write what is buffered; with ``fsync=True`` also force it to disk."""
        with self._lock:
            if self._fd is None:
                return
            if self._buffer:
                self._write_locked(b"".join(self._buffer))
                self._buffer.clear()
                self._buffered = 0
            if fsync:
                os.fsync(self._fd)

    def sync(self) -> None:
        """fsync what has been written (a group commit covers every append before it)."""
        self.flush(fsync=True)

    def close(self) -> None:
        self.flush(fsync=self.durability == "fsync")
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- crash repair -----------------------------------------------------------------------
    def repair_tail(self) -> int:
        """Cut a torn last line (no trailing newline); returns the number of bytes removed.

        Done under the same lock as appends, so a line being written by another live writer is
        never mistaken for a torn one (a killed writer's lock is released by the kernel).
        """
        with self._lock:
            fd = self._fd
            assert fd is not None
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                cut = self._cut_torn_tail(fd, size)
                self._end = size - cut
                self.repaired_bytes += cut
                return cut
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _cut_torn_tail(self, fd: int, size: int) -> int:
        """With the flock held: truncate after the last newline; returns the bytes removed."""
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return 0
        keep = _end_of_last_line(fd, size)
        os.ftruncate(fd, keep)
        log.warning(
            "cut a torn last line of %d bytes from %s (a writer died mid-write)",
            size - keep,
            self.path,
        )
        return size - keep


def _end_of_last_line(fd: int, size: int) -> int:
    """The byte position just after the last newline in the file (0 if none)."""
    pos = size
    block = 4096
    while pos > 0:
        start = max(0, pos - block)
        data = os.pread(fd, pos - start, start)
        idx = data.rfind(b"\n")
        if idx >= 0:
            return start + idx + 1
        pos = start
    return 0


class LineReader:
    """Stream the complete lines of a file from a byte ``offset``; memory stays flat.

    Iterating yields ``(line_number, line)`` with the newline stripped; ``line_number`` counts
    from 1 at ``first_line``. ``position`` is the byte offset just past the last line yielded
    (where a follower resumes) and ``torn_tail`` holds the bytes of an
    incomplete last line, if any: it is reported, never yielded.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, offset: int = 0, first_line: int = 1
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no such log file: {self.path}")
        self.offset = offset
        self.first_line = first_line
        self.position = offset
        self.lines_read = 0
        self.torn_tail: bytes | None = None

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        number = self.first_line - 1
        position = self.offset
        try:
            for batch in self._batches():
                for line in batch:
                    number += 1
                    position += len(line) + 1
                    self.position = position  # read while iterating (followers, snapshots)
                    yield number, line
        finally:
            self.lines_read = number - self.first_line + 1

    def batches(self, size: int = 1 << 18) -> Iterator[list[bytes]]:
        """The same lines, a list at a time (about ``size`` bytes each), for hot loops.

        A loop over a list costs a fraction of a generator step per line. ``position`` and
        ``lines_read`` are those after the whole batch: a caller that needs each line's offset
        adds ``len(line) + 1`` as it goes.
        """
        position = self.offset
        lines_read = 0
        for batch in self._batches(size):
            lines_read += len(batch)
            position += sum(map(len, batch)) + len(batch)
            self.position = position
            self.lines_read = lines_read
            yield batch

    def _batches(self, size: int = 1 << 18) -> Iterator[list[bytes]]:
        # Read big blocks and split them in C; the piece after the last newline waits for the
        # next block. At the end of the file a piece without its newline is a torn tail:
        # reported, never yielded (its writer may still be finishing it).
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self.offset)
            partial: list[bytes] = []
            while block := fh.read(size):
                lines = block.split(b"\n")
                if len(lines) == 1:  # no newline in the whole block: one long line
                    partial.append(block)
                    continue
                if partial:
                    partial.append(lines[0])
                    lines[0] = b"".join(partial)
                    partial.clear()
                tail = lines.pop()
                if tail:
                    partial.append(tail)
                yield lines
            if partial:
                self.torn_tail = b"".join(partial)


def try_lock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting; False if another holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class OwnerLockBusy(RuntimeError):
    """Another live process owns the lock; ``holder`` is its pid as it wrote it ("?" if none)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by another live process (pid {holder})")
        self.path = path
        self.holder = holder


class OwnerLock:
    """One live owner at a time: an exclusive, non-blocking ``flock`` on ``path``.

    The owner writes its pid into the file (for the error message of the next one). The
    kernel releases the lock when the owner's process dies, even by SIGKILL, so a crash never
    leaves a stale lock behind; nothing has to be cleaned up by hand.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> OwnerLock:
        """Take the lock or raise :class:`OwnerLockBusy` at once; returns self."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not try_lock(fd):
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise OwnerLockBusy(self.path, holder)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (idempotent); closing the descriptor releases the flock."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> OwnerLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
