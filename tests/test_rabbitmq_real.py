"""Faults that need the real broker: ``kill -9`` of a worker process, a restart of the node.

Also the command lines a learner runs in three terminals (producer, two workers) and
``--broker auto`` finding the broker. Queue and exchange names are unique per test and
deleted afterwards; the restart test always restarts the node and waits for it, even when it
fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.events import Event, loads
from common.retry import Backoff
from common.waiting import wait_until
from level_3_advanced.rabbitmq_simulation import main as demo
from level_3_advanced.rabbitmq_simulation.broker import connect, probe
from level_3_advanced.rabbitmq_simulation.errors import AccessRefused
from level_3_advanced.rabbitmq_simulation.pika_channel import AsyncPublisher, connection_parameters
from level_3_advanced.rabbitmq_simulation.producer import UserRegistrationService
from level_3_advanced.rabbitmq_simulation.topology import declare_worker_queue, delete_topology
from level_3_advanced.rabbitmq_simulation.worker import Worker

pytestmark = pytest.mark.rabbitmq

DEADLINE = 20.0
WORKER_MODULE = "level_3_advanced.rabbitmq_simulation.consumer_email"


@pytest.fixture
def topology(rabbitmq_url: str, unique_name: str) -> Iterator[tuple[str, list[str]]]:
    """A unique exchange and the queues a test declares on it; all deleted afterwards."""
    exchange, queues = f"{unique_name}.events", [f"{unique_name}.email", f"{unique_name}.stats"]
    yield exchange, queues
    with connect(rabbitmq_url, name="test-cleanup") as channel:
        delete_topology(channel, exchange, queues)


@pytest.fixture
def processes() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start subprocesses; kill and reap whatever is still running afterwards."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            list(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=DEADLINE)


def journal_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [loads(line) for line in path.read_bytes().splitlines() if line.endswith(b"}")]


@pytest.mark.slow
def test_kill_9_of_a_worker_holding_unacked_messages_loses_nothing(
    rabbitmq_url: str,
    topology: tuple[str, list[str]],
    tmp_path: Path,
    python: str,
    processes: Callable[..., subprocess.Popen[str]],
) -> None:
    exchange, (queue, _) = topology
    journal = tmp_path / "email.jsonl"
    with connect(rabbitmq_url) as channel:
        declare_worker_queue(channel, queue, exchange=exchange)
    with UserRegistrationService.connect(rabbitmq_url, exchange=exchange) as service:
        ids = [service.register(f"u{i}@example.com", f"U {i}").event.id for i in range(40)]
    worker = [python, "-m", WORKER_MODULE, "--url", rabbitmq_url, "--exchange", exchange]
    worker += ["--queue", queue, "--journal", str(journal), "--prefetch", "10"]

    first = processes(*worker, "--work-ms", "25")
    wait_until(lambda: len(journal_records(journal)) >= 8, DEADLINE, message="8 handled")
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(DEADLINE) == -signal.SIGKILL
    handled_before = {r["id"] for r in journal_records(journal)}
    assert 8 <= len(handled_before) < 40
    with connect(rabbitmq_url) as channel:  # the unacked ones went back to the queue
        left = channel.queue_declare(queue, passive=True).method.message_count
    assert left >= 40 - len(handled_before)

    second = processes(*worker, "--max-messages", str(40 - len(handled_before)))
    assert second.wait(DEADLINE) == 0, second.stderr.read() if second.stderr else ""
    records = journal_records(journal)
    assert sorted(r["id"] for r in records) == sorted(ids)  # every event, each exactly once
    assert any(r["redelivered"] for r in records if r["id"] not in handled_before)
    with connect(rabbitmq_url) as channel:
        assert channel.queue_declare(queue, passive=True).method.message_count == 0


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def restartable_node(rabbitmq_url: str) -> Iterator[Callable[[], None]]:
    """``stop()`` stops the RabbitMQ application; it is always started again afterwards."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed: the broker's node cannot be restarted")

    def stop() -> None:
        result = _rabbitmqctl("stop_app")
        assert result.returncode == 0, result.stderr

    yield stop
    _rabbitmqctl("start_app")
    wait_until(lambda: probe(rabbitmq_url, timeout=1.0) is None, 60, message="RabbitMQ back")


