"""Level 4 file-Kafka: ordering, keys, offsets, groups, seek, retention, compaction, bad input.

Everything here runs in one process against real files; the crash tests (real processes
killed with SIGKILL) are in test_file_kafka_crash.py, the CLI and demos in
test_file_kafka_cli.py.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from common.events import Event, InvalidEventError, loads
from common.waiting import wait_until
from level_4_hard.file_kafka import (
    Admin,
    Consumer,
    CorruptLogError,
    FileKafkaError,
    GroupActiveError,
    IllegalStateError,
    InvalidTopicError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    Producer,
    RecordTooLargeError,
    TopicPartition,
)
from level_4_hard.file_kafka.partition import log_bounds
from level_4_hard.file_kafka.segment import list_segments, read_index
from level_4_hard.file_kafka.topic import murmur2, partition_dir, partition_for_key


def consumer(kdir: Path, group: str | None = "g", **kw) -> Consumer:
    kw.setdefault("auto_offset_reset", "earliest")
    kw.setdefault("enable_auto_commit", False)
    return Consumer(group, data_dir=kdir, **kw)


def drain(c: Consumer, timeout: float = 0.05) -> list:
    out = []
    while records := c.poll(timeout=timeout):
        out.extend(records)
    return out


def read_lines(kdir: Path, topic: str, partition: int) -> list[dict]:
    pdir = partition_dir(kdir, topic, partition)
    lines = []
    for base in list_segments(pdir):
        raw = (pdir / f"{base:020d}.log").read_bytes()
        assert raw == b"" or raw.endswith(b"\n"), "torn line at the end of a segment"
        lines.extend(loads(line) for line in raw.splitlines())
    return lines


# -- ordering, keys, offsets -------------------------------------------------------------------
def test_records_keep_their_order_within_a_partition_and_offsets_are_dense(kdir: Path) -> None:
    sent = defaultdict(list)
    with Producer(kdir, partitions=3) as producer:
        for i in range(60):
            meta = producer.send("orders", {"n": i}, key=f"customer-{i % 7}")
            assert meta.topic == "orders"
            sent[meta.partition].append((meta.offset, i))
    assert set(sent) == {0, 1, 2}
    for partition, pairs in sent.items():
        assert [off for off, _ in pairs] == list(range(len(pairs))), f"partition {partition}"

    with consumer(kdir) as c:
        c.subscribe("orders")
        records = drain(c)
    got = defaultdict(list)
    for r in records:
        got[r.partition].append((r.offset, r.value["n"]))
    assert dict(got) == dict(sent)
    first = records[0]
    assert first.timestamp.endswith("Z") and abs(first.timestamp_ms - time.time() * 1000) < 60_000
    assert len({r.id for r in records}) == 60
    assert first.event == "orders" and first.key.startswith("customer-")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_is_kafkas_hash(key: bytes, expected: int) -> None:
    # The reference values of Kafka's own UtilsTest.testMurmur2.
    assert murmur2(key) == expected


def test_same_key_same_partition_across_producers(kdir: Path) -> None:
    keys = [f"customer-{i}" for i in range(40)]
    with Producer(kdir, partitions=5) as p1:
        first = {k: p1.send("t", {"k": k}, key=k).partition for k in keys}
    with Producer(kdir, partitions=5) as p2:  # a new producer, same topic
        second = {k: p2.send("t", {"k": k}, key=k).partition for k in keys}
    assert first == second == {k: partition_for_key(k, 5) for k in keys}
    assert len(set(first.values())) > 1


def test_records_without_a_key_are_spread(kdir: Path) -> None:
    with Producer(kdir, partitions=4) as producer:
        parts = [producer.send("t", {"n": i}).partition for i in range(40)]
    assert {parts.count(p) for p in range(4)} == {10}


def test_send_many_gives_consecutive_offsets(kdir: Path) -> None:
    with Producer(kdir, partitions=2) as producer:
        producer.send("t", {"n": -1}, partition=0)
        metas = producer.send_many("t", [{"n": i} for i in range(10)], ["a"] * 10)
    assert len({m.partition for m in metas}) == 1
    first = metas[0].offset
    assert [m.offset for m in metas] == list(range(first, first + 10))


def test_an_event_round_trips_as_a_record(kdir: Path) -> None:
    event = Event.create("order.created", {"order_id": 777}, correlation_id="saga-1")
    with Producer(kdir) as producer:
        producer.send("orders", event, key="777")
    with consumer(kdir) as c:
        c.subscribe("orders")
        (record,) = drain(c)
    assert record.to_event() == event
    assert record.value == {"order_id": 777} and record.event == "order.created"


def test_producer_threads_share_one_producer(kdir: Path) -> None:
    with Producer(kdir, partitions=2) as producer:

        def work(t: int) -> None:
            for i in range(500):
                producer.send("t", {"t": t, "i": i}, key=f"k{i % 3}")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    lines = read_lines(kdir, "t", 0) + read_lines(kdir, "t", 1)
    assert len(lines) == 2000
    for p in (0, 1):
        assert [x["offset"] for x in read_lines(kdir, "t", p)] == list(
            range(len(read_lines(kdir, "t", p)))
        )
    assert len({x["id"] for x in lines}) == 2000


# -- consumers, groups, offsets ----------------------------------------------------------------
def test_two_groups_each_see_every_record_with_their_own_offsets(kdir: Path) -> None:
    with Producer(kdir, partitions=2) as producer:
        for i in range(20):
            producer.send("orders", {"n": i})
    with consumer(kdir, "billing") as billing, consumer(kdir, "shipping") as shipping:
        billing.subscribe("orders")
        shipping.subscribe("orders")
        assert len(drain(billing)) == 20
        billing.commit()
        assert len(shipping.poll(timeout=1, max_records=3)) == 3
        shipping.commit()
        assert sum(shipping.lag().values()) == 17 and sum(billing.lag().values()) == 0
    rows = {
        (r.group, r.partition): r
        for g in ("billing", "shipping")
        for r in Admin(kdir).describe_group(g)
    }
    assert sum(r.lag for (g, _), r in rows.items() if g == "billing") == 0
    assert sum(r.lag for (g, _), r in rows.items() if g == "shipping") == 17
    with consumer(kdir, "shipping") as again:  # a restart resumes at the committed offsets
        again.subscribe("orders")
        assert len(drain(again)) == 17


def test_seek_replays_and_position_is_the_next_offset(kdir: Path) -> None:
    with Producer(kdir) as producer:
        for i in range(10):
            producer.send("t", {"n": i})
    with consumer(kdir) as c:
        c.subscribe("t")
        assert c.position(0) == 0
        assert [r.offset for r in drain(c)] == list(range(10))
        assert c.position(0) == 10
        c.seek(partition=0, offset=4)
        assert [r.value["n"] for r in c.poll(timeout=1, max_records=2)] == [4, 5]
        assert c.position(0) == 6
        c.seek_to_beginning()
        assert len(drain(c)) == 10
        c.seek_to_end()
        assert c.poll(timeout=0.01) == []
        with pytest.raises(OffsetOutOfRangeError, match=r"\[0, 10\)"):
            c.seek(partition=0, offset=11)
        with pytest.raises(IllegalStateError, match="not assigned"):
            c.seek(partition=3, offset=0)


def test_seek_uses_the_sparse_index_across_segments(kdir: Path) -> None:
    Admin(kdir).create_topic("big", 1, segment_bytes=16_384, index_interval_bytes=512)
    with Producer(kdir) as producer:
        producer.send_many("big", [{"n": i, "pad": "x" * 40} for i in range(2000)])
    pdir = partition_dir(kdir, "big", 0)
    bases = list_segments(pdir)
    assert len(bases) > 10 and bases[0] == 0
    assert all(read_index(pdir / f"{b:020d}.index") for b in bases[:-1])
    with consumer(kdir) as c:
        c.subscribe("big")
        for target in (0, 1, 777, bases[5], bases[5] - 1, 1999):
            c.seek(partition=0, offset=target)
            (record,) = c.poll(timeout=1, max_records=1)
            assert record.offset == target == record.value["n"]
    # A lost index costs speed, not correctness; the next writer rebuilds it.
    (pdir / f"{bases[3]:020d}.index").unlink()
    with consumer(kdir) as c:
        c.subscribe("big")
        c.seek(partition=0, offset=bases[3] + 5)
        assert c.poll(timeout=1, max_records=1)[0].offset == bases[3] + 5
    Producer(kdir).close()
    with Producer(kdir) as producer:
        producer.send("big", {"n": 2000})
    assert read_index(pdir / f"{bases[3]:020d}.index")


def test_poll_returns_as_soon_as_a_record_arrives(kdir: Path) -> None:
    Admin(kdir).create_topic("live", 1)
    polling = threading.Event()

    def produce_later() -> None:
        polling.wait(10)
        with Producer(kdir) as producer:
            producer.send("live", {"hello": 1})

    with consumer(kdir) as c:
        c.subscribe("live")
        assert c.poll(timeout=0.05) == []  # nothing there: returns after the timeout
        thread = threading.Thread(target=produce_later)
        thread.start()
        polling.set()
        started = time.monotonic()
        records = c.poll(timeout=60)
        thread.join()
    assert [r.value for r in records] == [{"hello": 1}]
    assert time.monotonic() - started < 60  # returned with the record, not at the deadline


def test_a_live_consumer_follows_the_log_across_segment_rolls(kdir: Path) -> None:
    Admin(kdir).create_topic("live", 1, segment_bytes=1024)

    def produce() -> None:
        with Producer(kdir) as producer:
            for i in range(300):
                producer.send("live", {"n": i, "pad": "w" * 30})

    with consumer(kdir, None) as c:
        c.subscribe("live")
        thread = threading.Thread(target=produce)
        thread.start()
        got: list[int] = []

        def all_read() -> bool:
            got.extend(r.value["n"] for r in c.poll(timeout=0.01))
            return len(got) >= 300

        wait_until(all_read, 30, message="all 300 records")
        thread.join()
    assert got == list(range(300))
    assert len(list_segments(partition_dir(kdir, "live", 0))) > 20


def test_several_topics_and_explicit_commits(kdir: Path) -> None:
    with Producer(kdir) as producer:
        producer.send_many("a", [{"a": i} for i in range(3)])
        producer.send_many("b", [{"b": i} for i in range(4)])
    with consumer(kdir) as c:
        c.subscribe(["a", "b"])
        assert c.assignment() == {TopicPartition("a", 0), TopicPartition("b", 0)}
        assert len(drain(c)) == 7
        c.commit({TopicPartition("a", 0): 1, ("b", 0): 2})
        with pytest.raises(IllegalStateError, match="not assigned"):
            c.commit({TopicPartition("c", 0): 1})
        with pytest.raises(ValueError, match="pass topic="):
            c.position(0)
        assert c.committed(0, topic="a") == 1 and c.committed(TopicPartition("b", 0)) == 2
    with consumer(kdir) as c:
        c.subscribe(["a", "b"])
        assert sorted((r.topic, r.offset) for r in drain(c)) == [
            ("a", 1),
            ("a", 2),
            ("b", 2),
            ("b", 3),
        ]


def test_commit_stores_the_offset_after_the_last_polled_record(kdir: Path) -> None:
    with Producer(kdir) as producer:
        for i in range(5):
            producer.send("t", {"n": i})
    with consumer(kdir) as c:
        c.subscribe("t")
        assert len(c.poll(timeout=1, max_records=3)) == 3
        assert c.committed(0) is None
        c.commit()
        assert c.committed(0) == 3
    stored = loads((kdir / "groups" / "g" / "offsets.json").read_bytes())
    assert stored["offsets"]["t"]["0"]["offset"] == 3
    assert not list((kdir / "groups" / "g").glob("*.tmp"))
    with consumer(kdir, auto_offset_reset="none") as c:
        c.subscribe("t")
        assert [r.offset for r in drain(c)] == [3, 4]


def test_auto_commit_commits_on_poll_and_on_close(kdir: Path) -> None:
    with Producer(kdir) as producer:
        for i in range(6):
            producer.send("t", {"n": i})
    c = consumer(kdir, enable_auto_commit=True, auto_commit_interval=0)
    c.subscribe("t")
    c.poll(timeout=1, max_records=2)
    assert c.committed(0) == 0  # committed before the records were returned: not them
    c.poll(timeout=1, max_records=2)
    assert c.committed(0) == 2  # the next poll commits what the previous one returned
    c.close()
    with consumer(kdir) as again:
        again.subscribe("t")
        assert again.committed(0) == 4


def test_no_committed_offset_and_reset_none_raises(kdir: Path) -> None:
    Admin(kdir).create_topic("t", 1)
    with pytest.raises(NoOffsetForPartitionError, match="no committed offset"):
        consumer(kdir, auto_offset_reset="none").subscribe("t")


def test_latest_reset_skips_history(kdir: Path) -> None:
    with Producer(kdir) as producer:
        producer.send("t", {"old": True})
        with consumer(kdir, auto_offset_reset="latest") as c:
            c.subscribe("t")
            producer.send("t", {"old": False})
            assert [r.value for r in drain(c)] == [{"old": False}]


def test_group_members_share_partitions_and_rebalance_when_one_leaves(kdir: Path) -> None:
    Admin(kdir).create_topic("t", 4)
    a = consumer(kdir, heartbeat_interval=0)
    b = consumer(kdir, heartbeat_interval=0)
    try:
        a.subscribe("t")
        assert len(a.assignment()) == 4

        def split() -> bool:
            a.poll(timeout=0)
            b.poll(timeout=0)
            assert not a.assignment() & b.assignment(), "a partition owned twice"
            return len(a.assignment()) == 2 and len(b.assignment()) == 2

        b.subscribe("t")
        wait_until(split, 30, message="a 2/2 split")
        b.close()
        wait_until(
            lambda: a.poll(timeout=0) == [] and len(a.assignment()) == 4,
            30,
            message="a to take every partition back",
        )
    finally:
        a.close()
        b.close()


def test_a_consumer_without_group_reads_everything_and_cannot_commit(kdir: Path) -> None:
    with Producer(kdir, partitions=2) as producer:
        producer.send_many("t", [{"n": i} for i in range(8)])
    with consumer(kdir, None) as c:
        c.subscribe("t")
        assert len(drain(c)) == 8
        with pytest.raises(IllegalStateError, match="nowhere to commit"):
            c.commit()


def test_none_durability_buffers_until_flush(kdir: Path) -> None:
    producer = Producer(kdir, durability="none")
    meta = producer.send("t", {"n": 0})
    assert meta.offset == -1  # chosen when the batch is written, as Kafka says for acks=0
    with consumer(kdir) as c:
        c.subscribe("t")
        assert c.poll(timeout=0.01) == []
        producer.flush()
        assert [r.offset for r in drain(c)] == [0]
    producer.send("t", {"n": 1})
    producer.close()  # close flushes
    assert [x["offset"] for x in read_lines(kdir, "t", 0)] == [0, 1]


@pytest.mark.parametrize("mode", ["flush", "batch", "fsync"])
def test_durable_modes_write_before_send_returns(kdir: Path, mode: str) -> None:
    producer = Producer(kdir, durability=mode, fsync_interval=3)
    try:
        for i in range(5):
            assert producer.send("t", {"n": i}).offset == i
        assert len(read_lines(kdir, "t", 0)) == 5  # visible without flush or close
    finally:
        producer.close()


# -- retention and compaction -------------------------------------------------------------------
def test_retention_by_size_deletes_old_segments_and_offsets_keep_increasing(kdir: Path) -> None:
    admin = Admin(kdir)
    admin.create_topic("t", 1, segment_bytes=2048)
    with Producer(kdir) as producer:
        producer.send_many("t", [{"n": i, "pad": "y" * 50} for i in range(300)])
    pdir = partition_dir(kdir, "t", 0)
    before = list_segments(pdir)
    admin.alter_topic("t", retention_bytes=8192)
    (report,) = admin.enforce_retention("t")
    after = list_segments(pdir)
    assert report.deleted_segments == before[: len(before) - len(after)]
    assert sum((pdir / f"{b:020d}.log").stat().st_size for b in after) >= 8192 - 2048
    start, end = log_bounds(pdir)
    assert start == after[0] > 0 and end == 300
    with Producer(kdir) as producer:
        assert producer.send("t", {"n": 300}).offset == 300  # offsets never go back
    with consumer(kdir) as c:
        c.subscribe("t")
        assert [r.offset for r in drain(c)] == list(range(start, 301))


def test_retention_by_age_deletes_expired_segments(kdir: Path) -> None:
    admin = Admin(kdir)
    admin.create_topic("t", 1, segment_bytes=1024)
    now = int(time.time() * 1000)
    with Producer(kdir) as producer:
        for i in range(40):  # two hours old
            producer.send("t", {"n": i, "pad": "z" * 40}, timestamp_ms=now - 7_200_000)
        for i in range(40, 50):
            producer.send("t", {"n": i, "pad": "z" * 40})
    with consumer(kdir) as c:  # committed at offset 3, soon deleted
        c.subscribe("t")
        c.poll(timeout=1, max_records=3)
        c.commit()
    admin.alter_topic("t", retention_ms=3_600_000)
    admin.enforce_retention("t")
    start, end = log_bounds(partition_dir(kdir, "t", 0))
    assert 0 < start <= 40 and end == 50
    with consumer(kdir) as c:  # its committed offset is gone: auto_offset_reset applies
        c.subscribe("t")
        records = drain(c)
    assert records[0].offset == start and records[-1].offset == 49
    assert all(r.value["n"] >= 40 for r in records if r.timestamp_ms > now - 3_600_000)

    # When everything has expired the active segment rolls too; the next offset is still 50.
    admin.enforce_retention("t", now_ms=now + 10 * 3_600_000)
    assert log_bounds(partition_dir(kdir, "t", 0)) == (50, 50)
    with Producer(kdir) as producer:
        assert producer.send("t", {"n": 50}).offset == 50


def test_compaction_keeps_the_latest_value_per_key(kdir: Path) -> None:
    admin = Admin(kdir)
    admin.create_topic(
        "prices", 1, segment_bytes=1024, cleanup_policy="compact", delete_retention_ms=0
    )
    with Producer(kdir) as producer:
        with pytest.raises(ValueError, match="needs a key"):
            producer.send("prices", {"price": 1})
        for round_ in range(10):
            for sku in ("apple", "pear", "plum"):
                producer.send("prices", {"sku": sku, "price": round_}, key=sku)
        producer.send("prices", None, key="plum")  # tombstone: plum is deleted
        for i in range(30):  # push the history above into closed segments
            producer.send("prices", {"filler": i}, key=f"filler-{i}")
    (report,) = admin.enforce_retention("prices")
    assert report.compaction is not None and report.compaction.records_removed >= 27
    with consumer(kdir) as c:
        c.subscribe("prices")
        records = drain(c)
    latest = {r.key: r.value for r in records if not r.key.startswith("filler")}
    assert latest == {"apple": {"sku": "apple", "price": 9}, "pear": {"sku": "pear", "price": 9}}
    offsets = [r.offset for r in records]
    assert offsets == sorted(offsets) and offsets[-1] == 60  # offsets are kept, with gaps
    with consumer(kdir) as c:  # seeking into a gap lands on the next record
        c.subscribe("prices")
        c.seek(partition=0, offset=1)
        assert c.poll(timeout=1, max_records=1)[0].offset > 1


# -- bad input ----------------------------------------------------------------------------------
def test_an_unserialisable_value_is_rejected_and_nothing_is_written(kdir: Path) -> None:
    with Producer(kdir, partitions=1, max_record_bytes=2000) as producer:
        producer.send("t", {"ok": 1})
        with pytest.raises(InvalidEventError, match="not JSON-serialisable"):
            producer.send("t", {"when": object()})
        with pytest.raises(InvalidEventError):
            producer.send_many("t", [{"ok": 2}, {1j: "complex"}])
        with pytest.raises(TypeError, match="key must be a str"):
            producer.send("t", {"ok": 3}, key=42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="partition 5 does not exist"):
            producer.send("t", {"ok": 4}, partition=5)
        with pytest.raises(RecordTooLargeError, match="max_record_bytes=2000"):
            producer.send("t", {"blob": "x" * 5000})
        assert producer.send("t", {"ok": 5}).offset == 1
    assert [x["data"] for x in read_lines(kdir, "t", 0)] == [{"ok": 1}, {"ok": 5}]
    with pytest.raises(ValueError, match="durability"):
        Producer(kdir, durability="sometimes")
    with pytest.raises(ValueError, match="auto_offset_reset"):
        Consumer("g", data_dir=kdir, auto_offset_reset="middle")


@pytest.mark.parametrize(
    "name", ["../x", "", ".", "..", "a/b", "a b", "x" * 250, "caf\u00e9", ".hidden", "a..b", "t*"]
)
def test_bad_topic_names_are_rejected(kdir: Path, name: str) -> None:
    with Producer(kdir) as producer, pytest.raises(InvalidTopicError):
        producer.send(name, {"n": 1})
    with pytest.raises(InvalidTopicError):
        Admin(kdir).create_topic(name)
    with pytest.raises(InvalidTopicError):
        Consumer("g", data_dir=kdir).subscribe(name)
    assert not (kdir.parent / "x").exists()
    assert not list(kdir.glob("topics/*"))


def test_a_corrupt_record_gives_a_clear_error_and_spares_other_data(kdir: Path) -> None:
    Admin(kdir).create_topic("t", 2, segment_bytes=1024)
    with Producer(kdir) as producer:
        for i in range(60):
            producer.send("t", {"n": i, "pad": "p" * 30}, partition=i % 2)
    pdir = partition_dir(kdir, "t", 0)
    first = pdir / f"{list_segments(pdir)[0]:020d}.log"
    raw = first.read_bytes()
    start = raw.index(b'{"offset":2,')
    first.write_bytes(raw[:start] + b"#" * 20 + raw[start + 20 :])  # same length, garbage
    with consumer(kdir, None) as c:
        c.subscribe("t")
        got = []
        with pytest.raises(CorruptLogError, match=r"offset 2 of t/0 is unreadable") as err:
            while records := c.poll(timeout=0.05):
                got.extend(records)
        assert str(first) in str(err.value) and "seek(partition=0, offset=3)" in str(err.value)
        assert [r.offset for r in got if r.partition == 0] == [0, 1]  # nothing skipped
        c.seek(partition=0, offset=3)  # the user chooses to give the record up
        got.extend(drain(c))
    assert sorted(r.offset for r in got if r.partition == 1) == list(range(30))
    assert sorted(r.offset for r in got if r.partition == 0) == [0, 1, *range(3, 30)]
    with Producer(kdir) as producer:  # appending is unaffected by a bad closed segment
        assert producer.send("t", {"n": 60}, partition=0).offset == 30


def test_corruption_inside_the_active_segment_is_never_truncated(kdir: Path) -> None:
    with Producer(kdir) as producer:
        for i in range(5):
            producer.send("t", {"n": i})
    log = partition_dir(kdir, "t", 0) / f"{0:020d}.log"
    raw = log.read_bytes()
    start = raw.index(b'{"offset":2,')
    damaged = raw[:start] + b"\x00" * 8 + raw[start + 8 :]
    log.write_bytes(damaged)
    (log.parent / "writer.state").unlink()  # as after a power cut: nothing to trust
    with pytest.raises(CorruptLogError, match="committed data is corrupt"):
        Producer(kdir).send("t", {"n": 5})
    assert log.read_bytes() == damaged


def test_a_torn_tail_is_cut_when_the_partition_is_opened(kdir: Path) -> None:
    with Producer(kdir) as producer:
        for i in range(3):
            producer.send("t", {"n": i})
    log = partition_dir(kdir, "t", 0) / f"{0:020d}.log"
    with open(log, "ab") as fh:
        fh.write(b'{"offset":3,"key":null,"id":"x","event":"t","da')  # a writer died here
    with consumer(kdir) as c:  # readers never see a line without its newline
        c.subscribe("t")
        assert len(drain(c)) == 3
    (log.parent / "writer.state").unlink()
    with Producer(kdir) as producer:
        assert producer.send("t", {"n": 3}).offset == 3
    assert [x["data"]["n"] for x in read_lines(kdir, "t", 0)] == [0, 1, 2, 3]


def test_client_misuse_raises_clear_errors(kdir: Path) -> None:
    producer = Producer(kdir)
    producer.send("t", {"n": 0})
    producer.close()
    with pytest.raises(IllegalStateError, match="closed"):
        producer.send("t", {"n": 1})
    c = consumer(kdir)
    with pytest.raises(IllegalStateError, match="subscribe"):
        c.poll(timeout=0)
    c.close()
    with pytest.raises(IllegalStateError, match="closed"):
        c.subscribe("t")
    (kdir / "groups" / "g").mkdir(parents=True, exist_ok=True)
    (kdir / "groups" / "g" / "offsets.json").write_text("{not json")
    with pytest.raises(FileKafkaError, match="unreadable"):
        consumer(kdir).subscribe("t")


def test_reset_offsets_needs_an_idle_group_and_clamps(kdir: Path) -> None:
    admin = Admin(kdir)
    with Producer(kdir) as producer:
        producer.send_many("t", [{"n": i} for i in range(10)])
    with consumer(kdir) as c:
        c.subscribe("t")
        with pytest.raises(GroupActiveError, match="live member"):
            admin.reset_offsets("g", "t", to="earliest", execute=True)
    plan = admin.reset_offsets("g", "t", to=99)
    assert [(r.current, r.new) for r in plan] == [(None, 10)]
    assert admin.describe_group("g") == []  # a dry run changes nothing
    admin.reset_offsets("g", "t", shift_by=4, execute=True)
    with consumer(kdir) as c:
        c.subscribe("t")
        assert c.committed(TopicPartition("t", 0)) == 4
        assert drain(c)[0].offset == 4
    assert os.listdir(kdir / "groups" / "g" / "members") == []
