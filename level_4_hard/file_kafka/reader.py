"""Reading one partition for a consumer: seek by index, then stream complete lines.

A reader never takes a lock. It relies on three facts of the writer's protocol: a record is
visible only as a complete line (a line still being written, or torn by a dying writer, has
no newline yet and is left alone); segments are only ever appended to until a newer segment
exists; and files that retention deletes stay readable through a descriptor that is open.

The hot path reads 1 MiB with one ``pread``, splits it into lines in C, and keeps the lines it
did not return yet for the next poll (Kafka's fetcher keeps its fetched batches the same way),
so a poll costs about one ``orjson.loads`` and one tuple per record.
"""

from __future__ import annotations

import os
from functools import partial
from itertools import repeat
from operator import itemgetter
from pathlib import Path

from common.events import InvalidEventError, loads
from level_4_hard.file_kafka.errors import CorruptLogError, OffsetOutOfRangeError
from level_4_hard.file_kafka.partition import log_bounds
from level_4_hard.file_kafka.records import Record
from level_4_hard.file_kafka.segment import (
    index_path,
    list_segments,
    log_path,
    lookup_position,
    segment_for,
)

__all__ = ["PartitionReader"]

_new = tuple.__new__
_make_record = partial(_new, Record)
_get_offset = itemgetter("offset")
_get_key = itemgetter("key")
_get_data = itemgetter("data")
_get_timestamp = itemgetter("timestamp")
_FIRST_READ = 16 << 10


