"""The C append of file-Kafka (level_4_hard/file_kafka/_appender.c) against its Python reference.

The two must write the same bytes and keep the same protocol, because processes with and
without the C module may append to one partition together. The faults are real: a file-size
limit that makes ``write()`` fail half-way (what a full disk does), a signal while waiting for
the partition lock, and, in test_file_kafka_crash.py, a writer killed in the middle of a record.
The last test runs the file-Kafka suites again with ``EDA_PURE_PYTHON=1``.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from common.events import dumps
from level_4_hard.file_kafka import Admin, Producer
from level_4_hard.file_kafka import partition as partition_module
from level_4_hard.file_kafka.partition import C_APPEND, STATE_FILE
from level_4_hard.file_kafka.segment import list_segments
from level_4_hard.file_kafka.topic import partition_dir
from level_4_hard.file_kafka.worker import WorkerProcess
from tests.test_file_kafka import read_lines
from tests.test_file_kafka_crash import DEADLINE

ROOT = Path(__file__).resolve().parents[1]
needs_c = pytest.mark.skipif(not C_APPEND, reason="the C append is not built (pure Python)")


def body(i: int) -> bytes:
    """A record without its offset, as the producer encodes one (sizes vary)."""
    return dumps(
        {
            "key": f"k{i}",
            "id": f"test-{i}",
            "event": "t",
            "data": {"i": i, "pad": "y" * (i % 97)},
            "timestamp": "2026-01-01T00:00:00.000Z",
            "version": 1,
            "correlation_id": None,
        }
    )


def lock_is_free(kdir: Path, topic: str) -> bool:
    """Try the partition lock from another open file (as another process would)."""
    fd = os.open(partition_dir(kdir, topic, 0) / STATE_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_c_append_is_built_where_ci_runs() -> None:
    if not C_APPEND and os.environ.get("EDA_PURE_PYTHON", "") in ("", "0"):
        if os.environ.get("EDA_REQUIRE_SERVICES") == "1":
            pytest.fail("level_4_hard.file_kafka._appender did not build: see `pip install -e .`")
        pytest.skip("the C append is not built here (no C compiler?)")


@needs_c
def test_c_and_python_appends_write_the_same_bytes(kdir: Path) -> None:
    """Logs, indexes and shared state byte for byte, across segment rolls and renumbering."""
    for topic in ("c", "py"):
        Admin(kdir).create_topic(topic, 1, segment_bytes=4096, index_interval_bytes=256)
    with Producer(kdir) as producer:
        c_writer, py_writer = producer._writer("c", 0), producer._writer("py", 0)
        for i in range(300):
            guess = py_writer.guess_next_offset()
            if i % 7 == 3:
                guess += 5  # a stale guess: the Python path renumbers the line under the lock
            line = b'{"offset":%d,%b\n' % (guess, body(i)[1:])
            assert c_writer.append(body(i)) == py_writer.append_line(line, guess) == i
        assert c_writer._st.tolist() == py_writer._st.tolist()
    c_dir, py_dir = partition_dir(kdir, "c", 0), partition_dir(kdir, "py", 0)
    names = sorted(p.name for p in c_dir.iterdir() if p.suffix in (".log", ".index"))
    assert len(list_segments(c_dir)) >= 10  # the test crossed many rolls
    assert names == sorted(p.name for p in py_dir.iterdir() if p.suffix in (".log", ".index"))
    for name in names:
        assert (c_dir / name).read_bytes() == (py_dir / name).read_bytes(), name
    assert [x["offset"] for x in read_lines(kdir, "c", 0)] == list(range(300))


@needs_c
@pytest.mark.slow
def test_c_and_pure_python_processes_append_to_one_topic_together(
    kdir: Path, workers: list[WorkerProcess]
) -> None:
    """Two processes with the C append and two without: one lock, dense offsets, no torn line."""
    Admin(kdir).create_topic("mixed", 2, segment_bytes=64 * 1024)
    procs = []
    for n in range(4):
        env = {"EDA_PURE_PYTHON": "1"} if n % 2 else {"EDA_PURE_PYTHON": "0"}
        args = ["produce", "--data-dir", str(kdir), "--topic", "mixed", "--count", "5000"]
        args += ["--keys", "40", "--tag", f"p{n}", "--wait-go"]
        proc = WorkerProcess(args, stdin=True, env=env)
        workers.append(proc)
        procs.append(proc)
    for proc in procs:
        proc.wait_for(lambda w: w.values("ready"), DEADLINE, "producer ready")
    assert [p.messages[0]["c_append"] for p in procs] == [True, False, True, False]
    for proc in procs:
        proc.send_line("go")
    for proc in procs:
        assert proc.wait(DEADLINE) == 0, proc.text[-5:]

    per_producer: dict[tuple[int, str], list[int]] = defaultdict(list)
    total = 0
    for partition in (0, 1):
        lines = read_lines(kdir, "mixed", partition)
        assert [x["offset"] for x in lines] == list(range(len(lines)))
        total += len(lines)
        for x in lines:
            per_producer[(partition, x["data"]["producer"])].append(x["data"]["seq"])
    assert total == 20_000
    assert {tag for _, tag in per_producer} == {"p0", "p1", "p2", "p3"}
    for seqs in per_producer.values():
        assert seqs == sorted(seqs)


def test_a_roll_by_another_writer_is_followed(kdir: Path) -> None:
    """Two writers on one partition: each notices the other's roll and appends to the new file."""
    Admin(kdir).create_topic("roll", 1, segment_bytes=1024)
    with Producer(kdir) as a, Producer(kdir) as b:
        offsets = [(a if i % 2 else b).send("roll", {"i": i}).offset for i in range(200)]
    assert offsets == list(range(200))
    pdir = partition_dir(kdir, "roll", 0)
    bases = list_segments(pdir)
    assert len(bases) > 5
    for base, following in itertools.pairwise(bases):
        raw = (pdir / f"{base:020d}.log").read_bytes()
        first = json.loads(raw.splitlines()[0])["offset"]
        count = len(raw.splitlines())
        assert (first, first + count) == (base, following)  # no record in an old segment
        assert 1024 <= len(raw) < 1024 + 200
    assert [x["data"]["i"] for x in read_lines(kdir, "roll", 0)] == list(range(200))


