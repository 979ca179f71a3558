"""The webhook receiver as a real process: waitress on a free loopback port, the signed sender,
``kill -9`` in the middle of a burst, a disk that fills up, and the curl script.

After every fault the same property is checked on the files: every message the sender got a
202 for is in accepted.log, every accepted event is handled exactly once (one handled line,
one email), and a retry with the same webhook-id never makes a second event.
"""

from __future__ import annotations

import base64
import http.client
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.events import loads
from common.retry import Backoff
from common.storage import LineReader
from common.waiting import wait_until
from level_3_advanced.webhook.sign import DeliveryError, WebhookSender
from level_3_advanced.webhook.webhook_server import create_app

SECRET = "whsec_" + base64.b64encode(b"server-process-test-key-0123456789").decode()
SERVER = "level_3_advanced.webhook.webhook_server"
REPO = Path(__file__).resolve().parents[1]
# Runs the server with a file-size limit: writes past it fail with EFBIG (a full disk).
LIMITED = (
    "import resource, runpy, signal, sys; "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "limit = int(sys.argv[1]); "
    "hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]; "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard)); "
    "sys.argv = [sys.argv[0], *sys.argv[2:]]; "
    f"runpy.run_module('{SERVER}', run_name='__main__')"
)


class ServerProcess:
    """``python -m ...webhook_server`` on port 0; its log is collected through a pipe."""

    count = 0

    def __init__(
        self,
        tmp_path: Path,
        data_dir: Path,
        *args: str,
        fsize: int | None = None,
        server: str = "waitress",
    ) -> None:
        ServerProcess.count += 1
        self.port_file = tmp_path / f"port-{ServerProcess.count}"
        argv = [
            "--server",
            server,
            "--port",
            "0",
            "--port-file",
            str(self.port_file),
            "--data-dir",
            str(data_dir),
            "--secret",
            SECRET,
            *args,
        ]
        if fsize is None:
            cmd = [sys.executable, "-m", SERVER, *argv]
        else:
            cmd = [sys.executable, "-c", LIMITED, str(fsize), *argv]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path
        )
        self.output: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(
            lambda: self.port_file.exists() or self.proc.poll() is not None,
            30.0,
            message=lambda: f"the server to listen; log:\n{self.log}",
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log}")
        self.port = int(self.port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}/webhook/order"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.output.append(line)

    @property
    def log(self) -> str:
        return b"".join(self.output).decode(errors="replace")

    def get(self, path: str) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, loads(response.read())
        finally:
            conn.close()

    def wait_idle(self, timeout: float = 30.0) -> dict[str, Any]:
        def idle() -> dict[str, Any] | None:
            _, health = self.get("/health")
            done = health["unhandled"] == 0 and health["queue_depth"] == 0 and not health["backlog"]
            return health if done else None

        return wait_until(idle, timeout, message="the server to handle every accepted event")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:  # only the processes this test started, always reaped
        if server.proc.poll() is None:
            server.proc.kill()
        server.stop(signal.SIGKILL)


def records(path: Path) -> list[dict[str, Any]]:
    return [loads(line) for _, line in LineReader(path)] if path.exists() else []


def assert_exactly_once(data_dir: Path, msg_ids: list[str], acknowledged: dict[str, str]) -> None:
    """The property every fault test ends with (see the module docstring)."""
    accepted = records(data_dir / "accepted.log")
    handled = records(data_dir / "handled.log")
    ids = [r["id"] for r in accepted]
    keys = Counter(r["data"]["idempotency_key"] for r in accepted)
    assert len(ids) == len(set(ids))
    assert sorted(keys) == sorted(msg_ids), "every message is accepted once, none twice"
    assert set(keys.values()) == {1}
    by_key = {r["data"]["idempotency_key"]: r["id"] for r in accepted}
    for msg_id, event_id in acknowledged.items():  # what a 202/200 promised is on disk
        assert by_key[msg_id] == event_id
    handled_ids = [r["data"]["event_id"] for r in handled]
    assert Counter(handled_ids) == Counter(ids), "every accepted event handled exactly once"
    emails = Counter(
        e["event_id"] for r in handled for e in r["data"]["effects"] if e["kind"] == "email"
    )
    assert emails == Counter(ids), "exactly one email per order.created"
    assert not any(r["data"]["failed"] for r in handled)


def send_all(
    url: str, messages: dict[str, dict[str, Any]], attempts: int = 3
) -> dict[str, tuple[int, str]]:
    """Send every message (sequentially, with retries); msg_id -> (status, event_id)."""
    out: dict[str, tuple[int, str]] = {}
    with WebhookSender(url, SECRET, attempts=attempts, backoff=Backoff(0.05, cap=0.5)) as sender:
        for msg_id, payload in messages.items():
            result = sender.send(payload, msg_id=msg_id)
            out[msg_id] = (result.status, result.body.get("event_id", ""))
    return out


@pytest.mark.parametrize("kind", ["waitress", "dev"])
def test_end_to_end_real_server(tmp_path: Path, servers: list[ServerProcess], kind: str) -> None:
    data_dir = tmp_path / "data"
    server = ServerProcess(tmp_path, data_dir, server=kind)
    servers.append(server)
    status, health = server.get("/health")
    assert status == 200 and health["signatures"] is True
    answers = send_all(server.url, {"msg_a": {"order_id": 777, "status": "created"}})
    assert answers["msg_a"][0] == 202
    server.wait_idle()
    _, metrics = server.get("/metrics")
    assert (metrics["accepted"], metrics["handled"], metrics["orders"]["emails"]) == (1, 1, 1)
    assert server.stop() == 0, server.log  # SIGTERM: a clean shutdown
    assert "stopped" in server.log
    assert_exactly_once(data_dir, ["msg_a"], {"msg_a": answers["msg_a"][1]})


