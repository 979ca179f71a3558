"""docker/docker-compose.yml and docker/Dockerfile, parsed and checked against the repository.

No Docker engine is needed: the files are read as data, and every entry point they name is
checked to exist and to start (``--help``) with this interpreter.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
SERVICES = COMPOSE["services"]


def _instructions() -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line[:-1]}" if line.endswith("\\") else f"{pending} {line}"
        if not line.endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            pending = ""
    return out


def _python_module(command: list[str]) -> str:
    assert command[:2] == ["python", "-m"], f"expected `python -m module`, got {command}"
    return command[2]


def test_compose_has_the_servers_and_the_application() -> None:
    assert {"rabbitmq", "redis", "webhook", "email_worker", "analytics_worker"} <= set(SERVICES)
    assert "management" in SERVICES["rabbitmq"]["image"]
    assert SERVICES["redis"]["image"].startswith("redis:")


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck_or_waits_for_one(name: str) -> None:
    service = SERVICES[name]
    depends = service.get("depends_on", {})
    waits_for_health = any(
        isinstance(cond, dict) and cond.get("condition") == "service_healthy"
        for cond in (depends.values() if isinstance(depends, dict) else [])
    )
    assert "healthcheck" in service or waits_for_health, name
    if "healthcheck" in service:
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_published_ports_stay_on_loopback(name: str) -> None:
    for port in SERVICES[name].get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_the_standard_ports() -> None:
    assert "127.0.0.1:5672:5672" in SERVICES["rabbitmq"]["ports"]
    assert "127.0.0.1:15672:15672" in SERVICES["rabbitmq"]["ports"]
    assert "127.0.0.1:6379:6379" in SERVICES["redis"]["ports"]
    assert "127.0.0.1:5000:5000" in SERVICES["webhook"]["ports"]


@pytest.mark.parametrize("name", ["webhook", "email_worker", "analytics_worker"])
def test_application_services_run_modules_of_this_repository(name: str) -> None:
    service = SERVICES[name]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert (ROOT / "docker" / service["build"]["context"] / "docker" / "Dockerfile").is_file()
    module = _python_module(service["command"])
    assert importlib.util.find_spec(module) is not None, module
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout


@pytest.mark.parametrize("name", ["email_worker", "analytics_worker"])
def test_workers_reach_the_broker_by_its_service_name(name: str) -> None:
    env = SERVICES[name]["environment"]
    assert env["RABBITMQ_URL"] == "amqp://guest:guest@rabbitmq:5672/"
    assert SERVICES[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


def test_webhook_healthcheck_asks_the_health_route() -> None:
    test = " ".join(SERVICES["webhook"]["healthcheck"]["test"])
    assert "/health" in test
    command = SERVICES["webhook"]["command"]
    assert command[command.index("--host") + 1] == "0.0.0.0"  # reachable through the port map
    assert command[command.index("--server") + 1] == "waitress"


def test_dockerfile_is_slim_non_root_and_installs_requirements() -> None:
    steps = _instructions()
    keywords = [k for k, _ in steps]
    assert steps[0][0] == "FROM" and "slim" in steps[0][1]
    user = [args for k, args in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    runs = " ".join(args for k, args in steps if k == "RUN")
    assert "pip install -r requirements.txt" in runs
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")


def test_dockerfile_copies_what_exists_and_its_command_runs() -> None:
    steps = _instructions()
    for keyword, args in steps:
        if keyword == "COPY":
            *sources, _dest = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    copied = {s for k, a in steps if k == "COPY" for s in shlex.split(a)[:-1]}
    for package in ("common", "level_1_basic", "level_2_intermediate", "level_3_advanced"):
        assert package in copied
    cmd = [args for k, args in steps if k == "CMD"][-1]
    module = _python_module(yaml.safe_load(cmd))  # the exec form is a JSON list
    assert importlib.util.find_spec(module) is not None
