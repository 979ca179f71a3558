"""Level 3 crash demo: kill -9 a writer in the middle of a line, then read and reopen the log.

Run it either way:

    python level_3_advanced/event_replay/demo_crash.py
    python -m level_3_advanced.event_replay.demo_crash --real-burst

A writer process (:mod:`level_3_advanced.event_replay.log_writer`) emits events and is killed
with SIGKILL while a line is half written. With ``--real-burst`` it streams 1 MiB events
instead and the kill lands at a random moment: most of the time inside a ``write()``, and the
kernel leaves a partial line on disk by itself. Then:

1. a *reader* replays the log: every complete line is dispatched, the torn tail is reported
   and the file is left exactly as it was (the writer might have been alive, finishing it);
2. a *writer* reopens the log: the torn tail is cut (it was never acknowledged), the cut is
   reported, and new events land on clean lines.

What to look at: "replayed N events" equals the number of complete lines in both cases, and
the torn bytes are reported by the reader and cut by the writer.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.config import Settings
from common.logger import configure_logging
from level_3_advanced.event_replay.eventbus_replay import ReplayableEventBus

WRITER = "level_3_advanced.event_replay.log_writer"
BURST_PAYLOAD = 1 << 20


def crash_writer(log_path: Path, events: int, *, real_burst: bool, timeout: float = 30.0) -> int:
    """Start a writer, SIGKILL it mid-write, reap it; returns its exit code (-9)."""
    if real_burst:  # bounded: a writer that outruns the kill stops after 20x the events
        args = ["--count", str(events * 20), "--payload-bytes", str(BURST_PAYLOAD)]
        args += ["--notify-after", str(events)]
    else:
        args = ["--count", str(events + 1), "--tear-after", str(events)]
    cmd = [sys.executable, "-m", WRITER, str(log_path), "--max-seconds", str(timeout), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready" (or EOF if the writer ended first)
        if real_burst:  # let the kill land at a random moment of the burst that goes on
            time.sleep(random.uniform(0.0, 0.005))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=timeout)
        if proc.stdout is not None:
            proc.stdout.close()
    return proc.returncode


def run(log_path: Path, events: int, *, real_burst: bool = False) -> dict[str, Any]:
    """The experiment; prints what happens and returns the numbers."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)
    code = crash_writer(log_path, events, real_burst=real_burst)
    before = log_path.read_bytes()
    complete = before.count(b"\n")
    print(f"1. writer killed (exit code {code}): {len(before)} bytes, {complete} complete lines")

    with ReplayableEventBus(None) as reader:
        replayed = reader.replay_from_file(log_path)
        torn = reader.replay_stats.torn_tail_bytes if reader.replay_stats else 0
    untouched = log_path.read_bytes() == before
    print(
        f"2. reader: replayed {replayed} events, torn tail of {torn} bytes reported; "
        f"file {'left exactly as it was' if untouched else 'CHANGED'}"
    )

    with ReplayableEventBus(log_path) as writer:
        cut = writer.repaired_bytes
        replayed_after = writer.replay_from_file()
        writer.emit("burst.resumed", {"after": replayed_after})
    lines_now = log_path.read_bytes().count(b"\n")
    print(
        f"3. writer reopened the log: cut {cut} torn bytes, replayed {replayed_after} events, "
        f"appended one more: {lines_now} clean lines"
    )
    return {
        "complete_lines": complete,
        "reader_replayed": replayed,
        "torn_bytes": torn,
        "untouched": untouched,
        "cut_bytes": cut,
        "writer_replayed": replayed_after,
        "lines_after": lines_now,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="default: EDA_DATA_DIR, else data/")
    parser.add_argument(
        "--events",
        type=int,
        help="complete events before the kill (default: 100; 5 with --real-burst, of 1 MiB each)",
    )
    parser.add_argument(
        "--real-burst",
        action="store_true",
        help="kill at a random point of a burst of 64 KB events",
    )
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 5 if args.real_burst else 100
    if not 1 <= args.events <= (50 if args.real_burst else 10_000):
        parser.error("--events must be between 1 and 10000 (50 with --real-burst)")
    configure_logging()
    data_dir = args.data_dir if args.data_dir is not None else Settings.load().data_dir
    result = run(data_dir / "event_replay" / "crash.log", args.events, real_burst=args.real_burst)
    ok = (
        result["reader_replayed"] == result["complete_lines"] == result["writer_replayed"]
        and result["untouched"]
        and result["cut_bytes"] == result["torn_bytes"]
    )
    print(f"summary: {'every complete line replayed' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
