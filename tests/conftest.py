"""Shared fixtures: real-service URLs with skip-or-fail, and temporary data directories.

Tests that need a real server take the ``rabbitmq_url`` or ``redis_url`` fixture and carry the
matching marker. When the server does not answer they skip with the reason, unless
``EDA_REQUIRE_SERVICES=1`` (set by ``.ci/run``), where an unreachable server fails the test.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pytest

if TYPE_CHECKING:
    from level_4_hard.file_kafka.worker import WorkerProcess

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("EDA_REQUIRE_SERVICES", "0") == "1"


def _reachable(url: str, default_port: int, timeout: float = 1.0) -> str | None:
    """None if something accepts a TCP connection at the URL's host:port, else the reason."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} does not answer ({exc})"


def _service_url(url: str, default_port: int, name: str) -> str:
    reason = _reachable(url, default_port)
    if reason is None:
        return url
    if REQUIRE_SERVICES:
        pytest.fail(f"{name} is required (EDA_REQUIRE_SERVICES=1) but {reason}")
    pytest.skip(f"{name} not available: {reason}")


@pytest.fixture(autouse=True)
def _restore_eda_logging() -> Iterator[None]:
    """A demo's main() configures the ``eda`` logger (handler, level, no propagation): undo it
    after each test, so that later tests' caplog sees their records."""
    logger = logging.getLogger("eda")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:] = handlers
    logger.propagate = propagate
    logger.setLevel(level)


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    return _service_url(RABBITMQ_URL, 5672, "RabbitMQ")


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _service_url(REDIS_URL, 6379, "Redis")


@pytest.fixture
def unique_name() -> str:
    """A short unique suffix for broker objects (queues, exchanges, stream keys) of one test."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh EDA_DATA_DIR for one test."""
    path = tmp_path / "data"
    path.mkdir()
    monkeypatch.setenv("EDA_DATA_DIR", str(path))
    yield path


@pytest.fixture
def kdir(data_dir: Path) -> Path:
    """The file-Kafka data directory of one test (inside ``data_dir``)."""
    return data_dir / "kafka"


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """File-Kafka worker processes a test starts (append them): each closed afterwards."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.close()  # kills the child if it still runs, reaps it, closes its pipes


@pytest.fixture(scope="session")
def python() -> str:
    """The interpreter to start subprocesses with (the one running the tests)."""
    return sys.executable
