"""Retry policy, waiting, settings and logging from common/."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from common.config import Settings
from common.logger import JsonFormatter, configure_logging, get_logger
from common.retry import Backoff, retry_call
from common.waiting import wait_until


def test_backoff_grows_exponentially_and_is_capped() -> None:
    b = Backoff(base=0.1, factor=2, cap=1.0)
    assert [b.delay(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.delay(10_000) == 1.0  # no overflow on huge attempt numbers
    gen = b.delays()
    assert [next(gen) for _ in range(3)] == [0.1, 0.2, 0.4]
    jittered = Backoff(base=1, cap=8, jitter=True)
    assert jittered.delay(3, rng=lambda: 0.5) == 2.0
    with pytest.raises(ValueError):
        Backoff(factor=0.5)
    with pytest.raises(ValueError):
        b.delay(0)


def test_retry_call_retries_then_succeeds_without_real_sleeping() -> None:
    attempts: list[int] = []
    slept: list[float] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("later")
        return "ok"

    seen: list[int] = []
    result = retry_call(
        flaky,
        attempts=5,
        backoff=Backoff(base=0.5, cap=10),
        sleep=slept.append,
        on_retry=lambda n, exc, delay: seen.append(n),
    )
    assert result == "ok" and len(attempts) == 3
    assert slept == [0.5, 1.0] and seen == [1, 2]


def test_retry_call_raises_the_last_failure_and_skips_other_errors() -> None:
    slept: list[float] = []
    with pytest.raises(ConnectionError, match="3"):
        count = iter(range(1, 10))
        retry_call(
            lambda: (_ for _ in ()).throw(ConnectionError(str(next(count)))),
            attempts=3,
            sleep=slept.append,
        )
    assert len(slept) == 2
    with pytest.raises(KeyError):  # not in retry_on: raised at once
        retry_call(lambda: {}["x"], attempts=3, retry_on=(ConnectionError,), sleep=slept.append)
    assert len(slept) == 2
    with pytest.raises(ValueError):
        retry_call(lambda: None, attempts=0)


def test_wait_until_returns_the_value_or_times_out() -> None:
    values = iter([0, 0, 7])
    assert wait_until(lambda: next(values), timeout=5) == 7
    with pytest.raises(TimeoutError, match="the moon"):
        wait_until(lambda: False, timeout=0.05, message="the moon")


def test_settings_defaults_env_file_and_environment(tmp_path: Path) -> None:
    assert Settings.load(env_file=None, environ={}) == Settings()
    env_file = tmp_path / ".env"
    env_file.write_text("RABBITMQ_URL=amqp://u:p@h:1/\nEDA_DATA_DIR=/tmp/x\n# comment\n")
    s = Settings.load(env_file, environ={"EDA_DATA_DIR": "/from/env"})
    assert s.rabbitmq_url == "amqp://u:p@h:1/"  # from .env
    assert s.eda_data_dir == "/from/env"  # the environment wins
    assert s.data_dir == Path("/from/env")
    with pytest.raises(ValueError, match="EDA_LOG_FORMAT"):
        Settings.load(None, environ={"EDA_LOG_FORMAT": "xml"})


def test_env_example_lists_every_setting() -> None:
    text = (Path(__file__).resolve().parents[1] / ".env.example").read_text()
    keys = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line and line[0] != "#"}
    for field in Settings.__dataclass_fields__:
        assert field.upper() in keys
    defaults = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert Settings.load(None, environ=defaults) == Settings()


def test_get_logger_namespaces_under_eda() -> None:
    assert get_logger("x.y").name == "eda.x.y"
    assert get_logger("eda.z").name == "eda.z"


def test_json_log_format_is_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = configure_logging("INFO", "json")
    try:
        log = get_logger("test.json")
        log.info("hello %s", "world", extra={"event_id": "e-1"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        lines = capsys.readouterr().err.strip().splitlines()
        first, second = (json.loads(line) for line in lines)
        assert first["message"] == "hello world" and first["event_id"] == "e-1"
        assert first["level"] == "INFO" and first["logger"] == "eda.test.json"
        assert "ValueError: boom" in second["exception"]
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.propagate = True
        root.setLevel(logging.NOTSET)
    with pytest.raises(ValueError, match="EDA_LOG_FORMAT"):
        configure_logging(fmt="xml")
    assert isinstance(JsonFormatter(), logging.Formatter)
