"""Level 4 demo: Kafka on files — keys and partitions, groups with their own offsets, a replay,
and a consumer group that survives one of its members being killed with SIGKILL.

Run it either way (no server needed; files go under ``$EDA_DATA_DIR/file_kafka_demo``):

    python level_4_hard/file_kafka/demo.py
    python -m level_4_hard.file_kafka.demo --orders 30 --data-dir /tmp/eda

What to look at in the output:

1. every key always lands in the same partition, and offsets count 0, 1, 2... per partition;
2. two groups read the same records and keep separate committed offsets (their lag differs);
3. a replay: ``seek_to_beginning`` reads history again without touching the committed offsets;
4. a group of two: ``member-a`` (another process) is killed with ``kill -9`` in the middle of
   its work; ``member-b`` takes over its partitions at the last committed offsets, so the
   records processed after that commit are processed twice (at-least-once) and none is lost;
   the lag table before and after shows it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import Settings
from common.logger import configure_logging
from common.waiting import wait_until
from level_4_hard.file_kafka.admin import Admin, format_table, group_rows
from level_4_hard.file_kafka.consumer import Consumer
from level_4_hard.file_kafka.producer import Producer
from level_4_hard.file_kafka.records import TopicPartition
from level_4_hard.file_kafka.worker import WorkerProcess

TOPIC = "orders"
PARTITIONS = 3


def _lag_table(admin: Admin, group: str, write: Callable[[str], None]) -> int:
    """Print the group's lag table (as ``groups --describe`` does); returns the total lag."""
    rows = admin.describe_group(group)
    for line in format_table(group_rows(rows)):
        write("   " + line)
    return sum(r.lag or 0 for r in rows)


def produce_orders(data_dir: Path, count: int, write: Callable[[str], None]) -> dict[str, set[int]]:
    """Step 1: orders keyed by customer; returns customer -> partitions seen."""
    write(
        f"== 1. producer: {count} orders keyed by customer, "
        f"topic {TOPIC!r} with {PARTITIONS} partitions"
    )
    seen: dict[str, list[tuple[int, int]]] = {}
    with Producer(data_dir) as producer:
        for i in range(count):
            customer = f"customer-{i % 4 + 1}"
            order = {"order_id": 1000 + i, "customer": customer, "total": round(9.5 + i * 3.25, 2)}
            meta = producer.send(TOPIC, order, key=customer)
            seen.setdefault(customer, []).append((meta.partition, meta.offset))
    for customer, places in sorted(seen.items()):
        partitions = sorted({p for p, _ in places})
        offsets = ", ".join(str(o) for _, o in places)
        write(f"   {customer} -> partition {partitions[0]}  offsets {offsets}")
    return {c: {p for p, _ in places} for c, places in seen.items()}


def two_groups(data_dir: Path, admin: Admin, write: Callable[[str], None]) -> dict[str, int]:
    """Step 2 and 3: two groups with their own offsets, then a replay from the beginning."""
    write("== 2. two consumer groups read the same topic, each with its own committed offsets")
    read = {}
    for group, limit in (("billing", None), ("shipping", 5)):
        with Consumer(
            group, data_dir=data_dir, auto_offset_reset="earliest", enable_auto_commit=False
        ) as consumer:
            consumer.subscribe(TOPIC)
            got = 0
            while True:
                records = consumer.poll(timeout=0.2, max_records=limit - got if limit else 500)
                got += len(records)
                if not records or (limit and got >= limit):
                    break
            consumer.commit()
            read[group] = got
            write(f"   {group:<8} read {got} record(s) and committed")
    for group in ("billing", "shipping"):
        _lag_table(admin, group, write)

    write("== 3. replay: billing seeks to the beginning and reads the history again")
    with Consumer(
        "billing", data_dir=data_dir, auto_offset_reset="earliest", enable_auto_commit=False
    ) as consumer:
        consumer.subscribe(TOPIC)
        before = {tp.partition: consumer.position(tp) for tp in sorted(consumer.assignment())}
        consumer.seek_to_beginning()
        replayed = []
        while records := consumer.poll(timeout=0.2):
            replayed.extend(records)
        revenue = sum(r.value["total"] for r in replayed)
        write(
            f"   positions before the seek {before}; replayed {len(replayed)} record(s) "
            f"from offset 0, revenue rebuilt: {revenue:.2f}"
        )
        write("   (closed without commit: billing's committed offsets are unchanged)")
    read["replayed"] = len(replayed)
    return read


class MemberB:
    """The in-process member: processes what it polls, commits after processing."""

    def __init__(self, data_dir: Path, group: str) -> None:
        self.consumer = Consumer(
            group,
            data_dir=data_dir,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            client_id="member-b",
            heartbeat_interval=0.05,
        )
        self.processed: list[tuple[int, int]] = []
        self.taken: list[tuple[int, int | None]] = []  # (partition, committed offset then)
        self.consumer.subscribe(TOPIC, on_assign=self._on_assign)

    def _on_assign(self, tps: list[TopicPartition]) -> None:
        self.taken.extend((tp.partition, self.consumer.committed(tp)) for tp in tps)

    def poll(self) -> None:
        records = self.consumer.poll(timeout=0.05)
        self.processed.extend((r.partition, r.offset) for r in records)
        if records:
            self.consumer.commit()  # after processing: at-least-once