@pytest.mark.slow
def test_workers_and_producer_ride_out_a_broker_restart_without_loss_or_duplicates(
    rabbitmq_url: str,
    topology: tuple[str, list[str]],
    restartable_node: Callable[[], None],
) -> None:
    exchange, queues = topology
    calls: dict[str, Counter[str]] = {q: Counter() for q in queues}

    def handler_for(queue: str) -> Callable[[Event], None]:
        def handle(event: Event) -> None:
            calls[queue][event.id] += 1

        return handle

    quick = Backoff(base=0.1, factor=2.0, cap=1.0)
    workers = [
        Worker(q, handler_for(q), target=rabbitmq_url, exchange=exchange, backoff=quick)
        for q in queues
    ]
    threads = [w.start() for w in workers]
    try:
        for w in workers:
            assert w.ready.wait(DEADLINE)
        service = UserRegistrationService.connect(
            rabbitmq_url, exchange=exchange, publish_timeout=30
        )
        regs = [service.register(f"a{i}@example.com", f"A {i}") for i in range(150)]
        restartable_node()  # stop_app, with publishes in flight and workers consuming
        regs += [service.register(f"b{i}@example.com", f"B {i}") for i in range(50)]
        assert _rabbitmqctl("start_app").returncode == 0
        regs += [service.register(f"c{i}@example.com", f"C {i}") for i in range(50)]
        service.close(timeout=30)  # flush: every publish confirmed after the reconnect
        confirmed = {r.event.id for r in regs if r.confirmed}
        assert len(confirmed) == 250
        channel = service.publisher.channel  # type: ignore[attr-defined]
        assert channel.publisher.reconnects >= 1, "the producer never lost its connection"
        wait_until(
            lambda: all(w.has_handled(i) for w in workers for i in confirmed),
            DEADLINE,
            message=lambda: (
                "both workers to handle all 250: "
                + ", ".join(f"{w.name}={w.stats.handled}" for w in workers)
            ),
        )
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(DEADLINE)
        for w in workers:
            w.close()
    for w in workers:
        assert w.stats.reconnects >= 1, f"{w.name} never lost its connection"
        assert set(calls[w.queue]) >= confirmed
        assert set(calls[w.queue].values()) == {1}, "an event was handled twice"


@pytest.mark.slow
def test_the_three_terminal_setup_producer_and_two_workers_as_processes(
    rabbitmq_url: str,
    topology: tuple[str, list[str]],
    tmp_path: Path,
    python: str,
    processes: Callable[..., subprocess.Popen[str]],
) -> None:
    exchange, (email_queue, stats_queue) = topology
    package = Path(demo.__file__).parent
    common = ["--url", rabbitmq_url, "--exchange", exchange, "--max-messages", "5"]
    email = processes(
        python, str(package / "consumer_email.py"), *common, "--queue", email_queue,
        "--journal", str(tmp_path / "email.jsonl"),
    )  # fmt: skip
    stats = processes(
        python, "-m", "level_3_advanced.rabbitmq_simulation.consumer_analytics", *common,
        "--queue", stats_queue, "--journal", str(tmp_path / "stats.jsonl"),
    )  # fmt: skip

    def bound() -> bool:  # both workers declared and bound their queues
        with connect(rabbitmq_url) as channel:
            for queue in (email_queue, stats_queue):
                try:
                    channel.queue_declare(queue, passive=True)
                except Exception:
                    return False
        return True

    wait_until(bound, DEADLINE, message="both worker queues")
    producer = processes(
        python, str(package / "producer.py"), "--url", rabbitmq_url, "--exchange", exchange,
        "--count", "5",
    )  # fmt: skip
    assert producer.wait(DEADLINE) == 0
    for proc in (email, stats):
        assert proc.wait(DEADLINE) == 0  # each exits after handling its 5
    assert "5 user.registered events confirmed" in (
        producer.stderr.read() if producer.stderr else ""
    )
    sent = journal_records(tmp_path / "email.jsonl")
    assert sorted(r["result"]["to"] for r in sent) == [f"user{i}@example.com" for i in range(5)]
    assert len(journal_records(tmp_path / "stats.jsonl")) == 5


