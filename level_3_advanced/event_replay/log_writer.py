"""A writer process for crash experiments: emits a burst of events into a log.

Kill it with ``kill -9`` in the middle of the burst, then replay the log: every complete line
replays; an incomplete last line is reported and left alone by a reader, and cut by a writer
that reopens the log. The tests start it exactly as you would:

    python -m level_3_advanced.event_replay.log_writer /tmp/burst.log --count 200 \
        --payload-bytes 1048576 & sleep 0.2; kill -9 $!

(``demo_crash.py`` runs the whole experiment and replays the log afterwards.)

Every event is ``burst.event`` with ``{"writer": TAG, "seq": n, "pad": "..."}``. Options make
the crash land where an experiment wants it: ``--tear-after N`` writes half of line N+1 under
the log's lock and waits to be killed (the state of a writer killed inside ``write()``);
``--die-in-listener N`` kills the process with SIGKILL from inside the listener of event N (to
show that write-ahead logging kept the event). ``--notify-after N`` writes ``ready`` to stdout
after N events (and ``--tear-after`` after the tear), so the parent kills at once instead of
polling a file that grows by gigabytes a second. ``--max-seconds`` bounds every run.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import time
from pathlib import Path

from common.events import Event
from common.logger import configure_logging, get_logger
from level_3_advanced.event_replay.eventbus_replay import ReplayableEventBus

log = get_logger(__name__)
EVENT = "burst.event"


def tear_line(log_path: Path, line: bytes, hold_seconds: float) -> None:
    """Write the first half of ``line`` under the log's lock, then hold the lock.

    This is what the file looks like when a writer is killed in the middle of ``write()``:
    a line without its newline, and (until the kernel releases it at death) the lock held.
    """
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line[: max(1, len(line) // 2)])
        log.info("wrote half a line to %s; waiting to be killed", log_path)
        _notify()
        time.sleep(hold_seconds)  # nothing to wait for: the experiment kills us meanwhile
    finally:
        os.close(fd)


def run(
    log_path: Path,
    *,
    count: int,
    tag: str = "w",
    payload_bytes: int = 0,
    durability: str = "flush",
    notify_after: int | None = None,
    go_on_stdin: bool = False,
    tear_after: int | None = None,
    die_in_listener: int | None = None,
    max_seconds: float = 60.0,
) -> int:
    """Emit the burst; returns how many events were emitted (unless killed first)."""
    pad = "x" * payload_bytes
    with ReplayableEventBus(log_path, durability=durability, history_limit=0) as bus:
        if die_in_listener is not None:

            def crash(event: Event) -> None:
                if event.data["seq"] == die_in_listener:
                    os.kill(os.getpid(), signal.SIGKILL)

            bus.subscribe(EVENT, crash)
        if notify_after == 0:
            _notify()
        if go_on_stdin:
            sys.stdin.readline()  # returns at once on EOF: a parent that died releases us
        deadline = time.monotonic() + max_seconds
        seq = 0
        while (count == 0 or seq < count) and time.monotonic() < deadline:
            if tear_after is not None and seq == tear_after:
                bus.close()  # flush what is buffered, then tear the next line
                data = {"writer": tag, "seq": seq, "pad": pad}
                torn = Event.create(EVENT, data).to_json_bytes() + b"\n"
                tear_line(log_path, torn, max(0.0, deadline - time.monotonic()))
                return seq
            bus.emit(EVENT, {"writer": tag, "seq": seq, "pad": pad})
            seq += 1
            if seq == notify_after:
                _notify()
    return seq


def _notify() -> None:
    """Tell the parent "now" through stdout: it blocks on reading this line, no polling."""
    os.write(sys.stdout.fileno(), b"ready\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="the JSON-lines log to append to")
    parser.add_argument("--count", type=int, default=1_000, help="events; 0 = until killed")
    parser.add_argument("--tag", default="w", help="writer name, stored in every event")
    parser.add_argument("--payload-bytes", type=int, default=0, help="padding per event")
    parser.add_argument("--durability", choices=("none", "flush", "fsync"), default="flush")
    parser.add_argument(
        "--notify-after",
        type=int,
        help="write 'ready' to stdout after N events (0: once the log is open)",
    )
    parser.add_argument("--go-on-stdin", action="store_true", help="wait for a line on stdin")
    parser.add_argument("--tear-after", type=int, help="write half of the next line and hang")
    parser.add_argument("--die-in-listener", type=int, help="SIGKILL self in event N's listener")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="bound on the run")
    args = parser.parse_args(argv)
    if args.count < 0 or args.payload_bytes < 0 or not 0 < args.max_seconds <= 600:
        parser.error("--count and --payload-bytes must be >= 0, --max-seconds in (0, 600]")
    if args.tear_after is not None and not 0 <= args.tear_after < (args.count or 1 << 62):
        parser.error("--tear-after must be >= 0 and smaller than --count")
    configure_logging()
    emitted = run(
        args.log,
        count=args.count,
        tag=args.tag,
        payload_bytes=args.payload_bytes,
        durability=args.durability,
        notify_after=args.notify_after,
        go_on_stdin=args.go_on_stdin,
        tear_after=args.tear_after,
        die_in_listener=args.die_in_listener,
        max_seconds=args.max_seconds,
    )
    log.info("%s: emitted %d events to %s", args.tag, emitted, args.log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
