"""Crash-safe files: the atomic write, the append-only log and the streaming line reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.storage import AppendLog, LineReader, atomic_write
from common.waiting import wait_until


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "offsets.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["offsets.json"]


def test_atomic_write_failure_keeps_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize("durability", ["none", "flush", "fsync"])
def test_append_log_modes_write_whole_lines(tmp_path: Path, durability: str) -> None:
    path = tmp_path / "log.jsonl"
    with AppendLog(path, durability=durability) as log:
        log.append(b'{"n":1}')
        log.append_many([b'{"n":2}', b'{"n":3}'])
        log.append_many([])
    assert path.read_bytes() == b'{"n":1}\n{"n":2}\n{"n":3}\n'


def test_append_log_none_mode_buffers_until_flush(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = AppendLog(path, durability="none")
    log.append(b"x")
    assert path.read_bytes() == b""
    log.flush()
    assert path.read_bytes() == b"x\n"
    log.close()
    assert log.closed
    with pytest.raises(ValueError, match="closed"):
        log.append(b"y")


def test_append_log_rejects_unknown_durability(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="durability must be one of"):
        AppendLog(tmp_path / "x", durability="sometimes")


def test_torn_tail_is_cut_on_open(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"n":1}\n{"n":2}\n{"n":3')
    with AppendLog(path) as log:
        assert log.repaired_bytes == len(b'{"n":3')
        log.append(b'{"n":4}')
    assert path.read_bytes() == b'{"n":1}\n{"n":2}\n{"n":4}\n'


def test_a_file_that_is_all_torn_is_emptied(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"x" * 10_000)  # longer than one read block, no newline at all
    with AppendLog(path) as log:
        assert log.repaired_bytes == 10_000
    assert path.read_bytes() == b""


def test_line_reader_streams_lines_and_reports_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"a\nbb\nccc")
    reader = LineReader(path)
    assert list(reader) == [(1, b"a"), (2, b"bb")]
    assert reader.torn_tail == b"ccc"
    assert reader.position == 5 and reader.lines_read == 2
    resumed = LineReader(path, offset=2, first_line=2)
    assert list(resumed) == [(2, b"bb")]


@pytest.mark.parametrize("size", [1, 3, 7, 1 << 18])
def test_line_reader_batches_give_the_same_lines(tmp_path: Path, size: int) -> None:
    """Blocks smaller than a line, a line split across blocks, and a torn tail."""
    path = tmp_path / "log.jsonl"
    lines = [b"a", b"", b"bbbbbbbbbbbbbbbbbbbb", b"cc", b"d" * 50]
    path.write_bytes(b"".join(line + b"\n" for line in lines) + b"torn")
    reader = LineReader(path)
    got = [line for batch in reader.batches(size) for line in batch]
    assert got == lines
    assert reader.torn_tail == b"torn"
    assert reader.position == path.stat().st_size - 4 and reader.lines_read == 5
    # from a line boundary, and the per-line iterator agrees
    resumed = LineReader(path, offset=2, first_line=2)
    assert [line for batch in resumed.batches(size) for line in batch] == lines[1:]
    assert [line for _, line in LineReader(path, offset=2)] == lines[1:]


def test_line_reader_batches_of_an_empty_or_torn_only_file(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"")
    assert list(LineReader(path).batches()) == []
    path.write_bytes(b"no newline yet")
    reader = LineReader(path)
    assert list(reader.batches()) == []
    assert reader.torn_tail == b"no newline yet" and reader.position == 0


def test_line_reader_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such log file"):
        LineReader(tmp_path / "missing.log")


WRITER = textwrap.dedent(
    """
    import sys
    from common.storage import AppendLog
    path, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    payload = b"x" * 200
    with AppendLog(path, durability="flush") as log:
        for i in range(count):
            log.append(b'{"w":"%s","i":%d,"p":"%s"}' % (tag.encode(), i, payload))
    """
)


def test_two_processes_appending_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, "10000"]) for tag in "AB"
    ]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    seen: dict[str, list[int]] = {"A": [], "B": []}
    import orjson

    for _, line in LineReader(path):
        obj = orjson.loads(line)  # a torn or interleaved line would not parse
        seen[obj["w"]].append(obj["i"])
    assert seen == {"A": list(range(10000)), "B": list(range(10000))}


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from common.storage import AppendLog
    log = AppendLog(sys.argv[1], durability="flush")
    big = b"y" * 65536
    i = 0
    while True:  # until killed; announce once the file has content
        log.append(b'{"i":%d,"p":"%s"}' % (i, big))
        if i == 20:
            print("ready", flush=True)
        i += 1
    """
)


@pytest.mark.slow
def test_kill_9_mid_burst_leaves_a_readable_log(tmp_path: Path) -> None:
    """A real SIGKILL in the middle of a burst: every complete line reads back; a reopened
    writer cuts whatever torn tail there is and appends cleanly after it."""
    path = tmp_path / "burst.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        wait_until(lambda: path.stat().st_size > 3_000_000, timeout=30, message="the burst")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()
    import orjson

    reader = LineReader(path)
    numbers = [orjson.loads(line)["i"] for _, line in reader]
    assert numbers == list(range(len(numbers))) and len(numbers) > 20
    with AppendLog(path) as log:
        log.append(b'{"i":"after"}')
    lines = [orjson.loads(line) for _, line in LineReader(path)]
    assert lines[-1] == {"i": "after"} and len(lines) == len(numbers) + 1


def test_a_writer_killed_mid_line_does_not_swallow_a_live_writers_next_line(
    tmp_path: Path,
) -> None:
    """Writer A stays open while writer B dies mid-line: A's next line must not be glued onto
    B's fragment (it would be unreadable and so lost)."""
    path = tmp_path / "log.jsonl"
    with AppendLog(path) as a:
        a.append(b'{"w":"a","i":1}')
        with open(path, "ab") as b:  # B, killed after writing half a line
            b.write(b'{"w":"b","i":1')
        a.append(b'{"w":"a","i":2}')
        assert a.repaired_bytes == len(b'{"w":"b","i":1')
    assert [line for _, line in LineReader(path)] == [b'{"w":"a","i":1}', b'{"w":"a","i":2}']


HOLDER = textwrap.dedent(
    """
    import sys
    from common.storage import OwnerLock
    lock = OwnerLock(sys.argv[1]).acquire()
    print("held", flush=True)
    sys.stdin.read()  # hold it until killed
    """
)


def test_owner_lock_is_exclusive_and_freed_when_its_owner_is_killed(tmp_path: Path) -> None:
    from common.storage import OwnerLock, OwnerLockBusy

    path = tmp_path / "dir" / "owner.lock"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(OwnerLockBusy, match=rf"pid {proc.pid}\)") as busy:
            OwnerLock(path).acquire()
        assert busy.value.holder == str(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
    with OwnerLock(path) as lock:  # no stale lock after a SIGKILL
        assert lock.held
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(OwnerLockBusy):
            OwnerLock(path).acquire()  # exclusive within one process too (another fd)
    assert not lock.held
    OwnerLock(path).acquire().release()