def group_with_a_crash(
    data_dir: Path, admin: Admin, delay_ms: float, timeout: float, write: Callable[[str], None]
) -> dict[str, Any]:
    """Step 4: two members, one killed with SIGKILL mid-way; the other takes over."""
    group = "analytics"
    write(f"== 4. consumer group {group!r}: member-a (a separate process) and member-b (this one)")
    args = ["member", "--data-dir", str(data_dir), "--group", group, "--topic", TOPIC]
    args += ["--client-id", "member-a", "--max-records", "3", "--delay-ms", str(delay_ms)]
    with WorkerProcess(args) as member_a:
        member_a.wait_for(lambda w: w.values("assigned"), timeout, "member-a's assignment")
        write(f"   member-a (pid {member_a.pid}) joined alone: it owns every partition")
        b = MemberB(data_dir, group)
        with b.consumer:

            def rebalanced() -> bool:
                b.poll()
                return bool(b.consumer.assignment()) and len(admin.group_members(group)) == 2

            wait_until(rebalanced, timeout, message="member-b's first partitions")
            owned_a, owned_b = _owned(admin, group, "member-a"), _owned(admin, group, "member-b")
            write(f"   member-b joined; the range assignor gives member-a {owned_a}, b {owned_b}")
            write("   lag before the crash:")
            _lag_table(admin, group, write)

            def a_mid_way() -> bool:
                b.poll()
                return (
                    len(member_a.values("committed")) >= 2
                    and len(member_a.values("processed")) >= 7
                )

            wait_until(a_mid_way, timeout, message="member-a to be mid-way")
            member_a.kill()
            done_a = [tuple(x) for x in member_a.values("processed")]
            write(f"   kill -9 member-a (pid {member_a.pid}) after {len(done_a)} record(s)")
            b.taken.clear()

            def caught_up() -> bool:
                b.poll()
                rows = admin.describe_group(group)
                return len(b.consumer.assignment()) == PARTITIONS and all(r.lag == 0 for r in rows)

            wait_until(caught_up, timeout, message="member-b to take over and catch up")
            for partition, committed in sorted(b.taken):
                write(
                    f"   member-b took partition {partition} over at committed offset {committed}"
                )
            write("   lag after:")
            lag_after = _lag_table(admin, group, write)
    counts = Counter(done_a + b.processed)
    total = sum(d.log_end for d in admin.describe_topic(TOPIC).partitions)
    twice = sorted(k for k, n in counts.items() if n > 1)
    lost = total - len(counts)
    write(
        f"   summary: {total} records; member-a processed {len(done_a)}, "
        f"member-b {len(b.processed)}; {len(twice)} processed twice "
        f"(after member-a's last commit: at-least-once); {lost} lost"
    )
    return {
        "processed_a": len(done_a),
        "processed_b": len(b.processed),
        "twice": len(twice),
        "lost": lost,
        "lag_after": lag_after,
        "taken_over": len(b.taken),
    }


def _owned(admin: Admin, group: str, client: str) -> list[int]:
    for member_id, info in admin.group_members(group).items():
        if member_id.startswith(client + "-"):
            return sorted(p for _, p in info.get("assignment", []))
    return []


def run(
    data_dir: Path,
    *,
    orders: int,
    delay_ms: float,
    timeout: float,
    write: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole scenario in a fresh directory; returns a summary for tests."""
    if data_dir.exists():
        shutil.rmtree(data_dir)
    admin = Admin(data_dir)
    admin.create_topic(TOPIC, PARTITIONS)
    started = time.perf_counter()
    keys = produce_orders(data_dir, orders, write)
    reads = two_groups(data_dir, admin, write)
    crash = group_with_a_crash(data_dir, admin, delay_ms, timeout, write)
    write(f"done in {time.perf_counter() - started:.1f}s; the log is in {data_dir}")
    return {"keys_in_one_partition": all(len(p) == 1 for p in keys.values()), **reads, **crash}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $EDA_DATA_DIR")
    parser.add_argument("--orders", type=int, default=24, choices=range(6, 1001), metavar="6..1000")
    parser.add_argument("--delay-ms", type=float, default=40.0, help="member-a's work per record")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each wait (s)")
    args = parser.parse_args(argv)
    configure_logging(os.environ.get("EDA_LOG_LEVEL", "WARNING"))
    base = args.data_dir if args.data_dir is not None else Settings.load().data_dir
    run(base / "file_kafka_demo", orders=args.orders, delay_ms=args.delay_ms, timeout=args.timeout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
