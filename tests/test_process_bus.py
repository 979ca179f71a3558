"""ProcessEventBus beyond the contract: what processes change — pickling rules, exceptions that
come back from another process, a worker killed with SIGKILL, a poison event, backpressure,
and workers that outlive their parent."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.events import Event
from common.retry import Backoff
from common.waiting import wait_until
from level_2_intermediate.errors import (
    Level2Error,
    ListenerNotPicklableError,
    QueueFullError,
    RemoteListenerError,
    RemoteTraceback,
    WorkerDiedError,
)
from level_2_intermediate.eventbus_process import ProcessEventBus

FAST = Backoff(base=0.001, cap=0.005)


# -- listeners (importable: they run in worker processes) -----------------------------------
def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def record(event: Event) -> None:
    """Writes ``n pid`` to ``<dir>/done``."""
    _append(os.path.join(event.data["dir"], "done"), f"{event.data['n']} {os.getpid()}")


def hold_first(event: Event) -> None:
    """Event 0, on its first delivery, says where it runs and waits for ``<dir>/go``."""
    folder = event.data["dir"]
    started = os.path.join(folder, "started")
    first_time = not os.path.exists(started)
    _append(started, f"{event.data['n']} {os.getpid()}")
    if event.data["n"] == 0 and first_time:
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join(folder, "go")) and time.monotonic() < deadline:
            time.sleep(0.005)  # this listener simulates slow work; the test kills it meanwhile
    record(event)


def kill_own_process(event: Event) -> None:
    if event.data["n"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # a crash no Python code can catch
    record(event)


def call_sys_exit(event: Event) -> None:
    if event.data["n"] == 1:
        sys.exit(3)
    record(event)


class Unpicklable(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")  # args no longer match __init__: pickle fails


def raise_unpicklable(event: Event) -> None:
    raise Unpicklable(418, "teapot")


class Counter:
    """A picklable callable object: accepted, its state lives in each worker."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, event: Event) -> None:
        record(event)


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def make_bus() -> Iterator[Any]:
    buses: list[ProcessEventBus] = []

    def make(**options: Any) -> ProcessEventBus:
        options.setdefault("backoff", FAST)
        bus = ProcessEventBus(**options)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        bus.close(timeout=20)


def done_numbers(folder: Path) -> list[int]:
    path = folder / "done"
    return [int(line.split()[0]) for line in path.read_text().splitlines()] if path.exists() else []


# -- tests ----------------------------------------------------------------------------------
def test_listeners_that_cannot_reach_a_worker_are_refused_at_subscribe(make_bus) -> None:
    bus = make_bus(workers=1)
    lock = threading.Lock()

    def nested(event: Event) -> None:
        pass

    class Holder:
        def __init__(self) -> None:
            self.lock = lock

        def __call__(self, event: Event) -> None:
            pass

    for bad in (lambda e: None, nested, Holder()):
        with pytest.raises(ListenerNotPicklableError, match="module-level function") as info:
            bus.subscribe("job.run", bad)
        assert isinstance(info.value, TypeError) and isinstance(info.value, Level2Error)
    assert len(bus) == 0 and bus.alive_workers() == 0  # nothing subscribed, nothing started
    bus.subscribe("job.run", record)
    bus.subscribe("job.run", Counter("/tmp"))
    assert len(bus) == 2
    with pytest.raises(TypeError, match="cannot be sent"):
        pickle.dumps(bus)


def test_an_exception_comes_back_with_its_remote_traceback(make_bus, tmp_path) -> None:
    bus = make_bus(workers=1, max_retries=0)
    bus.subscribe("job.run", raise_unpicklable)
    bus.subscribe("job.run", record)
    bus.emit("job.run", {"n": 0, "dir": str(tmp_path)})
    assert bus.join(timeout=20)
    (letter,) = bus.dead_letters
    assert isinstance(letter.exception, RemoteListenerError)
    assert letter.exception.type_name == "Unpicklable"
    assert str(letter.exception) == "Unpicklable: 418: teapot"
    assert isinstance(letter.exception.__cause__, RemoteTraceback)
    assert "raise_unpicklable" in letter.exception.__cause__.text
    assert letter.listener == "raise_unpicklable" and letter.pattern == "job.run"
    assert bus.errors[0].exception is letter.exception
    assert done_numbers(tmp_path) == [0]  # the other listener was not affected


def test_a_worker_killed_with_sigkill_is_replaced_and_its_events_delivered(
    make_bus, tmp_path
) -> None:
    done: list[tuple[int, bool]] = []
    bus = make_bus(workers=1, on_done=lambda e, failed: done.append((e.data["n"], failed)))
    bus.subscribe("job.run", hold_first)
    for n in range(10):
        bus.emit("job.run", {"n": n, "dir": str(tmp_path)})
    started = tmp_path / "started"
    wait_until(started.exists, 20, message="event 0 to start in the worker")
    victim = int(started.read_text().split()[1])
    assert bus.worker_pids() == [victim]
    os.kill(victim, signal.SIGKILL)  # killed in the middle of event 0
    assert bus.join(timeout=30)
    lines = [line.split() for line in (tmp_path / "done").read_text().splitlines()]
    assert [int(n) for n, _ in lines] == list(range(10))  # event 0 again first, then the rest
    assert {int(pid) for _, pid in lines} == set(bus.worker_pids())
    assert victim not in bus.worker_pids() and bus.alive_workers() == 1
    assert list(bus.dead_letters) == []
    assert done == [(n, False) for n in range(10)]


