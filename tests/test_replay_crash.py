"""The event log under real faults: writer processes killed with SIGKILL, several processes.

Every writer here is a real process (``python -m level_3_advanced.event_replay.log_writer``),
killed with a real ``kill -9``; the tests then look at the file on disk and replay it, as a
reader (which never changes the file) and as a writer reopening it (which cuts the torn tail).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.events import loads
from level_3_advanced.event_replay import demo_crash
from level_3_advanced.event_replay.eventbus_replay import LogPosition, ReplayableEventBus

WRITER = "level_3_advanced.event_replay.log_writer"
Spawn = Callable[..., subprocess.Popen]


@pytest.fixture
def spawn(python: str, tmp_path: Path) -> Iterator[Spawn]:
    """Start log_writer processes; every one is killed (if still running) and reaped."""
    procs: list[subprocess.Popen] = []

    def start(*args: object) -> subprocess.Popen:
        proc = subprocess.Popen(
            [python, "-m", WRITER, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)  # reaps it and closes its pipes


def wait_ready(proc: subprocess.Popen) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the writer says so (EOF if it died)
    if line != b"ready\n":
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"writer did not get ready (exit {proc.returncode}): {err.decode()[-2000:]}")


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def seqs(bus: ReplayableEventBus, path: Path | None = None) -> list[int]:
    got: list[int] = []
    sub = bus.subscribe("burst.event", lambda e: got.append(e.data["seq"]))
    try:
        bus.replay_from_file(path)
    finally:
        sub.cancel()
    return got


@pytest.fixture
def torn_log(spawn: Spawn, tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    """A writer that wrote 50 events, then half of the 51st, and now waits (lock held)."""
    path = tmp_path / "torn.log"
    proc = spawn(path, "--count", 51, "--tear-after", 50, "--max-seconds", 60)
    wait_ready(proc)
    yield path, proc


def test_reader_after_kill_9_mid_line_replays_complete_lines_and_leaves_file_alone(
    torn_log: tuple[Path, subprocess.Popen], caplog: pytest.LogCaptureFixture
) -> None:
    path, proc = torn_log
    content = path.read_bytes()
    complete = content[: content.rfind(b"\n") + 1]
    torn = len(content) - len(complete)
    assert complete.count(b"\n") == 50 and torn > 0

    with ReplayableEventBus(None) as reader:
        # While the writer is alive, in the middle of its line, holding the log's lock: a
        # reader neither waits for it nor touches the line.
        assert seqs(reader, path) == list(range(50))
        kill_9(proc)
        with caplog.at_level(logging.WARNING):
            assert seqs(reader, path) == list(range(50))
        stats = reader.replay_stats
    assert stats is not None
    assert stats.torn_tail_bytes == torn
    assert stats.corrupt == 0
    assert stats.position == LogPosition(len(complete), 50)  # where a follower resumes
    assert path.read_bytes() == content  # a reader never changes the log
    assert any(f"incomplete last line of {torn} bytes" in r.getMessage() for r in caplog.records)


def test_writer_reopening_after_kill_9_cuts_the_torn_tail_and_appends_cleanly(
    torn_log: tuple[Path, subprocess.Popen],
) -> None:
    path, proc = torn_log
    content = path.read_bytes()
    complete = content[: content.rfind(b"\n") + 1]
    torn = len(content) - len(complete)

    # A writer opening the log while the other one is alive, mid-line, holding the lock, must
    # wait for it: the line is not torn yet, it is being written.
    opened: list[ReplayableEventBus] = []
    opener = threading.Thread(target=lambda: opened.append(ReplayableEventBus(path)))
    opener.start()
    opener.join(timeout=0.5)  # the expected outcome is this timeout
    assert opener.is_alive() and not opened
    assert path.read_bytes() == content
    kill_9(proc)  # the kernel releases the dead writer's lock; now the tail is torn for good
    opener.join(timeout=30)
    assert not opener.is_alive()

    with opened[0] as writer:
        assert writer.repaired_bytes == torn
        assert path.read_bytes() == complete  # cut: the torn line was never acknowledged
        assert seqs(writer) == list(range(50))
        assert writer.replay_stats is not None
        assert writer.replay_stats.repaired_bytes == torn  # reported with the first replay
        assert writer.replay_stats.torn_tail_bytes == 0
        writer.emit("burst.event", {"writer": "after", "seq": 50})
        assert seqs(writer) == list(range(51))
        assert writer.replay_stats.repaired_bytes == 0  # reported once
    assert [loads(line)["data"]["seq"] for line in path.read_bytes().splitlines()] == list(
        range(51)
    )


def test_kill_9_at_a_random_moment_of_a_real_burst(tmp_path: Path) -> None:
    """1 MiB events, killed at whatever point the kill lands (usually inside write()).

    Whether the kernel left a partial line depends on that moment; what must hold either way:
    the complete lines replay, in order, nothing is corrupt, and the tail (if any) is reported
    by a reader and cut by a writer.
    """
    path = tmp_path / "burst.log"
    code = demo_crash.crash_writer(path, 5, real_burst=True)
    assert code in (-signal.SIGKILL, 0)  # 0: the bounded burst ended before the kill landed
    content = path.read_bytes()
    complete = content[: content.rfind(b"\n") + 1]
    lines = complete.count(b"\n")
    assert lines >= 5

    with ReplayableEventBus(None) as reader:
        assert seqs(reader, path) == list(range(lines))
        assert reader.replay_stats is not None
        assert reader.replay_stats.corrupt == 0
        assert reader.replay_stats.torn_tail_bytes == len(content) - len(complete)
    assert path.read_bytes() == content
    with ReplayableEventBus(path) as writer:
        assert writer.repaired_bytes == len(content) - len(complete)
        assert seqs(writer) == list(range(lines))


def test_write_ahead_event_survives_a_listener_that_kills_the_process(
    spawn: Spawn, tmp_path: Path
) -> None:
    path = tmp_path / "wal.log"
    proc = spawn(path, "--count", 10, "--die-in-listener", 4)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    records = [loads(line) for line in path.read_bytes().splitlines()]
    # Event 4's listener killed the process: event 4 was already in the log, 5 never began.
    assert [r["data"]["seq"] for r in records] == [0, 1, 2, 3, 4]


def test_two_processes_appending_10000_events_each_never_interleave(
    spawn: Spawn, tmp_path: Path
) -> None:
    path = tmp_path / "shared.log"
    count = 10_000
    writers = {
        tag: spawn(path, "--count", count, "--tag", tag, "--payload-bytes", 200,
                   "--notify-after", 0, "--go-on-stdin")
        for tag in ("A", "B")
    }  # fmt: skip
    for proc in writers.values():
        wait_ready(proc)  # both have the log open
    for proc in writers.values():  # start both bursts at once
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    for proc in writers.values():
        proc.wait(timeout=90)
        assert proc.returncode == 0

    got: dict[str, list[int]] = {"A": [], "B": []}
    with ReplayableEventBus(None) as reader:
        reader.subscribe("burst.event", lambda e: got[e.data["writer"]].append(e.data["seq"]))
        assert reader.replay_from_file(path) == 2 * count
        assert reader.replay_stats is not None
        assert reader.replay_stats.corrupt == 0
        assert reader.replay_stats.torn_tail_bytes == 0
    assert got == {"A": list(range(count)), "B": list(range(count))}


def test_demo_crash_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_crash.main(["--data-dir", str(tmp_path), "--events", "20"]) == 0
    out = capsys.readouterr().out
    assert "exit code -9" in out
    assert "reader: replayed 20 events" in out
    assert "left exactly as it was" in out
    assert "appended one more: 21 clean lines" in out
    assert "summary: every complete line replayed" in out
