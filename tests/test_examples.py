"""The runnable scripts: examples/ and the Level 2 queue demo, through their ``main()`` (what a
user sees) and, once each, started both ways a learner would start them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from examples import error_handling, multiple_workers, simple_pub_sub
from level_2_intermediate import demo_queue

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bus", ["sync", "thread"])
def test_simple_pub_sub_delivers_to_exact_and_wildcard_listeners(capsys, bus: str) -> None:
    assert simple_pub_sub.main(["--bus", bus, "--count", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"bus: {bus}",
        "  welcome email to user0@example.com",
        "  audit: user.registered {'user_id': 0, 'email': 'user0@example.com'}",
        "  metrics: +1 user.registered",
        "  welcome email to user1@example.com",
        "  audit: user.registered {'user_id': 1, 'email': 'user1@example.com'}",
        "  metrics: +1 user.registered",
        "  metrics: +1 order.created",
        "3 events emitted, 0 listener errors",
    ]


def test_multiple_workers_prints_a_table_for_each_worker_count(capsys) -> None:
    assert multiple_workers.main(["--events", "60", "--sleep-ms", "1", "--workers", "1", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "60 events, listener sleeps 1.0 ms (simulated I/O)"
    rows = [line.split("|")[1:-1] for line in out[3:]]
    assert [int(r[0]) for r in rows] == [1, 4]
    assert rows[0][2].strip() == "1.0x" and rows[1][2].strip().endswith("x")
    assert multiple_workers.measure(2, 10, 0.0) > 0  # every event handled, or it raises


def test_multiple_workers_refuses_bad_options(capsys) -> None:
    for args in (["--workers", "0"], ["--sleep-ms", "-1"], ["--events", "0"]):
        with pytest.raises(SystemExit) as info:
            multiple_workers.main(args)
        assert info.value.code == 2
    capsys.readouterr()


def test_error_handling_isolates_retries_and_dead_letters(capsys) -> None:
    outcome = error_handling.run(events=4, max_retries=2, write=lambda text: None)
    assert outcome["ledger"] == [0, 1, 2, 3]  # never blocked by the failing listeners
    names = {name for name, _, _ in outcome["dead_letters"]}
    assert len(names) == 1 and names.pop().endswith("fraud_check")
    assert [(n, attempts) for _, n, attempts in outcome["dead_letters"]] == [(2, 3), (3, 3)]
    assert outcome["errors"] == 2 and outcome["alive"] == 1
    assert error_handling.main(["--events", "3", "--max-retries", "1"]) == 0
    out = capsys.readouterr().out
    assert "receipt      ok   payment 0 (attempt 3)" not in out  # only one retry allowed
    assert "dead letters (4), each also in bus.errors:" in out  # 3 receipts, 1 fraud_check
    assert "worker alive at the end: True" in out


def test_demo_queue_shows_backpressure_retries_and_dead_letters(capsys) -> None:
    outcome = demo_queue.run(
        events=30, workers=1, maxsize=5, work_seconds=0.002, put_timeout=5, write=lambda t: None
    )
    assert outcome["thumbnails"] == list(range(30))
    assert outcome["dead_letters"] == [n for n in range(30) if n % 7 == 6]
    assert outcome["audited"] == [n for n in range(30) if n % 7 != 6]
    assert outcome["retried_ok"] == len([n for n in range(30) if n % 5 == 4 and n % 7 != 6])
    assert outcome["alive_workers"] == 1
    assert (outcome["burst_accepted"], outcome["burst_refused"]) == (5, 5)
    assert outcome["producer_blocked_s"] > 0  # the producer had to wait for room
    assert demo_queue.main(["--events", "12", "--maxsize", "4", "--work-ms", "1"]) == 0
    out = capsys.readouterr().out
    assert "the queue is full (backpressure)" in out
    assert "photo-006.jpg: UploadPipeline.audit, 3 attempts, PermissionError" in out
    assert "4 accepted (and delivered), 4 refused with QueueFullError" in out


@pytest.mark.parametrize(
    ("script", "module", "args"),
    [
        ("examples/simple_pub_sub.py", "examples.simple_pub_sub", ["--count", "1"]),
        (
            "examples/multiple_workers.py",
            "examples.multiple_workers",
            ["--events", "5", "--workers", "1"],
        ),
        ("examples/error_handling.py", "examples.error_handling", ["--events", "1"]),
        (
            "level_2_intermediate/demo_queue.py",
            "level_2_intermediate.demo_queue",
            ["--events", "5", "--work-ms", "1", "--maxsize", "2"],
        ),
    ],
)
def test_scripts_run_both_ways(tmp_path, script: str, module: str, args: list[str]) -> None:
    for command, cwd in (([str(ROOT / script)], ROOT), (["-m", module], tmp_path)):
        proc = subprocess.run(
            [sys.executable, *command, *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip()