def test_a_poison_event_that_kills_every_worker_is_dead_lettered(make_bus, tmp_path) -> None:
    bus = make_bus(workers=1, max_retries=1)
    bus.subscribe("job.run", kill_own_process)
    for n in range(5):
        bus.emit("job.run", {"n": n, "dir": str(tmp_path)})
    assert bus.join(timeout=30)
    assert done_numbers(tmp_path) == [0, 1, 3, 4]
    (letter,) = bus.dead_letters
    assert letter.event.data["n"] == 2 and letter.attempts == 2  # killed twice, then given up
    assert isinstance(letter.exception, WorkerDiedError)
    assert "exit code -9" in str(letter.exception)
    assert bus.alive_workers() == 1


def test_sys_exit_in_a_listener_ends_that_worker_without_redelivery(make_bus, tmp_path) -> None:
    bus = make_bus(workers=1)
    bus.subscribe("job.run", call_sys_exit)
    for n in range(4):
        bus.emit("job.run", {"n": n, "dir": str(tmp_path)})
    assert bus.join(timeout=30)
    assert done_numbers(tmp_path) == [0, 2, 3]
    (letter,) = bus.dead_letters
    assert isinstance(letter.exception, SystemExit) and letter.exception.code == 3
    assert letter.listener is None and letter.event.data["n"] == 1


def test_backpressure_raises_and_loses_nothing_accepted(make_bus, tmp_path) -> None:
    bus = make_bus(workers=1, maxsize=3, put_timeout=0.05)
    bus.subscribe("job.run", hold_first)
    accepted, refused = [], []
    for n in range(8):
        try:
            bus.emit("job.run", {"n": n, "dir": str(tmp_path)})
            accepted.append(n)
        except QueueFullError:
            refused.append(n)
    assert accepted == [0, 1, 2] and refused == [3, 4, 5, 6, 7]
    (tmp_path / "go").touch()
    assert bus.join(timeout=20)
    assert done_numbers(tmp_path) == [0, 1, 2]


def test_close_with_a_timeout_dead_letters_what_could_not_be_delivered(make_bus, tmp_path) -> None:
    bus = make_bus(workers=1)
    bus.subscribe("job.run", hold_first)
    for n in range(3):
        bus.emit("job.run", {"n": n, "dir": str(tmp_path)})
    wait_until((tmp_path / "started").exists, 20, message="event 0 to start")
    assert bus.close(timeout=0.2) is False
    assert sorted(d.event.data["n"] for d in bus.dead_letters) == [0, 1, 2]
    assert all(isinstance(d.exception, WorkerDiedError) for d in bus.dead_letters)
    assert bus.alive_workers() == 0 and bus.join(timeout=0)


def test_a_listener_module_missing_in_the_workers_becomes_a_dead_letter(
    make_bus, tmp_path, monkeypatch
) -> None:
    bus = make_bus(workers=1, max_retries=0).start()  # workers start with today's sys.path
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "late_plugin.py").write_text("def handle(event):\n    pass\n")
    monkeypatch.syspath_prepend(str(plugins))
    import late_plugin  # type: ignore[import-not-found]

    monkeypatch.setitem(sys.modules, "late_plugin", late_plugin)  # removed again afterwards
    bus.subscribe("job.run", late_plugin.handle)
    bus.subscribe("job.run", record)
    bus.emit("job.run", {"n": 0, "dir": str(tmp_path)})
    assert bus.join(timeout=20)
    (letter,) = bus.dead_letters
    assert isinstance(letter.exception, ModuleNotFoundError) and letter.listener == "handle"
    assert done_numbers(tmp_path) == [0]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to see processes end")
def test_workers_exit_when_their_parent_is_killed(tmp_path) -> None:
    code = textwrap.dedent(
        """
        import sys, time
        from level_2_intermediate.eventbus_process import ProcessEventBus
        from tests.test_process_bus import record
        if __name__ == "__main__":
            bus = ProcessEventBus(workers=2).start()
            print(*bus.worker_pids(), flush=True)
            time.sleep(60)  # waits to be killed
        """
    )
    script = tmp_path / "parent.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    parent = subprocess.Popen(  # its resource tracker warns about the kill: stderr muted
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        parent.kill()
        parent.wait(10)
        wait_until(lambda: all(_gone(p) for p in pids), 20, message="orphaned workers to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


def test_a_bus_never_closed_is_drained_at_interpreter_exit(tmp_path) -> None:
    code = textwrap.dedent(
        f"""
        from level_2_intermediate.eventbus_process import ProcessEventBus
        from tests.test_process_bus import record
        if __name__ == "__main__":
            bus = ProcessEventBus(workers=2)
            bus.subscribe("job.run", record)
            for n in range(30):
                bus.emit("job.run", {{"n": n, "dir": {str(tmp_path)!r}}})
            # no close(): the program just ends
        """
    )
    script = tmp_path / "forgetful.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(done_numbers(tmp_path)) == list(range(30))