def test_a_worker_stops_on_sigterm_and_acks_what_it_handled(
    rabbitmq_url: str,
    topology: tuple[str, list[str]],
    tmp_path: Path,
    python: str,
    processes: Callable[..., subprocess.Popen[str]],
) -> None:
    exchange, (queue, _) = topology
    journal = tmp_path / "email.jsonl"
    worker = processes(
        python, "-m", WORKER_MODULE, "--url", rabbitmq_url, "--exchange", exchange,
        "--queue", queue, "--journal", str(journal),
    )  # fmt: skip
    wait_until(lambda: _queue_consumers(rabbitmq_url, queue) == 1, DEADLINE, message="consumer")
    with UserRegistrationService.connect(rabbitmq_url, exchange=exchange) as service:
        for i in range(3):
            service.register(f"u{i}@example.com", f"U {i}")
    wait_until(lambda: len(journal_records(journal)) == 3, DEADLINE, message="3 handled")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(DEADLINE) == 0
    assert "SIGTERM received, stopping" in (worker.stderr.read() if worker.stderr else "")
    with connect(rabbitmq_url) as channel:
        assert channel.queue_declare(queue, passive=True).method.message_count == 0


def _queue_consumers(url: str, queue: str) -> int:
    with connect(url) as channel:
        try:
            return channel.queue_declare(queue, passive=True).method.consumer_count
        except Exception:
            return 0


def test_auto_uses_the_real_broker_and_says_so(
    rabbitmq_url: str, unique_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--broker", "auto", "--url", rabbitmq_url, "--count", "5", "--namespace", unique_name]
    try:
        assert demo.main(argv) == 0
    finally:
        with connect(rabbitmq_url, name="test-cleanup") as channel:
            queues = [f"{unique_name}.email_worker", f"{unique_name}.analytics_worker"]
            delete_topology(channel, f"{unique_name}.user_events", queues)
    captured = capsys.readouterr()
    assert "broker: RabbitMQ at" in captured.err
    assert "on the RabbitMQ broker" in captured.out
    assert f"{unique_name}.email_worker: handled 5" in captured.out


def test_bad_credentials_are_fatal_not_retried(rabbitmq_url: str) -> None:
    bad = rabbitmq_url.replace("guest:guest@", "guest:wrong@", 1)
    assert bad != rabbitmq_url, "the test expects guest:guest in RABBITMQ_URL"
    with pytest.raises(AccessRefused):
        connect(bad)
    worker = Worker("eda-test-bad-credentials", lambda e: None, target=bad)
    started = time.monotonic()
    try:
        with pytest.raises(AccessRefused):
            worker.run()
    finally:
        worker.close()
    assert worker.stats.reconnects == 0
    assert time.monotonic() - started < DEADLINE
    assert probe(bad, timeout=2.0) is not None
    publisher = AsyncPublisher(connection_parameters(bad), name="bad-credentials")
    try:
        confirmation = publisher.publish("", "nowhere", b"x")
        with pytest.raises(AccessRefused):
            confirmation.result(DEADLINE)
        with pytest.raises(AccessRefused):  # and every publish after it, at once
            publisher.publish("", "nowhere", b"y")
        assert publisher.reconnects == 0
    finally:
        publisher.close()
