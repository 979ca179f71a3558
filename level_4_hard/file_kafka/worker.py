"""Child processes for the demos and the crash tests, and a handle to drive them.

Crash safety can only be shown with real processes that really die, so the demos and the
tests start these roles with ``python -m level_4_hard.file_kafka.worker <role> ...`` and kill
them with SIGKILL (or they kill themselves at an exact point). Each role reports what it did
as JSON lines on stdout, which :class:`WorkerProcess` collects:

* ``produce`` — send ``--count`` records (optionally after a "go" line on stdin, so several
  producers start together), reporting each acknowledged offset with ``--print-acks``;
* ``tear`` — send ``--after`` records, then die in the middle of writing the next one while
  holding the partition lock (what a ``kill -9`` during ``write()`` leaves behind);
* ``member`` — a consumer-group member that processes records, commits after or before
  processing or automatically, and can SIGKILL itself after ``--crash-after`` records.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from common.events import InvalidEventError, dumps, loads
from common.logger import configure_logging
from common.waiting import wait_until
from level_4_hard.file_kafka.consumer import Consumer
from level_4_hard.file_kafka.partition import C_APPEND, DURABILITY_MODES
from level_4_hard.file_kafka.producer import Producer
from level_4_hard.file_kafka.records import Record, TopicPartition

__all__ = ["COMMIT_MODES", "WorkerProcess", "main"]

COMMIT_MODES = ("after", "before", "auto", "auto-async", "none")


def _say(**message: Any) -> None:
    sys.stdout.write(dumps(message).decode() + "\n")
    sys.stdout.flush()


def _die() -> None:
    """SIGKILL this process: no cleanup, no flush, no atexit; the kernel frees its locks."""
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# -- roles ---------------------------------------------------------------------------------
def run_produce(args: argparse.Namespace) -> int:
    with Producer(
        args.data_dir, partitions=args.partitions, durability=args.durability
    ) as producer:
        _say(ready=os.getpid(), c_append=C_APPEND)  # which append path this process runs
        if args.wait_go:
            sys.stdin.readline()
        started = time.monotonic()  # system-wide clock: comparable between processes
        # With --seconds, send until then (--count is the most): processes started together
        # stop together, so a rate is measured with all of them running to the end.
        deadline = started + args.seconds if args.seconds else float("inf")
        keys = [f"key-{i}" for i in range(args.keys)] if args.keys else [None]
        # Each producer walks the keys from its own random start: producers that started
        # together must not hit the same partitions in lockstep (real key streams do not).
        shift = random.randrange(len(keys))
        keys = keys[shift:] + keys[:shift]
        sent = 0
        if args.batch == 1:  # one send() per record: the per-record path under test
            send = producer.send
            topic = args.topic
            clock = time.monotonic
            seq = -1
            for seq in range(args.count):
                meta = send(topic, {"producer": args.tag, "seq": seq}, keys[seq % len(keys)])
                if args.print_acks:
                    _say(ack=[meta.partition, meta.offset])
                if not seq & 63 and clock() >= deadline:  # the clock every 64 records
                    break
            sent = seq + 1
        else:
            for start in range(0, args.count, args.batch):
                seqs = range(start, min(args.count, start + args.batch))
                metas = producer.send_many(
                    args.topic,
                    [{"producer": args.tag, "seq": seq} for seq in seqs],
                    [keys[seq % len(keys)] for seq in seqs],
                )
                if args.print_acks:
                    for meta in metas:
                        _say(ack=[meta.partition, meta.offset])
                sent += len(seqs)
                if time.monotonic() >= deadline:
                    break
    _say(done=sent, started=started, finished=time.monotonic())
    return 0


def run_tear(args: argparse.Namespace) -> int:
    with Producer(args.data_dir, partitions=args.partitions) as producer:
        for seq in range(args.after):
            meta = producer.send(args.topic, {"seq": seq}, partition=args.partition)
            _say(ack=[meta.partition, meta.offset])
        writer = producer._writer(args.topic, args.partition)
        with writer.locked():
            offset = writer._st[3]  # the next offset (see partition.py for the slots)
            line = b'{"offset":%d,"key":null,"id":"torn","event":"%s","data":{"pad":"%s"}}' % (
                offset,
                args.topic.encode(),
                b"x" * 200,
            )
            writer._st[1] = 1  # the dirty flag: a write is in flight
            os.write(writer._seg_fd, line[: len(line) // 2])  # half a record, no newline
            _say(tearing=offset)
            _die()
    return 1  # not reached


def run_member(args: argparse.Namespace) -> int:
    consumer = Consumer(
        args.group,
        data_dir=args.data_dir,
        auto_offset_reset=args.start,
        enable_auto_commit=args.commit in ("auto", "auto-async"),
        auto_commit_interval=args.auto_commit_interval,
        max_poll_records=args.max_records,
        heartbeat_interval=0.05,
        client_id=args.client_id,
    )
    processed = 0
    work: queue.Queue[Record] = queue.Queue()

    def process(record: Record) -> None:
        nonlocal processed
        if args.delay_ms:
            time.sleep(args.delay_ms / 1000)  # the simulated work of a real handler
        processed += 1
        _say(processed=[record.partition, record.offset])
        if args.crash_after and processed >= args.crash_after:
            _die()

    def on_assign(tps: list[TopicPartition]) -> None:
        _say(assigned=[[tp.topic, tp.partition, consumer.position(tp)] for tp in tps])

    def on_revoke(tps: list[TopicPartition]) -> None:
        _say(revoked=[[tp.topic, tp.partition] for tp in tps])

    def commit() -> None:
        positions = {
            str(tp.partition): consumer.position(tp) for tp in sorted(consumer.assignment())
        }
        _say(**{"commit-intent": positions})
        consumer.commit()
        _say(committed=positions)

    if args.commit == "auto-async":

        def drain() -> None:
            while True:
                process(work.get())

        threading.Thread(target=drain, daemon=True).start()

    _say(member=consumer.member_id)
    consumer.subscribe(args.topic, on_assign=on_assign, on_revoke=on_revoke)
    idle_since = time.monotonic()
    try:
        while time.monotonic() - idle_since < args.idle_exit:
            records = consumer.poll(timeout=0.1)
            if not records:
                continue
            idle_since = time.monotonic()
            if args.commit == "before":
                commit()
            for record in records:
                if args.commit == "auto-async":
                    work.put(record)
                else:
                    process(record)
            if args.commit == "after":
                commit()
    finally:
        consumer.close()
    _say(exit="idle", processed=processed)
    return 0


# -- the handle the parent uses --------------------------------------------------------------
class WorkerProcess:
    """A running worker role: its JSON-line messages, and ways to wait for, kill and reap it.

    Always ``close()`` it (or use ``with``): that kills the child if it still runs, reaps it,
    and closes the pipes.
    """

    def __init__(
        self, role_args: list[str], *, stdin: bool = False, env: dict[str, str] | None = None
    ) -> None:
        """``env``: variables added to this process's environment for the child."""
        self.args = role_args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "level_4_hard.file_kafka.worker", *role_args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        self.messages: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = loads(line)
            except InvalidEventError:
                message = None
            with self._lock:
                if isinstance(message, dict):
                    self.messages.append(message)
                else:
                    self.text.append(line.rstrip("\n"))

    def values(self, key: str) -> list[Any]:
        """Every value reported under ``key``, in order."""
        with self._lock:
            return [m[key] for m in self.messages if key in m]

    def wait_for(self, condition: Callable[[WorkerProcess], Any], timeout: float, what: str) -> Any:
        """Wait until ``condition(self)`` is truthy; fail early if the child died."""

        def check() -> Any:
            result = condition(self)
            if not result and self.proc.poll() is not None:
                self._reader.join(timeout=5)
                result = condition(self)
                if not result:
                    raise RuntimeError(
                        f"worker {self.args[:1]} exited with {self.proc.returncode} before "
                        f"{what}; output: {self.text[-20:]}"
                    )
            return result

        return wait_until(check, timeout, message=what)

    def send_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def kill(self) -> int:
        """SIGKILL the child (if it still runs) and reap it; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        """Wait for the child to exit; returns its exit status (-9 after a SIGKILL)."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.kill()
        self._reader.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)

    produce = roles.add_parser("produce", help="send records")
    produce.add_argument("--data-dir", required=True)
    produce.add_argument("--topic", required=True)
    produce.add_argument("--count", type=int, required=True)
    produce.add_argument("--partitions", type=int, default=1)
    produce.add_argument("--durability", choices=DURABILITY_MODES, default="flush")
    produce.add_argument("--keys", type=int, default=0, help="cycle through this many keys")
    produce.add_argument("--batch", type=int, default=1, help="records per send_many")
    produce.add_argument("--tag", default="p")
    produce.add_argument("--wait-go", action="store_true", help="start on a line from stdin")
    produce.add_argument("--seconds", type=float, default=0.0, help="stop sending after this")
    produce.add_argument("--print-acks", action="store_true")

    tear = roles.add_parser("tear", help="die in the middle of writing a record")
    tear.add_argument("--data-dir", required=True)
    tear.add_argument("--topic", required=True)
    tear.add_argument("--partitions", type=int, default=1)
    tear.add_argument("--partition", type=int, default=0)
    tear.add_argument("--after", type=int, default=5)

    member = roles.add_parser("member", help="a consumer-group member")
    member.add_argument("--data-dir", required=True)
    member.add_argument("--group", required=True)
    member.add_argument("--topic", required=True)
    member.add_argument("--commit", choices=COMMIT_MODES, default="after")
    member.add_argument("--start", choices=("earliest", "latest"), default="earliest")
    member.add_argument("--max-records", type=int, default=100)
    member.add_argument("--crash-after", type=int, default=0, help="SIGKILL self after N")
    member.add_argument("--delay-ms", type=float, default=0.0, help="work per record")
    member.add_argument("--idle-exit", type=float, default=60.0, help="exit after idle s")
    member.add_argument("--auto-commit-interval", type=float, default=0.0)
    member.add_argument("--client-id", default="member", help="member ids sort by it")

    args = parser.parse_args(argv)
    configure_logging(os.environ.get("EDA_LOG_LEVEL", "WARNING"))
    handler = {"produce": run_produce, "tear": run_tear, "member": run_member}[args.role]
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
