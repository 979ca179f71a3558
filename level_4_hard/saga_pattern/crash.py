"""A real crash on demand: run a saga in a subprocess, stop it at a known point, SIGKILL it.

The subprocess is ``python -m level_4_hard.saga_pattern ... run --pause-after EVENT[:STEP]``:
it prints ``PAUSED <saga_id> <event>`` once EVENT is on disk and on the bus, then blocks on its
stdin. :func:`start_paused` waits (with a deadline) for that line; :func:`kill9` sends SIGKILL
and reaps the process. Nothing is simulated: the process dies between two steps (or inside
one) exactly as it would on an OOM kill or a power loss of the container.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["PausedRun", "kill9", "start_paused"]


class PausedRun:
    """A saga subprocess stopped at its pause point; use as a context manager (it is always
    killed and reaped on exit)."""

    def __init__(self, proc: subprocess.Popen[str], paused_line: str) -> None:
        self.proc = proc
        self.paused_line = paused_line

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def saga_id(self) -> str:
        return self.paused_line.split()[1]

    def __enter__(self) -> PausedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        kill9(self.proc)


def _read_first_line(proc: subprocess.Popen[str], timeout: float) -> str | None:
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def reader() -> None:
        try:
            lines.put(stdout.readline())
        except (OSError, ValueError):  # the pipe was closed under us: the process is gone
            lines.put("")

    threading.Thread(target=reader, name="paused-line-reader", daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return None


def start_paused(
    data_dir: str | os.PathLike[str],
    pause_after: str,
    *run_args: str,
    style: str = "orchestration",
    durability: str = "flush",
    timeout: float = 30.0,
) -> PausedRun:
    """Start the saga subprocess and return once it has paused at ``pause_after``.

    The child's stderr (its log) goes to ``<data_dir>/paused-run.stderr``. Raises RuntimeError
    (quoting that log) if it exits or does not pause within ``timeout``.
    """
    command = [
        sys.executable,
        "-m",
        "level_4_hard.saga_pattern",
        "--data-dir",
        str(data_dir),
        "--style",
        style,
        "--durability",
        durability,
        "run",
        "--pause-after",
        pause_after,
        *run_args,
    ]
    folder = Path(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stderr_path = folder / "paused-run.stderr"
    with open(stderr_path, "w") as stderr:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    line = _read_first_line(proc, timeout)
    if not line or not line.startswith("PAUSED "):
        kill9(proc)
        raise RuntimeError(
            f"the saga subprocess did not pause at {pause_after} (first line {line!r}, exit "
            f"status {proc.returncode}); its stderr: {stderr_path.read_text()[-2000:]}"
        )
    return PausedRun(proc, line.strip())


def kill9(proc: subprocess.Popen[str], timeout: float = 30.0) -> int:
    """SIGKILL ``proc`` (if still alive), reap it, close its pipes; returns its exit status."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    code = proc.wait(timeout=timeout)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            stream.close()
    return code
