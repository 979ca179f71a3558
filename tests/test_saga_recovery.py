"""Level 4 saga: the saga log on disk, recover() after a crash (in process and by a real
``kill -9`` of a subprocess), one owner per log, and the CLI (``retry``, ``recover``, ``status``,
``diagram``)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from level_4_hard.saga_pattern.__main__ import main as cli_main
from level_4_hard.saga_pattern.bootstrap import SagaApp, bootstrap
from level_4_hard.saga_pattern.clock import FakeClock
from level_4_hard.saga_pattern.crash import kill9, start_paused
from level_4_hard.saga_pattern.diagram import load_events
from level_4_hard.saga_pattern.errors import SagaError, SagaLogBusy, SagaLogError
from level_4_hard.saga_pattern.saga_orchestrator import (
    SagaOrchestrator,
    SagaStatus,
    SagaStep,
    run_order,
)
from level_4_hard.saga_pattern.scenarios import arm, scenario_order
from level_4_hard.saga_pattern.shop import build_shop, make_order

SAGA = "order-1"


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing in the saga catches it."""


def open_app(data: Path) -> SagaApp:
    return bootstrap(data, clock=FakeClock(), durability="flush")


def die_after(app: SagaApp, service: str, method: str) -> None:
    """Make ``service.method`` take effect, then 'kill the process' before it can answer."""
    target = getattr(app.shop, service)
    real = getattr(target, method)

    def dying(*args: Any) -> Any:
        real(*args)
        raise Crash(f"killed inside {service}.{method}")

    setattr(target, method, dying)


def saga_log(data: Path) -> list[Any]:
    return load_events(data / "saga_logs" / "order.jsonl", SAGA)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """main() configures the 'eda' logger; put it back as it was for the next tests."""
    logger = logging.getLogger("eda")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


# -- the saga log ----------------------------------------------------------------------------------
def test_each_step_is_in_the_log_on_disk_before_it_runs(tmp_path: Path) -> None:
    seen: list[str] = []

    def look(name: str):
        def action(ctx: dict[str, Any]) -> None:
            last = (tmp_path / "saga.jsonl").read_bytes().splitlines()[-1]
            record = orjson.loads(last)
            seen.append(f"{record['event']}:{record['data']['step']}")

        return SagaStep(name, action)

    with SagaOrchestrator([look("a"), look("b")], log_dir=tmp_path, durability="flush") as saga:
        assert saga.run().ok
    assert seen == ["saga.step_started:a", "saga.step_started:b"]


def test_recover_calls_the_step_that_was_in_flight_again_and_it_takes_effect_once(
    tmp_path: Path,
) -> None:
    with open_app(tmp_path) as app:
        die_after(app, "orders", "confirm")  # confirmed on the ledger, never logged as done
        with pytest.raises(Crash):
            run_order(app.orchestrator, make_order("1"))
    with open_app(tmp_path) as app:
        saga = app.orchestrator
        assert saga is not None
        before = saga.sagas()[0]
        assert before.status is SagaStatus.RUNNING and before.in_flight == "confirm_order"
        results = saga.recover()
        assert [r.status for r in results] == [SagaStatus.COMPLETED]
        assert all(n == 1 for n in app.shop.effects(SAGA).values())
        assert app.shop.snapshot()["deliveries"] == {SAGA: "scheduled"}
        assert saga.recover() == []  # nothing is in flight any more
    names = [e.name for e in saga_log(tmp_path)]
    assert names.count("saga.resumed") == 1
    started = [e.data["step"] for e in saga_log(tmp_path) if e.name == "saga.step_started"]
    assert started.count("confirm_order") == 2  # called again...
    resumed = next(e for e in saga_log(tmp_path) if e.name == "saga.resumed")
    assert resumed.data["in_flight"] == "confirm_order"  # ...because it was in flight


def test_recover_carries_on_with_the_compensations_of_a_saga_that_was_compensating(
    tmp_path: Path,
) -> None:
    with open_app(tmp_path) as app:
        arm(app.shop, "delivery-fails")
        die_after(app, "payments", "refund")
        with pytest.raises(Crash):
            run_order(app.orchestrator, make_order("1"))
    with open_app(tmp_path) as app:
        assert app.orchestrator is not None
        assert app.orchestrator.get(SAGA).status is SagaStatus.COMPENSATING
        [result] = app.orchestrator.recover()
        assert result.status is SagaStatus.COMPENSATED
        assert result.compensated == (
            "schedule_delivery",
            "reserve_funds",
            "reserve_stock",
            "create_order",
        )
        effects = app.shop.effects(SAGA)
        assert effects["payment.refunded"] == 1 and all(n == 1 for n in effects.values())
        assert app.shop.snapshot()["balances"]["ann"] == 100_000