class PartitionReader:
    """A cursor over one partition: :meth:`seek` to an offset, then :meth:`fetch` records."""

    def __init__(self, pdir: Path, topic: str, partition: int, *, fetch_bytes: int = 1 << 20):
        self.pdir = pdir
        self.topic = topic
        self.partition = partition
        self._fetch_bytes = fetch_bytes
        self._fd: int | None = None
        self._seg_base = -1
        self._read_pos = 0
        self._chunk_start = 0
        self._pending: list[bytes] = []
        self._pi = 0
        self._next = 0
        self._prev = -1
        self._next_segment: int | None = None
        self._read_size = _FIRST_READ

    @property
    def position(self) -> int:
        """The offset of the next record this reader will return."""
        return self._next

    def bounds(self) -> tuple[int, int]:
        """(log start offset, log end offset) right now."""
        return log_bounds(self.pdir)

    def seek(self, offset: int) -> None:
        """Position the reader at ``offset``; OffsetOutOfRangeError outside [start, end]."""
        for _ in range(5):
            start, end = log_bounds(self.pdir)
            if not start <= offset <= end:
                raise OffsetOutOfRangeError(
                    f"offset {offset} is out of range for {self.topic}/{self.partition}: "
                    f"the log holds [{start}, {end})"
                )
            base = segment_for(list_segments(self.pdir), offset)
            if base is None:
                continue
            try:
                self._open_segment(base, 0)
            except FileNotFoundError:
                continue  # retention deleted it meanwhile: look again
            try:
                idx_fd: int | None = os.open(index_path(self.pdir, base), os.O_RDONLY)
            except FileNotFoundError:
                idx_fd = None
            try:
                assert self._fd is not None
                self._read_pos, entry = lookup_position(idx_fd, self._fd, base, offset)
                self._prev = entry - 1
            finally:
                if idx_fd is not None:
                    os.close(idx_fd)
            self._next = offset
            return
        raise OffsetOutOfRangeError(f"{self.topic}/{self.partition} keeps changing under seek")

    def _open_segment(self, base: int, position: int) -> None:
        fd = os.open(log_path(self.pdir, base), os.O_RDONLY)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._seg_base = base
        self._read_pos = position
        self._pending = []
        self._pi = 0
        self._prev = base - 1
        self._next_segment = None
        self._read_size = _FIRST_READ

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pending = []

    # -- the hot path ----------------------------------------------------------------------
    def fetch(self, max_records: int, out: list[Record]) -> int:
        """Append up to ``max_records`` records to ``out``; returns how many were added.

        The common case, a run of lines holding exactly the next offsets, is decoded by
        :meth:`_decode_run` with one codec call for the run; any other run (the lines before
        a seek's target, an unreadable line) goes through :meth:`_fetch_lines`, line by line.
        """
        before = len(out)
        while True:
            added = len(out) - before
            if added >= max_records:
                return added
            pending = self._pending
            pi = self._pi
            if pi >= len(pending):
                if not self._refill():
                    return added
                continue
            stop = min(len(pending), pi + max_records - added)
            records = self._decode_run(pending[pi:stop], self._next)
            if records is None:
                self._fetch_lines(stop, out)
                continue
            out += records
            self._pi = stop
            self._next += len(records)
            self._prev = self._next - 1

    def _decode_run(self, lines: list[bytes], first: int) -> list[Record] | None:
        """The records of ``lines`` if they hold exactly offsets ``first``, ``first + 1``...

        The lines are decoded as one JSON array (one call instead of one per line, the
        largest cost of a poll after the decoding itself) and the records built by C loops
        (``map``/``zip``: no bytecode per record). The result must be exactly one object per
        line with the expected offsets and every field, else None: the caller then decodes
        the lines one by one, which skips lines before a seek's target and reports an
        unreadable line precisely. (A damaged line is invalid JSON on its own; only a crafted
        pair of lines that are invalid alone yet valid together could pass for records.)
        """
        try:
            objs = loads(b"[%b]" % b",".join(lines))
            if len(objs) != len(lines):
                return None
            offsets = list(map(_get_offset, objs))
            if offsets != list(range(first, first + len(objs))):
                return None
            return list(
                map(
                    _make_record,
                    zip(
                        repeat(self.topic),
                        repeat(self.partition),
                        offsets,
                        map(_get_key, objs),
                        map(_get_data, objs),
                        map(_get_timestamp, objs),
                        objs,
                    ),
                )
            )
        except (InvalidEventError, KeyError, TypeError):
            return None

    def _fetch_lines(self, stop: int, out: list[Record]) -> None:
        """Decode ``pending[pi:stop]`` line by line: skip lines before the position (after a
        seek), and stop at an unreadable line with a clear error (nothing is skipped)."""
        topic = self.topic
        partition = self.partition
        new = _new
        parse = loads
        append = out.append
        pending = self._pending
        pi = self._pi
        nxt = start = self._next
        prev = self._prev  # the last offset skipped over (a seek scans from an entry)
        i = pi
        try:
            for i in range(pi, stop):
                obj = parse(pending[i])
                offset = obj["offset"]
                if offset < nxt:
                    prev = offset
                    continue
                append(
                    new(
                        Record,
                        (topic, partition, offset, obj["key"], obj["data"], obj["timestamp"], obj),
                    )
                )
                nxt = offset + 1
        except (InvalidEventError, KeyError, TypeError) as exc:
            last = prev if nxt == start else nxt - 1
            self._next = nxt
            if offset_before_target(last, nxt):
                # an unreadable line before the target of a seek: it is not wanted
                self._prev = last + 1
                self._pi = i + 1
                return
            self._prev = last
            self._pi = i  # a retry meets the same line again
            raise self._corrupt(i, exc) from None
        self._pi = stop
        self._next = nxt
        self._prev = prev if nxt == start else nxt - 1

    def _refill(self) -> bool:
        """Load the next chunk of complete lines; False when there is nothing more now.

        The first read after a seek is small (a seek usually wants a few records) and each
        next one doubles, up to ``fetch_bytes``: sequential reading soon reads 1 MiB at once.
        """
        size = self._read_size
        self._read_size = min(self._fetch_bytes, size * 2)
        while self._fd is not None:
            data = os.pread(self._fd, size, self._read_pos)
            lines = data.split(b"\n")
            tail = lines.pop()  # after the last newline: a line not complete yet, or b""
            if lines:
                self._pending = lines
                self._pi = 0
                self._chunk_start = self._read_pos
                self._read_pos += len(data) - len(tail)
                return True
            if len(data) >= size:
                size *= 2  # one line longer than the buffer: read more at once
                continue
            if self._next_segment is None:
                later = [b for b in list_segments(self.pdir) if b > self._seg_base]
                if not later:
                    return False
                # A newer segment exists, so this one is final: read its last lines first.
                self._next_segment = later[0]
                continue
            try:
                self._open_segment(self._next_segment, 0)
            except FileNotFoundError:
                raise OffsetOutOfRangeError(
                    f"{self.topic}/{self.partition}: segment {self._next_segment} was deleted "
                    f"by retention before offset {self._next} was read"
                ) from None
        return False

    def _corrupt(self, pi: int, exc: Exception) -> CorruptLogError:
        position = self._chunk_start + sum(len(line) + 1 for line in self._pending[:pi])
        guess = self._prev + 1
        return CorruptLogError(
            f"{log_path(self.pdir, self._seg_base)} at byte {position}: the record expected "
            f"at offset {guess} of {self.topic}/{self.partition} is unreadable ({exc}); "
            f"nothing was skipped. To give it up, seek(partition={self.partition}, "
            f"offset={guess + 1})"
        )


def offset_before_target(prev: int, target: int) -> bool:
    """An unreadable line right after offset ``prev`` lies before ``target`` (dense log)."""
    return prev >= 0 and prev + 1 < target
