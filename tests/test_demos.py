"""Level 1's demo, run the way a learner runs it, and the `make demo` runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.events import Event
from common.storage import LineReader
from level_1_basic import demo_basic
from tools import run_demos

ROOT = Path(__file__).resolve().parents[1]


def test_level1_demo_names_each_listener_that_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "events.log"
    assert demo_basic.main(["--log-file", str(log)]) == 0
    out = capsys.readouterr().out
    blocks = out.split("emit ")[1:]
    ran = [
        (block.split()[0], [line.split()[0] for line in block.splitlines()[1:] if "->" in line])
        for block in blocks
    ]
    assert ran == [
        ("user.registered", ["email_sender", "logger", "analytics"]),
        ("order.created", ["analytics"]),
        ("user.registered", ["email_sender", "logger", "analytics"]),
        ("user.deleted", ["logger", "analytics"]),
        # after `unsubscribe email_sender`, the welcome email is no longer sent
        ("user.registered", ["logger", "analytics"]),
    ]
    assert "unsubscribe email_sender from user.registered: True" in out
    assert "summary: 5 events, 2 welcome emails" in out
    events = [Event.from_json(line) for _, line in LineReader(log)]
    assert [e.name for e in events] == [
        "user.registered",
        "order.created",
        "user.registered",
        "user.deleted",
        "user.registered",
    ]


def test_level1_demo_starts_a_fresh_log_unless_told_to_keep_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "events.log"
    demo_basic.main(["--log-file", str(log)])
    demo_basic.main(["--log-file", str(log)])
    assert len(list(LineReader(log))) == 5
    demo_basic.main(["--log-file", str(log), "--keep-log"])
    assert len(list(LineReader(log))) == 10
    demo_basic.main(["--no-log"])
    assert "event log:" not in capsys.readouterr().out.split("summary:")[-1]


@pytest.mark.parametrize(
    "command",
    [
        ["level_1_basic/demo_basic.py"],
        ["-m", "level_1_basic.demo_basic"],
    ],
)
def test_level1_demo_runs_both_ways(tmp_path: Path, command: list[str]) -> None:
    log = tmp_path / "events.log"
    proc = subprocess.run(
        [sys.executable, *command, "--log-file", str(log)],
        cwd=tmp_path if command[0] == "-m" else ROOT,  # -m works from any folder
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "email_sender -> welcome email to ann@example.com" in proc.stdout
    assert len(list(LineReader(log))) == 5


def test_demo_runner_reports_each_level(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demos.main(["--only", "level_1_basic"]) == 0
    out = capsys.readouterr().out
    assert "Level 1 (basic): demo_basic ok" in out


def test_demo_runner_fails_when_a_demo_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_demos, "DEMOS", [("Level 0", "json.tool", ["--no-such-option"])])
    assert run_demos.main([]) == 1