def test_recover_leaves_finished_and_parked_sagas_alone(tmp_path: Path) -> None:
    with open_app(tmp_path) as app:
        saga = app.orchestrator
        assert saga is not None
        assert run_order(saga, make_order("1")).ok
        arm(app.shop, "refund-fails")
        assert run_order(saga, make_order("2")).status is SagaStatus.FAILED
        app.shop.deliveries.faults.clear()
        app.shop.payments.faults.clear()
        die_after(app, "deliveries", "schedule")
        with pytest.raises(Crash):
            run_order(saga, make_order("3"))
    with open_app(tmp_path) as app:
        assert app.orchestrator is not None
        results = app.orchestrator.recover()
        assert [(r.saga_id, r.status) for r in results] == [("order-3", SagaStatus.COMPLETED)]
        assert app.orchestrator.get("order-2").status is SagaStatus.FAILED


def test_one_live_orchestrator_owns_a_saga_log(tmp_path: Path) -> None:
    busy = r"owned by another live orchestrator \(pid \d+\)"
    with open_app(tmp_path), pytest.raises(SagaLogBusy, match=busy):
        open_app(tmp_path)
    with open_app(tmp_path) as app:  # released on close (and by the kernel when one dies)
        assert app.orchestrator is not None


def test_a_corrupt_saga_log_is_a_clear_error_and_a_torn_tail_is_cut(tmp_path: Path) -> None:
    with open_app(tmp_path) as app:
        run_order(app.orchestrator, make_order("1"))
    log_file = tmp_path / "saga_logs" / "order.jsonl"
    with open(log_file, "ab") as fh:
        fh.write(b'{"id": "x", "event": "saga.sta')  # torn by a crash mid-write
    with open_app(tmp_path) as app:
        assert app.orchestrator is not None
        assert app.orchestrator.get(SAGA).status is SagaStatus.COMPLETED
    lines = log_file.read_bytes().splitlines(keepends=True)
    log_file.write_bytes(lines[0] + b'{"not": "an event"}\n' + b"".join(lines[1:]))
    with pytest.raises(SagaLogError, match="line 2: event is missing field"):
        open_app(tmp_path)


def test_recover_needs_a_log_and_skips_a_saga_started_with_other_steps(tmp_path: Path) -> None:
    with SagaOrchestrator([SagaStep("a", print)]) as memory_only, pytest.raises(SagaError):
        memory_only.recover()

    def crash(ctx: dict[str, Any]) -> None:
        raise Crash

    with SagaOrchestrator([SagaStep("a", crash)], log_dir=tmp_path) as saga, pytest.raises(Crash):
        saga.run(saga_id="s")
    with SagaOrchestrator([SagaStep("b", print)], log_dir=tmp_path) as other:
        assert other.recover() == []
        assert other.get("s").status is SagaStatus.RUNNING  # left for the right orchestrator


