"""Delivery semantics, shown by crashing: what each commit policy loses or repeats.

For each policy a worker process consumes 20 payments in batches of 5 and kills itself with
SIGKILL after processing 7 of them (in the middle of its second batch). A fresh consumer of the
same group then starts from the committed offset and processes the rest:

* ``at-least-once`` — commit *after* processing: the crash repeats what was processed since
  the last commit (duplicates, nothing lost). Make processing idempotent (dedupe by
  ``record.id``) and this is exactly-once in effect.
* ``at-most-once`` — commit *before* processing: the crash loses what was committed but not
  yet processed (no duplicates).
* ``auto-commit`` — ``enable_auto_commit``: each ``poll`` commits what the previous polls
  returned; with processing done between polls this behaves like at-least-once.
* ``auto-commit-async`` — the same, but the records are handed to another thread: ``poll``
  commits records that thread has not processed yet, and the crash loses them.

    python level_4_hard/file_kafka/demo_delivery.py
    python -m level_4_hard.file_kafka.demo_delivery --mode at-most-once
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import Settings
from common.logger import configure_logging
from level_4_hard.file_kafka.admin import format_table
from level_4_hard.file_kafka.consumer import Consumer
from level_4_hard.file_kafka.producer import Producer
from level_4_hard.file_kafka.worker import WorkerProcess

MODES = {
    "at-least-once": ("after", "commit after processing"),
    "at-most-once": ("before", "commit before processing"),
    "auto-commit": ("auto", "auto-commit at each poll"),
    "auto-commit-async": ("auto-async", "auto-commit, processing in a thread"),
}
RECORDS = 20
BATCH = 5
CRASH_AFTER = 7


def _ranges(offsets: list[int]) -> str:
    if not offsets:
        return "-"
    out = []
    start = prev = offsets[0]
    for x in [*offsets[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(out)


def run_mode(data_dir: Path, mode: str, timeout: float) -> dict[str, Any]:
    """One crash and restart under ``mode``; returns what was processed, repeated and lost."""
    commit, _ = MODES[mode]
    topic = f"payments-{mode}"
    with Producer(data_dir) as producer:
        producer.send_many(topic, [{"payment": i, "amount": 10 + i} for i in range(RECORDS)])
    args = [
        "member",
        "--data-dir",
        str(data_dir),
        "--group",
        "ledger",
        "--topic",
        topic,
        "--commit",
        commit,
        "--max-records",
        str(BATCH),
        "--crash-after",
        str(CRASH_AFTER),
    ]
    if commit == "auto-async":
        args += ["--delay-ms", "20"]
    with WorkerProcess(args) as worker:
        code = worker.wait(timeout)
        first = [offset for _, offset in worker.values("processed")]
    with Consumer(
        "ledger", data_dir=data_dir, auto_offset_reset="earliest", enable_auto_commit=False
    ) as consumer:
        consumer.subscribe(topic)
        restart = consumer.position(0)
        second = []
        while records := consumer.poll(timeout=0.2):
            second.extend(r.offset for r in records)
            consumer.commit()
    seen = set(first) | set(second)
    return {
        "mode": mode,
        "killed": code == -9,
        "first": first,
        "restart": restart,
        "duplicates": sorted(set(first) & set(second)),
        "lost": sorted(set(range(RECORDS)) - seen),
    }


def run(
    data_dir: Path, modes: list[str], timeout: float, write: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    if data_dir.exists():
        shutil.rmtree(data_dir)
    write(
        f"{RECORDS} payments, batches of {BATCH}; the worker is killed (SIGKILL) after "
        f"processing {CRASH_AFTER}; a new consumer of the group then processes the rest."
    )
    results = [run_mode(data_dir, mode, timeout) for mode in modes]
    rows: list[list[Any]] = [
        ["POLICY", "HOW", "PROCESSED-BEFORE-KILL", "RESTARTED-AT", "DUPLICATES", "LOST"]
    ]
    for r in results:
        rows.append(
            [
                r["mode"],
                MODES[r["mode"]][1],
                _ranges(r["first"]),
                r["restart"],
                _ranges(r["duplicates"]) if r["duplicates"] else "none",
                _ranges(r["lost"]) if r["lost"] else "none",
            ]
        )
    for line in format_table(rows):
        write(line)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $EDA_DATA_DIR")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per crash (s)")
    args = parser.parse_args(argv)
    configure_logging(os.environ.get("EDA_LOG_LEVEL", "WARNING"))
    base = args.data_dir if args.data_dir is not None else Settings.load().data_dir
    modes = list(MODES) if args.mode == "all" else [args.mode]
    results = run(base / "file_kafka_delivery", modes, args.timeout)
    return 0 if all(r["killed"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
