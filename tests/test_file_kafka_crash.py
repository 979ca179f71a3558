"""Level 4 file-Kafka under real faults: processes killed with SIGKILL, concurrent producers.

Every child is ``python -m level_4_hard.file_kafka.worker <role>``, driven through
``WorkerProcess`` (always closed: killed if still running, reaped, pipes closed).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from common.waiting import wait_until
from level_4_hard.file_kafka import Admin, Consumer, Producer
from level_4_hard.file_kafka.topic import partition_dir
from level_4_hard.file_kafka.worker import WorkerProcess
from tests.test_file_kafka import read_lines

DEADLINE = 60.0  # generous: costs nothing when things work, and the machine is shared


def start(workers: list[WorkerProcess], *args: str, stdin: bool = False) -> WorkerProcess:
    worker = WorkerProcess(list(args), stdin=stdin)
    workers.append(worker)
    return worker


def start_together(
    workers: list[WorkerProcess], kdir: Path, topic: str, procs: int, *args: str
) -> list[WorkerProcess]:
    """``procs`` producer processes (tags p0, p1...), all running before any of them writes."""
    started = [
        start(
            workers,
            "produce",
            "--data-dir",
            str(kdir),
            "--topic",
            topic,
            *args,
            "--tag",
            f"p{n}",
            "--wait-go",
            stdin=True,
        )
        for n in range(procs)
    ]
    for proc in started:
        proc.wait_for(lambda w: w.values("ready"), DEADLINE, "producer ready")
    for proc in started:
        proc.send_line("go")
    return started


def test_producer_killed_mid_burst_keeps_every_acknowledged_record(
    kdir: Path, workers: list[WorkerProcess]
) -> None:
    Admin(kdir).create_topic("burst", 2, segment_bytes=64 * 1024)
    producer = start(
        workers,
        "produce",
        "--data-dir",
        str(kdir),
        "--topic",
        "burst",
        "--count",
        "1000000",
        "--keys",
        "7",
        "--print-acks",
    )
    producer.wait_for(lambda w: len(w.values("ack")) >= 3000, DEADLINE, "3000 acks")
    assert producer.kill() == -9
    acked = {tuple(a) for a in producer.values("ack")}

    with Producer(kdir) as reopened:  # recovery runs on open, under the partition lock
        after = {p: reopened.send("burst", {"after": True}, partition=p).offset for p in (0, 1)}
    for partition in (0, 1):
        lines = read_lines(kdir, "burst", partition)
        offsets = [x["offset"] for x in lines]
        assert offsets == list(range(len(offsets))), "offsets must stay dense"
        assert after[partition] == len(offsets) - 1  # appended right after the survivors
        assert {(partition, o) for o in offsets} >= {a for a in acked if a[0] == partition}
        seqs = [x["data"]["seq"] for x in lines[:-1]]
        assert seqs == sorted(seqs), "per-partition order of one producer is kept"


def test_a_writer_killed_in_the_middle_of_a_write_is_repaired(
    kdir: Path, workers: list[WorkerProcess]
) -> None:
    Admin(kdir).create_topic("torn", 1)
    survivor = Producer(kdir)  # opened before the crash: must notice it (the dirty flag)
    survivor.send("torn", {"before": True})
    tear = start(workers, "tear", "--data-dir", str(kdir), "--topic", "torn", "--after", "5")
    assert tear.wait(DEADLINE) == -9
    assert tear.values("tearing") == [6]
    log = partition_dir(kdir, "torn", 0) / f"{0:020d}.log"
    assert not log.read_bytes().endswith(b"\n")  # half a record is on disk, no newline

    with Consumer(None, data_dir=kdir, auto_offset_reset="earliest") as reader:
        reader.subscribe("torn")
        assert len(reader.poll(timeout=1)) == 6  # the torn line is invisible to readers

    try:
        assert survivor.send("torn", {"after": True}).offset == 6
    finally:
        survivor.close()
    lines = read_lines(kdir, "torn", 0)
    assert [x["offset"] for x in lines] == list(range(7))
    assert b'"id":"torn"' not in log.read_bytes()
    assert lines[-1]["data"] == {"after": True}


@pytest.mark.slow
def test_four_producer_processes_write_exactly_40000_dense_records(
    kdir: Path, workers: list[WorkerProcess]
) -> None:
    Admin(kdir).create_topic("shared", 2, segment_bytes=256 * 1024)
    procs = start_together(workers, kdir, "shared", 4, "--count", "10000", "--keys", "50")
    for proc in procs:
        assert proc.wait(DEADLINE) == 0
        assert proc.values("done") == [10000]

    lines = read_lines(kdir, "shared", 0) + read_lines(kdir, "shared", 1)
    assert len(lines) == 40_000
    assert len({x["id"] for x in lines}) == 40_000
    per_producer: dict[tuple[int, str], list[int]] = defaultdict(list)
    for partition in (0, 1):
        part = read_lines(kdir, "shared", partition)
        assert [x["offset"] for x in part] == list(range(len(part)))
        for x in part:
            per_producer[(partition, x["data"]["producer"])].append(x["data"]["seq"])
    assert {tag for _, tag in per_producer} == {"p0", "p1", "p2", "p3"}
    for seqs in per_producer.values():
        assert seqs == sorted(seqs)
    assert sum(len(s) for s in per_producer.values()) == 40_000


def test_producers_sending_for_a_duration_report_exactly_what_they_wrote(
    kdir: Path, workers: list[WorkerProcess]
) -> None:
    """The benchmark's mode (``--seconds``): the count each process reports, which the rate
    is computed from, is the number of its records on disk, in order, and they all stop."""
    Admin(kdir).create_topic("timed", 1)
    # the time ends the run, not the count
    procs = start_together(
        workers, kdir, "timed", 2, "--count", str(10**9), "--seconds", "0.3", "--keys", "10"
    )
    done = {}
    for n, proc in enumerate(procs):
        assert proc.wait(DEADLINE) == 0
        (done[f"p{n}"],) = proc.values("done")
        assert done[f"p{n}"] > 0
    lines = read_lines(kdir, "timed", 0)
    assert [x["offset"] for x in lines] == list(range(len(lines)))
    for tag, count in done.items():
        assert [x["data"]["seq"] for x in lines if x["data"]["producer"] == tag] == list(
            range(count)
        )


@pytest.mark.parametrize(
    ("commit", "restart_at", "redelivered", "lost"),
    [
        ("after", 5, [5, 6], []),  # at-least-once: the crash repeats 5 and 6
        ("before", 10, [], [7, 8, 9]),  # at-most-once: the crash loses 7, 8 and 9
    ],
)
def test_a_crash_before_commit_redelivers_and_after_commit_does_not(
    kdir: Path,
    workers: list[WorkerProcess],
    commit: str,
    restart_at: int,
    redelivered: list[int],
    lost: list[int],
) -> None:
    with Producer(kdir) as producer:
        producer.send_many("pay", [{"n": i} for i in range(20)])
    member = start(
        workers,
        "member",
        "--data-dir",
        str(kdir),
        "--group",
        "ledger",
        "--topic",
        "pay",
        "--commit",
        commit,
        "--max-records",
        "5",
        "--crash-after",
        "7",
    )
    assert member.wait(DEADLINE) == -9  # it killed itself after processing 7 records
    first = [offset for _, offset in member.values("processed")]
    assert first == list(range(7))
    with Consumer(
        "ledger", data_dir=kdir, auto_offset_reset="earliest", enable_auto_commit=False
    ) as again:
        again.subscribe("pay")
        assert again.committed(0) == restart_at
        second = []
        while records := again.poll(timeout=0.1):
            second.extend(r.offset for r in records)
    assert second == list(range(restart_at, 20))
    assert sorted(set(first) & set(second)) == redelivered
    assert sorted(set(range(20)) - set(first) - set(second)) == lost


@pytest.mark.slow
def test_a_killed_members_partitions_move_to_the_survivor(
    kdir: Path, workers: list[WorkerProcess]
) -> None:
    admin = Admin(kdir)
    admin.create_topic("events", 4)
    with Producer(kdir) as producer:
        producer.send_many("events", [{"n": i} for i in range(200)], [f"k{i}" for i in range(200)])

    def member(name: str) -> WorkerProcess:
        return start(
            workers,
            "member",
            "--data-dir",
            str(kdir),
            "--group",
            "g",
            "--topic",
            "events",
            "--client-id",
            name,
            "--max-records",
            "5",
            "--delay-ms",
            "3",
            "--commit",
            "after",
        )

    a = member("member-a")
    b = member("member-b")

    def split() -> bool:
        members = admin.group_members("g")
        owned = [len(info["assignment"]) for info in members.values()]
        return len(members) == 2 and owned == [2, 2]

    wait_until(split, DEADLINE, message="a 2/2 split of the partitions")
    a.wait_for(lambda w: len(w.values("committed")) >= 3, DEADLINE, "member-a to commit")
    a_parts = {
        p
        for m, info in admin.group_members("g").items()
        if m.startswith("member-a")
        for _, p in info["assignment"]
    }
    assert a.kill() == -9
    assert all(m.startswith("member-b") for m in admin.group_members("g"))  # a's lock was freed

    with Producer(kdir) as producer:  # more work arrives after the crash
        producer.send_many(
            "events", [{"n": i} for i in range(200, 400)], [f"k{i}" for i in range(200, 400)]
        )

    def drained() -> bool:
        rows = admin.describe_group("g")
        return len(rows) == 4 and all(r.lag == 0 for r in rows)

    wait_until(drained, DEADLINE, message="member-b to take over and catch up")
    processed_a = {tuple(x) for x in a.values("processed")}
    processed_b = {tuple(x) for x in b.values("processed")}
    taken = {}
    for batch in b.values("assigned"):
        for _, partition, position in batch:
            taken[partition] = position  # where member-b started in each partition
    assert set(taken) >= a_parts and len(a_parts) == 2
    last_intent = a.values("commit-intent")[-1]
    last_done = a.values("committed")[-1]
    for partition in a_parts:  # member-b resumed exactly where member-a had committed
        assert taken[partition] in {last_intent[str(partition)], last_done[str(partition)]}
    everything = {(p, o) for p in range(4) for o in range(len(read_lines(kdir, "events", p)))}
    assert len(everything) == 400
    assert processed_a | processed_b == everything  # nothing lost
    for partition, offset in processed_a & processed_b:  # repeats only after the last commit
        assert partition in a_parts and offset >= taken[partition]