# -- a real crash: kill -9 of a subprocess -------------------------------------------------------
@pytest.mark.parametrize(
    ("scenario", "pause", "ends", "in_flight"),
    [
        # between two steps: reserve_funds is logged as completed, confirm_order not started
        ("success", "saga.step_completed:reserve_funds", "completed", None),
        # inside a step: the stock is reserved on the ledger, the saga log does not know yet
        ("success", "inventory.reserved", "completed", "reserve_stock"),
        # between two compensations: the refund is logged, the stock is not released yet
        ("delivery-fails", "saga.step_compensated:reserve_funds", "compensated", None),
    ],
)
def test_kill_9_mid_saga_then_recover_in_a_new_process(
    tmp_path: Path, python: str, scenario: str, pause: str, ends: str, in_flight: str | None
) -> None:
    data = tmp_path / "shop"
    with start_paused(data, pause, "--scenario", scenario) as run:
        killed = run.pid
        assert run.saga_id == SAGA
        assert kill9(run.proc) == -9
    assert saga_log(data)[-1].name != f"saga.{ends}"  # in flight on disk

    done = subprocess.run(
        [python, "-m", "level_4_hard.saga_pattern", "--data-dir", str(data), "recover"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"saga {SAGA}: {ends}")

    with build_shop(data) as shop:
        effects = shop.effects(SAGA)
        assert all(n == 1 for n in effects.values()), effects  # each effect exactly once
        if ends == "completed":
            assert shop.snapshot()["deliveries"] == {SAGA: "scheduled"}
            assert shop.snapshot()["stock"]["book"] == 8
        else:
            assert shop.snapshot()["orders"] == {SAGA: "cancelled"}
            assert shop.snapshot()["stock"]["book"] == 10
            assert shop.snapshot()["balances"]["ann"] == 100_000
    resumed = [e for e in saga_log(data) if e.name == "saga.resumed"]
    assert len(resumed) == 1
    assert resumed[0].data["pid"] not in (killed, None)
    assert resumed[0].data["in_flight"] == in_flight
    assert saga_log(data)[-1].name == f"saga.{ends}"


def test_kill_9_mid_choreography_then_recover_in_a_new_process(tmp_path: Path, python: str) -> None:
    data = tmp_path / "shop"
    # Stop once inventory.reserved is recorded and on the bus, before Payment reacts to it.
    with start_paused(data, "inventory.reserved", style="choreography") as run:
        kill9(run.proc)
    with build_shop(data) as shop:
        assert [e.name for e in shop.events(SAGA)] == ["order.created", "inventory.reserved"]

    done = subprocess.run(
        [
            python,
            "-m",
            "level_4_hard.saga_pattern",
            "--data-dir",
            str(data),
            "--style",
            "choreography",
            "recover",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"saga {SAGA}: completed"
    with build_shop(data) as shop:
        assert all(n == 1 for n in shop.effects(SAGA).values())
        assert shop.snapshot()["deliveries"] == {SAGA: "scheduled"}
    published = [e.name for e in load_events(data / "events.log", SAGA)]
    assert published.count("inventory.reserved") == 2  # at least once: published again...
    assert published.count("payment.funds_reserved") == 1  # ...and handled once


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_retry_resumes_a_parked_saga(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    data = ["--data-dir", str(tmp_path), "--durability", "flush"]
    assert cli_main([*data, "run", "--scenario", "refund-fails"]) == 1
    assert "parked: compensation of reserve_funds failed" in capsys.readouterr().out

    assert cli_main([*data, "status", SAGA]) == 1
    status = orjson.loads(capsys.readouterr().out)
    assert status["status"] == "failed" and status["compensated"] == ["schedule_delivery"]

    assert cli_main([*data, "retry", SAGA]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"saga {SAGA}: compensated")
    assert "compensated schedule_delivery, reserve_funds, reserve_stock, create_order" in out

    assert cli_main([*data, "retry", SAGA]) == 2
    assert "only a parked (failed) saga can be retried" in capsys.readouterr().err
    assert cli_main([*data, "retry", "order-404"]) == 2
    assert "no saga 'order-404'" in capsys.readouterr().err
    with build_shop(tmp_path) as shop:
        assert shop.snapshot()["balances"]["ann"] == 100_000
        assert shop.snapshot()["orders"] == {SAGA: "cancelled"}


def test_cli_diagram_and_bad_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    data = ["--data-dir", str(tmp_path), "--durability", "flush"]
    assert cli_main([*data, "run", "--scenario", "payment-declined"]) == 0
    out = tmp_path / "d.md"
    assert cli_main([*data, "diagram", SAGA, "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"# orchestration: saga {SAGA}\n\n```mermaid\nsequenceDiagram\n")
    assert "Payment--xOrchestrator: business: InsufficientFunds" in text
    assert cli_main([*data, "diagram", "order-404"]) == 2
    with pytest.raises(SystemExit) as usage:
        cli_main([*data, "--style", "choreography", "retry", SAGA])
    assert usage.value.code == 2
    assert "recover" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*data, "run", "--scenario", "no-such-scenario"])


def test_a_scenario_order_matches_its_customer() -> None:
    assert scenario_order("payment-declined", "5")["customer"] == "bob"
    with pytest.raises(ValueError, match="unknown scenario"):
        arm(build_shop(), "nope")
