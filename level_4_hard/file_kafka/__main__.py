"""The file-Kafka console tools, in the style of Kafka's ``kafka-*.sh`` scripts.

    python -m level_4_hard.file_kafka topics --create --topic orders --partitions 3
    python -m level_4_hard.file_kafka topics --list
    python -m level_4_hard.file_kafka topics --describe --topic orders
    python -m level_4_hard.file_kafka topics --alter --topic orders --retention-ms 3600000
    printf '{"id": 1}\\n{"id": 2}\\n' | python -m level_4_hard.file_kafka produce --topic orders
    python -m level_4_hard.file_kafka consume --topic orders --group billing --from-beginning
    python -m level_4_hard.file_kafka groups --describe --group billing
    python -m level_4_hard.file_kafka reset-offsets --group billing --topic orders \
        --to-earliest --execute
    python -m level_4_hard.file_kafka retention --topic orders

Every command takes ``--data-dir`` (default: ``$EDA_DATA_DIR/file_kafka``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from common.config import Settings
from common.events import InvalidEventError, dumps, loads
from common.logger import configure_logging
from level_4_hard.file_kafka.admin import Admin, format_table, group_rows
from level_4_hard.file_kafka.consumer import Consumer
from level_4_hard.file_kafka.errors import FileKafkaError
from level_4_hard.file_kafka.partition import DURABILITY_MODES
from level_4_hard.file_kafka.producer import Producer
from level_4_hard.file_kafka.topic import CLEANUP_POLICIES

__all__ = ["main"]

_PRODUCE_BATCH = 500


def default_data_dir() -> Path:
    return Settings.load().data_dir / "file_kafka"


def table(rows: list[list[Any]], out: TextIO) -> None:
    for line in format_table(rows):
        out.write(line + "\n")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


# -- commands ------------------------------------------------------------------------------
def cmd_topics(args: argparse.Namespace, out: TextIO) -> int:
    admin = Admin(args.data_dir)
    if args.list:
        for name in admin.list_topics():
            out.write(name + "\n")
        return 0
    config_args = {
        k: getattr(args, k)
        for k in ("segment_bytes", "retention_ms", "retention_bytes", "cleanup_policy")
        if getattr(args, k) is not None
    }
    if args.create:
        _need(args.topic, "--create needs --topic")
        config = admin.create_topic(args.topic, args.partitions or 1, **config_args)
        out.write(f"Created topic {config.name} with {config.partitions} partition(s).\n")
        return 0
    if args.alter:
        _need(args.topic, "--alter needs --topic")
        _need(config_args, "--alter needs a setting to change")
        config = admin.alter_topic(args.topic, **config_args)
        out.write(f"Altered topic {config.name}: {config_args}\n")
        return 0
    names = [args.topic] if args.topic else admin.list_topics()
    for name in names:
        desc = admin.describe_topic(name)
        c = desc.config
        out.write(
            f"Topic: {c.name}\tPartitionCount: {c.partitions}\tCleanupPolicy: {c.cleanup_policy}"
            f"\tSegmentBytes: {c.segment_bytes}\tRetentionMs: {c.retention_ms}"
            f"\tRetentionBytes: {c.retention_bytes}\n"
        )
        for p in desc.partitions:
            out.write(
                f"\tTopic: {c.name}\tPartition: {p.partition}\tLogStartOffset: {p.log_start}"
                f"\tLogEndOffset: {p.log_end}\tSegments: {p.segments}"
                f"\tSize: {_size(p.size_bytes)}\n"
            )
    return 0


def _parse_line(line: str, args: argparse.Namespace) -> tuple[str | None, Any]:
    key = None
    if args.key_separator:
        if args.key_separator not in line:
            raise ValueError(f"no key separator {args.key_separator!r} in the line")
        key, line = line.split(args.key_separator, 1)
    return key, (line if args.text else loads(line))


def cmd_produce(args: argparse.Namespace, out: TextIO, lines: Iterable[str]) -> int:
    bad = 0
    sent = 0
    keys: list[str | None] = []
    values: list[Any] = []
    with Producer(
        args.data_dir, partitions=args.partitions, durability=args.durability
    ) as producer:

        def send_batch() -> None:
            nonlocal sent
            if values:
                producer.send_many(args.topic, values, keys)
                sent += len(values)
                values.clear()
                keys.clear()

        for number, raw in enumerate(lines, 1):
            line = raw.rstrip("\r\n")
            if not line:
                continue
            try:
                key, value = _parse_line(line, args)
                dumps(value)  # a bad value fails here, alone, not with its whole batch
            except (InvalidEventError, ValueError) as exc:
                bad += 1
                sys.stderr.write(f"line {number} skipped: {exc} (use --text for plain strings)\n")
                continue
            keys.append(key)
            values.append(value)
            if len(values) >= _PRODUCE_BATCH:
                send_batch()
        send_batch()
    out.write(
        f"Produced {sent} record(s) to {args.topic}"
        + (f"; {bad} bad line(s)" if bad else "")
        + ".\n"
    )
    return 1 if bad else 0


def cmd_consume(args: argparse.Namespace, out: TextIO) -> int:
    consumer = Consumer(
        args.group,
        data_dir=args.data_dir,
        auto_offset_reset="earliest" if args.from_beginning else "latest",
        enable_auto_commit=False,
    )
    count = 0
    idle_limit = None if args.timeout_ms is None else args.timeout_ms / 1000
    try:
        consumer.subscribe(args.topic)
        idle = 0.0
        while args.max_messages is None or count < args.max_messages:
            want = 500 if args.max_messages is None else min(500, args.max_messages - count)
            wait = 0.2 if idle_limit is None else min(0.2, max(0.0, idle_limit - idle))
            records = consumer.poll(timeout=wait, max_records=want)
            if not records:
                idle += wait
                if idle_limit is not None and idle >= idle_limit:
                    break
                continue
            idle = 0.0
            for r in records:
                prefix = f"{r.partition}:{r.offset}\t" if args.print_offset else ""
                if args.print_key:
                    prefix += f"{r.key}\t"
                value = r.value if isinstance(r.value, str) else dumps(r.value).decode()
                out.write(prefix + value + "\n")
            out.flush()
            count += len(records)
            if args.group is not None:
                consumer.commit()  # after the records are printed: at-least-once
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
        sys.stderr.write(f"Processed a total of {count} messages\n")
    return 0


def cmd_groups(args: argparse.Namespace, out: TextIO) -> int:
    admin = Admin(args.data_dir)
    if args.list:
        for name in admin.list_groups():
            out.write(name + "\n")
        return 0
    _need(args.group, "--describe needs --group")
    rows = admin.describe_group(args.group)
    if not rows:
        out.write(f"Consumer group '{args.group}' has no committed offsets and no members.\n")
        return 0
    table(group_rows(rows), out)
    return 0


def cmd_reset(args: argparse.Namespace, out: TextIO) -> int:
    admin = Admin(args.data_dir)
    to: str | int | None = None
    if args.to_earliest:
        to = "earliest"
    elif args.to_latest:
        to = "latest"
    elif args.to_offset is not None:
        to = args.to_offset
    plan = admin.reset_offsets(
        args.group,
        args.topic,
        to=to,
        shift_by=args.shift_by,
        partitions=args.partition,
        execute=args.execute,
    )
    table(
        [["GROUP", "TOPIC", "PARTITION", "CURRENT-OFFSET", "NEW-OFFSET"]]
        + [[args.group, r.topic, r.partition, r.current, r.new] for r in plan],
        out,
    )
    if not args.execute:
        out.write("Dry run: nothing changed (add --execute to apply).\n")
    return 0


def cmd_retention(args: argparse.Namespace, out: TextIO) -> int:
    reports = Admin(args.data_dir).enforce_retention(args.topic)
    rows: list[list[Any]] = [
        ["TOPIC", "PARTITION", "DELETED-SEGMENTS", "COMPACTED", "LOG-START", "LOG-END"]
    ]
    for r in reports:
        compacted = (
            "-"
            if r.compaction is None
            else f"{r.compaction.records_removed} removed, {r.compaction.records_kept} kept"
        )
        deleted = ",".join(str(b) for b in r.deleted_segments) or "none"
        rows.append([r.topic, r.partition, deleted, compacted, r.log_start, r.log_end])
    table(rows, out)
    return 0


def _need(value: Any, message: str) -> None:
    if not value:
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir", type=Path, default=None, help="default: $EDA_DATA_DIR/file_kafka"
    )
    parser = argparse.ArgumentParser(
        prog="python -m level_4_hard.file_kafka", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    topics = commands.add_parser("topics", parents=[common], help="create, list, describe, alter")
    action = topics.add_mutually_exclusive_group(required=True)
    for flag in ("--create", "--list", "--describe", "--alter"):
        action.add_argument(flag, action="store_true")
    topics.add_argument("--topic")
    topics.add_argument("--partitions", type=int)
    topics.add_argument("--segment-bytes", type=int)
    topics.add_argument("--retention-ms", type=int)
    topics.add_argument("--retention-bytes", type=int)
    topics.add_argument("--cleanup-policy", choices=CLEANUP_POLICIES)

    produce = commands.add_parser("produce", parents=[common], help="send stdin lines")
    produce.add_argument("--topic", required=True)
    produce.add_argument("--key-separator", help="each line is KEY<sep>VALUE")
    produce.add_argument("--text", action="store_true", help="values are strings, not JSON")
    produce.add_argument("--durability", choices=DURABILITY_MODES, default="flush")
    produce.add_argument("--partitions", type=int, default=1, help="for a new topic")

    consume = commands.add_parser("consume", parents=[common], help="print records")
    consume.add_argument("--topic", required=True)
    consume.add_argument("--group", help="commit offsets for this group (none: read only)")
    consume.add_argument("--from-beginning", action="store_true")
    consume.add_argument("--max-messages", type=int)
    consume.add_argument("--timeout-ms", type=int, help="exit after this long with no record")
    consume.add_argument("--print-key", action="store_true")
    consume.add_argument("--print-offset", action="store_true")

    groups = commands.add_parser("groups", parents=[common], help="list, describe (lag)")
    which = groups.add_mutually_exclusive_group(required=True)
    which.add_argument("--list", action="store_true")
    which.add_argument("--describe", action="store_true")
    groups.add_argument("--group")

    reset = commands.add_parser("reset-offsets", parents=[common], help="move committed offsets")
    reset.add_argument("--group", required=True)
    reset.add_argument("--topic", required=True)
    reset.add_argument("--partition", type=int, action="append", help="repeatable; default all")
    target = reset.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-earliest", action="store_true")
    target.add_argument("--to-latest", action="store_true")
    target.add_argument("--to-offset", type=int)
    target.add_argument("--shift-by", type=int)
    reset.add_argument("--execute", action="store_true", help="apply (default: dry run)")

    retention = commands.add_parser("retention", parents=[common], help="apply retention now")
    retention.add_argument("--topic", help="default: every topic")
    return parser


def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.data_dir is None:
        args.data_dir = default_data_dir()
    out = sys.stdout
    try:
        if args.command == "topics":
            return cmd_topics(args, out)
        if args.command == "produce":
            return cmd_produce(args, out, stdin if stdin is not None else sys.stdin)
        if args.command == "consume":
            return cmd_consume(args, out)
        if args.command == "groups":
            return cmd_groups(args, out)
        if args.command == "reset-offsets":
            return cmd_reset(args, out)
        return cmd_retention(args, out)
    except (FileKafkaError, ValueError, TypeError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
