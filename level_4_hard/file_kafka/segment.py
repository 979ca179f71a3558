"""Segment files and their sparse offset index.

A partition is a directory of segments. Each segment is a pair of files named by the offset
of its first record (its *base offset*), zero-padded to 20 digits as Kafka does, so that a
directory listing sorts them in log order:

* ``00000000000000001000.log`` — records, one JSON line each (see ``records.py``);
* ``00000000000000001000.index`` — the sparse index: a fixed-size entry
  ``(offset - base: u32, byte position: u32)`` every ``index_interval_bytes`` of log.

``seek(offset)`` finds the segment by bisecting the sorted base offsets, then the index entry
at or below the offset by binary search with ``pread`` (never loading the index), then scans
at most one index interval of lines: O(log n) in the size of the partition.

The index is a cache: it is never fsync'd, it is checked before use (the entry must point at
the start of a line that carries the entry's offset) and it is rebuilt from the log when it is
missing or wrong, as Kafka rebuilds its indexes after an unclean shutdown.
"""

from __future__ import annotations

import bisect
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.events import InvalidEventError, loads
from common.storage import LineReader

__all__ = [
    "INDEX_ENTRY",
    "OFFSET_PREFIX",
    "create_segment",
    "entry_valid",
    "file_size",
    "index_path",
    "iter_records",
    "last_complete_line",
    "list_segments",
    "log_path",
    "lookup_position",
    "parse_record_line",
    "read_index",
    "rebuild_index",
    "segment_for",
]

INDEX_ENTRY = struct.Struct("<II")
OFFSET_PREFIX = b'{"offset":'
_SEGMENT_NAME = re.compile(r"(\d{20})\.log")
_TAIL_BLOCK = 1 << 16


def log_path(pdir: Path, base: int) -> Path:
    return pdir / f"{base:020d}.log"


def index_path(pdir: Path, base: int) -> Path:
    return pdir / f"{base:020d}.index"


def file_size(path: Path) -> int:
    """Size of a file, 0 if it is gone (retention may delete a segment at any time)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def create_segment(pdir: Path, base: int) -> None:
    """Create an empty segment and index (keeping them if they already exist)."""
    for path in (log_path(pdir, base), index_path(pdir, base)):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def list_segments(pdir: Path) -> list[int]:
    """The base offsets of the partition's segments, in log order."""
    try:
        names = os.listdir(pdir)
    except FileNotFoundError:
        return []
    bases = []
    for name in names:
        match = _SEGMENT_NAME.fullmatch(name)
        if match:
            bases.append(int(match.group(1)))
    bases.sort()
    return bases


def segment_for(bases: list[int], offset: int) -> int | None:
    """The base of the segment that holds ``offset`` (the greatest base <= offset)."""
    i = bisect.bisect_right(bases, offset)
    return bases[i - 1] if i else None


def parse_record_line(line: bytes) -> dict[str, Any]:
    """Decode one stored line; InvalidEventError unless it is an object with an int offset."""
    obj = loads(line)
    if not isinstance(obj, dict):
        raise InvalidEventError(f"a record must be a JSON object, got {type(obj).__name__}")
    offset = obj.get("offset")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidEventError(f"a record needs a non-negative integer 'offset', got {offset!r}")
    for field in ("key", "data", "timestamp"):
        if field not in obj:
            raise InvalidEventError(f"record at offset {offset} has no {field!r}")
    return obj


def entry_valid(seg_fd: int, position: int, offset: int) -> bool:
    """Does ``position`` start a line that holds the record with ``offset``?"""
    expected = OFFSET_PREFIX + b"%d," % offset
    if position == 0:
        return os.pread(seg_fd, len(expected), 0) == expected
    data = os.pread(seg_fd, len(expected) + 1, position - 1)
    return data[:1] == b"\n" and data[1:] == expected


def lookup_position(index_fd: int | None, seg_fd: int, base: int, offset: int) -> tuple[int, int]:
    """Where to start scanning for ``offset``: (byte position, offset of the line there).

    Binary search for the greatest index entry at or below ``offset``; (0, base) when there
    is none, or when the index is missing or stale (correct, only slower).
    """
    if index_fd is None:
        return 0, base
    entries = os.fstat(index_fd).st_size // INDEX_ENTRY.size
    lo, hi = 0, entries - 1
    found = -1
    target = offset - base
    while lo <= hi:
        mid = (lo + hi) // 2
        rel, _ = INDEX_ENTRY.unpack(os.pread(index_fd, INDEX_ENTRY.size, mid * INDEX_ENTRY.size))
        if rel <= target:
            found = mid
            lo = mid + 1
        else:
            hi = mid - 1
    if found < 0:
        return 0, base
    rel, position = INDEX_ENTRY.unpack(
        os.pread(index_fd, INDEX_ENTRY.size, found * INDEX_ENTRY.size)
    )
    if entry_valid(seg_fd, position, base + rel):
        return position, base + rel
    return 0, base


def read_index(path: Path) -> list[tuple[int, int]]:
    """All entries of an index file as (relative offset, position); [] if it is missing."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    usable = len(raw) - len(raw) % INDEX_ENTRY.size
    return list(INDEX_ENTRY.iter_unpack(raw[:usable]))


def iter_records(path: Path, start: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(start position, end position, line)`` for each complete line from ``start``."""
    reader = LineReader(path, offset=start)
    for _, line in reader:
        end = reader.position
        yield end - len(line) - 1, end, line


def rebuild_index(pdir: Path, base: int, interval: int) -> int:
    """Write the segment's index afresh from its log; returns the number of entries."""
    entries = bytearray()
    last = 0
    for start, _, line in iter_records(log_path(pdir, base)):
        if start - last >= interval:
            offset = _line_offset(line)
            if offset is None:
                break  # the writer's recovery decides what to do with a bad line
            entries += INDEX_ENTRY.pack(offset - base, start)
            last = start
    tmp = index_path(pdir, base).with_suffix(".index.rebuild")
    tmp.write_bytes(bytes(entries))
    os.replace(tmp, index_path(pdir, base))
    return len(entries) // INDEX_ENTRY.size


def _line_offset(line: bytes) -> int | None:
    if not line.startswith(OFFSET_PREFIX):
        return None
    end = line.find(b",", len(OFFSET_PREFIX))
    try:
        return int(line[len(OFFSET_PREFIX) : end])
    except ValueError:
        return None


def last_complete_line(seg_fd: int) -> tuple[int, bytes] | None:
    """The last complete line of a segment and its position (a torn tail is ignored)."""
    size = os.fstat(seg_fd).st_size
    end = size
    # find the end of the last complete line
    while end > 0:
        start = max(0, end - _TAIL_BLOCK)
        block = os.pread(seg_fd, end - start, start)
        idx = block.rfind(b"\n")
        if idx >= 0:
            end = start + idx + 1
            break
        end = start
    if end == 0:
        return None
    # find where that line starts
    line_end = end - 1
    pos = line_end
    chunks: list[bytes] = []
    while pos > 0:
        start = max(0, pos - _TAIL_BLOCK)
        block = os.pread(seg_fd, pos - start, start)
        idx = block.rfind(b"\n")
        if idx >= 0:
            chunks.append(block[idx + 1 :])
            pos = start + idx + 1
            break
        chunks.append(block)
        pos = start
    line = b"".join(reversed(chunks))
    return pos, line