@pytest.mark.slow
def test_kill_9_after_202s_then_restart_handles_each_exactly_once(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    data_dir = tmp_path / "data"
    # Slow "email" so that events are still queued when the process is killed.
    first = ServerProcess(tmp_path, data_dir, "--email-delay", "0.2", "--threads", "8")
    servers.append(first)
    messages = {f"msg_{i:03d}": {"order_id": i + 1, "status": "created"} for i in range(80)}
    todo = list(messages)
    acknowledged: dict[str, str] = {}
    lock = threading.Lock()
    killed = threading.Event()

    def client() -> None:
        with WebhookSender(first.url, SECRET, attempts=1, timeout=10) as sender:
            while not killed.is_set():
                with lock:
                    if not todo:
                        return
                    msg_id = todo.pop()
                try:
                    result = sender.send(messages[msg_id], msg_id=msg_id)
                except DeliveryError:
                    return  # the server is gone
                if result.status == 202:
                    with lock:
                        acknowledged[msg_id] = result.body["event_id"]

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acknowledged) >= 40, 60.0, message="40 answers of 202")
    os.kill(first.proc.pid, signal.SIGKILL)  # right after answering: no cleanup at all
    killed.set()
    for t in threads:
        t.join(30)
    assert first.stop() == -signal.SIGKILL
    with lock:
        promised = dict(acknowledged)
    at_kill = records(data_dir / "accepted.log")
    handled_at_kill = records(data_dir / "handled.log")
    assert {r["id"] for r in at_kill} >= set(promised.values()), "a 202 without its record"
    assert len(handled_at_kill) < len(at_kill), "nothing was left to recover: test is vacuous"

    second = ServerProcess(tmp_path, data_dir)
    servers.append(second)
    _, metrics = second.get("/metrics")
    assert metrics["recovered"] == len(at_kill) - len(handled_at_kill)
    # The sender retries what it never got an answer for, with the same ids.
    retried = send_all(second.url, {m: p for m, p in messages.items() if m not in promised})
    assert {status for status, _ in retried.values()} <= {200, 202}
    for msg_id, (status, _) in retried.items():
        # 200 exactly for the messages whose line reached the file before the kill
        was_recorded = any(r["data"]["idempotency_key"] == msg_id for r in at_kill)
        assert (status == 200) == was_recorded
    second.wait_idle()
    assert second.stop() == 0, second.log
    everything = {**promised, **{m: e for m, (_, e) in retried.items()}}
    assert_exactly_once(data_dir, list(messages), everything)


@pytest.mark.slow
def test_full_disk_answers_503_then_nothing_is_lost(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    data_dir = tmp_path / "data"
    limited = ServerProcess(tmp_path, data_dir, fsize=4000)
    servers.append(limited)
    messages = {f"msg_{i:02d}": {"order_id": i + 1, "status": "created"} for i in range(40)}
    answers: dict[str, tuple[int, str]] = {}
    with WebhookSender(limited.url, SECRET, attempts=1) as sender:
        for msg_id, payload in messages.items():
            try:
                result = sender.send(payload, msg_id=msg_id)
            except DeliveryError as exc:  # 503 is worth a retry, but attempts=1
                answers[msg_id] = (exc.last_status or 0, "")
            else:
                answers[msg_id] = (result.status, result.body["event_id"])
    statuses = [status for status, _ in answers.values()]
    assert statuses[0] == 202 and statuses[-1] == 503
    assert set(statuses) == {202, 503}
    status, health = limited.get("/health")
    assert status == 503 and health["status"] == "storage failed"
    _, metrics = limited.get("/metrics")
    assert metrics["rejected"]["storage"] == statuses.count(503)
    assert limited.stop() == 0, limited.log

    second = ServerProcess(tmp_path, data_dir)  # room on the disk again
    servers.append(second)
    refused = {m: p for m, p in messages.items() if answers[m][0] == 503}
    retried = send_all(second.url, refused)
    assert {status for status, _ in retried.values()} <= {200, 202}
    second.wait_idle()
    assert second.stop() == 0
    acknowledged = {m: e for m, (s, e) in answers.items() if s == 202}
    acknowledged.update({m: e for m, (_, e) in retried.items()})
    assert_exactly_once(data_dir, list(messages), acknowledged)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_script(tmp_path: Path, servers: list[ServerProcess]) -> None:
    server = ServerProcess(tmp_path, tmp_path / "data")
    servers.append(server)
    script = REPO / "level_3_advanced" / "webhook" / "test_webhook.sh"
    env = {
        **os.environ,
        "WEBHOOK_URL": server.url,
        "WEBHOOK_SECRET": SECRET,
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    codes = [line.split("->")[1].split()[0] for line in done.stdout.splitlines()]
    assert codes == ["202", "200", "400", "401", "401"], done.stdout
    assert "too old" in done.stdout


def test_demo_runs_as_a_file_path(tmp_path: Path) -> None:
    demo = REPO / "level_3_advanced" / "webhook" / "demo.py"
    done = subprocess.run(
        [sys.executable, str(demo), "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "-> 202" in done.stdout and "workers handled 2 event(s)" in done.stdout


def test_health_starts_the_service_when_it_is_the_first_request(tmp_path: Path) -> None:
    """Under a WSGI server the health check may be a worker's first request: it must not say
    "ok" before recovery has run."""
    app = create_app({"WEBHOOK_DATA_DIR": str(tmp_path / "webhook"), "WEBHOOK_SECRET": ""})
    service = app.extensions["webhook"]
    assert not service.started
    with app.test_client() as client:
        response = client.get("/health")
    assert response.status_code == 200 and response.get_json()["status"] == "ok"
    assert service.started
    service.close()