_FULL_DISK = """
import json, resource, signal, sys
from pathlib import Path
from level_4_hard.file_kafka import Producer
from level_4_hard.file_kafka.partition import C_APPEND
from level_4_hard.file_kafka.topic import partition_dir

kdir = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG
producer = Producer(kdir)
for i in range(10):
    producer.send("full", {"i": i})
writer = producer._writer("full", 0)
segment = partition_dir(kdir, "full", 0) / f"{0:020d}.log"
size = segment.stat().st_size
# 40 more bytes may be written: the next record lands in part, then write() fails.
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, resource.RLIM_INFINITY))
try:
    producer.send("full", {"pad": "x" * 200})
    error = None
except OSError as exc:
    error = exc.errno
after = segment.stat().st_size
dirty = writer._st[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
offset = producer.send("full", {"i": 10}).offset
producer.close()
print(json.dumps({"c": C_APPEND, "error": error, "size": size, "after": after,
                  "dirty": dirty, "offset": offset}))
"""


@pytest.mark.parametrize("pure", [False, True], ids=["c", "python"])
def test_a_write_that_fails_half_way_acknowledges_nothing(kdir: Path, pure: bool) -> None:
    """A file-size limit (as a full disk) fails write() after part of a record landed."""
    if not pure and not C_APPEND:
        pytest.skip("the C append is not built")
    Admin(kdir).create_topic("full", 1)
    env = {**os.environ, "EDA_PURE_PYTHON": "1" if pure else "0"}
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(kdir)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["c"] is (not pure)
    assert report["error"] == errno.EFBIG  # the caller is told: the record was not written
    assert report["after"] == report["size"]  # the part that landed was cut
    assert report["dirty"] == 1  # and the next writer checks the tail first
    assert report["offset"] == 10  # the failed record took no offset
    assert [x["data"] for x in read_lines(kdir, "full", 0)] == [{"i": i} for i in range(11)]
    assert lock_is_free(kdir, "full")


class _Interrupted(Exception):
    pass


def test_a_signal_while_waiting_for_the_lock_leaves_the_writer_usable(kdir: Path) -> None:
    """A handler that raises interrupts the wait; nothing is written, the lock is not kept."""
    Admin(kdir).create_topic("sig", 1)
    producer = Producer(kdir)
    assert producer.send("sig", {"i": 0}).offset == 0
    holder = os.open(partition_dir(kdir, "sig", 0) / STATE_FILE, os.O_RDWR)

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with producer:
            fcntl.flock(holder, fcntl.LOCK_EX)  # another "process" holds the partition
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(_Interrupted):
                producer.send("sig", {"i": "lost"})
            fcntl.flock(holder, fcntl.LOCK_UN)
            assert lock_is_free(kdir, "sig")
            assert producer.send("sig", {"i": 1}).offset == 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.close(holder)
    assert [x["data"] for x in read_lines(kdir, "sig", 0)] == [{"i": 0}, {"i": 1}]


@needs_c
def test_a_bad_body_is_refused_before_the_lock_and_nothing_is_written(kdir: Path) -> None:
    Admin(kdir).create_topic("bad", 1)
    with Producer(kdir) as producer:
        writer = producer._writer("bad", 0)
        for bad, error in [
            (b"{}", ValueError),  # no member: '{"offset":0,}' would not be JSON
            (b"[1, 2]", ValueError),
            (b'{"a":\n1}', ValueError),  # a raw newline would split the record
            ('{"a": 1}', TypeError),
        ]:
            with pytest.raises(error):
                writer.append(bad)  # type: ignore[arg-type]
        assert lock_is_free(kdir, "bad")
        assert writer.append(b'{"a":1}') == 0
    c_append = partition_module._c_append
    with pytest.raises(TypeError, match="append"):
        c_append(1, 2, 3)
    with pytest.raises(ValueError, match="lock_fd"):
        c_append(-1, 0, 0, bytearray(64), b'{"a":1}', 0, 4096, 1 << 20)
    with pytest.raises(ValueError, match="48 bytes"):
        c_append(0, 0, 0, bytearray(8), b'{"a":1}', 0, 4096, 1 << 20)
    with pytest.raises(BufferError):
        c_append(0, 0, 0, b"\0" * 64, b'{"a":1}', 0, 4096, 1 << 20)  # a read-only state
    assert read_lines(kdir, "bad", 0) == [{"offset": 0, "a": 1}]


def test_the_file_kafka_suites_pass_in_pure_python() -> None:
    """What a machine without a C compiler runs: PartitionWriter.append_line, in Python."""
    env = {**os.environ, "EDA_PURE_PYTHON": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "tests/test_file_kafka.py",
            "tests/test_file_kafka_crash.py",
            "tests/test_file_kafka_appender.py",
            "-k",
            "not pure_python",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
