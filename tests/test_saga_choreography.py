"""Level 4 saga: choreography against orchestration, the Mermaid pictures, and the demo."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from common.events import Event
from level_4_hard.saga_pattern import demo
from level_4_hard.saga_pattern.bootstrap import SagaApp, bootstrap
from level_4_hard.saga_pattern.choreography import REACTIONS, Choreography
from level_4_hard.saga_pattern.clock import FakeClock, SystemClock
from level_4_hard.saga_pattern.diagram import load_events, render_sequence, write_markdown
from level_4_hard.saga_pattern.saga_orchestrator import SagaStatus, run_order
from level_4_hard.saga_pattern.scenarios import SCENARIOS, arm, scenario_order
from level_4_hard.saga_pattern.shop import build_shop, make_order
from tests.test_saga_recovery import restore_logging  # noqa: F401  (a fixture)

CONSUMERS = {r.trigger: r.participant for r in REACTIONS}
SAGA = "order-1"


def both_styles(scenario: str) -> tuple[SagaApp, SagaApp]:
    return (
        bootstrap(None, clock=FakeClock(), style="orchestration"),
        bootstrap(None, clock=FakeClock(), style="choreography"),
    )


def bus_events(app: SagaApp, saga_id: str = SAGA) -> list[str]:
    return [
        e.name
        for e in app.bus.event_log
        if e.correlation_id == saga_id and not e.name.startswith("saga.")
    ]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_choreography_reaches_the_same_final_state_as_orchestration(scenario: str) -> None:
    orchestrated, choreographed = both_styles(scenario)
    with orchestrated, choreographed:
        for app in (orchestrated, choreographed):
            arm(app.shop, scenario)
        order = scenario_order(scenario, "1")
        result = run_order(orchestrated.orchestrator, order)
        outcome = choreographed.choreography.run(order)  # type: ignore[union-attr]
        assert result.status is SCENARIOS[scenario].expected
        if scenario == "refund-fails":
            # Parked by the orchestrator; in flight (stalled) with no coordinator to park it.
            assert outcome.status is SagaStatus.COMPENSATING
            assert choreographed.choreography.stalled(SAGA)  # type: ignore[union-attr]
            result = orchestrated.orchestrator.retry(SAGA)  # type: ignore[union-attr]
            assert choreographed.choreography.recover() == [SAGA]  # type: ignore[union-attr]
            outcome = choreographed.choreography.result(SAGA)  # type: ignore[union-attr]
        assert outcome.status is result.status
        assert choreographed.shop.snapshot() == orchestrated.shop.snapshot()
        assert all(n == 1 for n in choreographed.shop.effects(SAGA).values())


@pytest.mark.parametrize(
    ("scenario", "events"),
    [
        (
            "success",
            [
                "order.created",
                "inventory.reserved",
                "payment.funds_reserved",
                "order.confirmed",
                "delivery.scheduled",
            ],
        ),
        (
            "payment-declined",
            [
                "order.created",
                "inventory.reserved",
                "payment.declined",
                "inventory.released",
                "order.cancelled",
            ],
        ),
        (
            "delivery-fails",
            [
                "order.created",
                "inventory.reserved",
                "payment.funds_reserved",
                "order.confirmed",
                "delivery.failed",
                "payment.refunded",
                "inventory.released",
                "order.cancelled",
            ],
        ),
    ],
)
def test_choreography_event_order(scenario: str, events: list[str]) -> None:
    clock = FakeClock()
    with bootstrap(None, clock=clock, style="choreography") as app:
        arm(app.shop, scenario)
        assert app.choreography is not None
        app.choreography.run(scenario_order(scenario, "1"))
        assert bus_events(app) == events
        if scenario == "delivery-fails":
            assert clock.sleeps == [0.05, 0.1]  # the delivery handler's own retries
            failed = app.shop.deliveries.last(SAGA)
            assert failed is not None and failed.data["kind"] == "gave_up"


def test_a_reaction_delivered_twice_takes_effect_once() -> None:
    with bootstrap(None, clock=FakeClock(), style="choreography") as app:
        assert app.choreography is not None
        app.choreography.run(make_order("1"))
        for event in app.shop.events(SAGA):  # the bus redelivers every fact (at least once)
            app.bus.publish(event)
        assert all(n == 1 for n in app.shop.effects(SAGA).values())
        assert app.choreography.status(SAGA) is SagaStatus.COMPLETED
        assert app.choreography.pending() == {}


def test_a_late_timed_out_call_is_undone_by_the_service_that_gave_up() -> None:
    with bootstrap(None, clock=FakeClock(), style="choreography") as app:
        app.shop.deliveries.faults.slow("schedule", 10.0)  # lands, then answers too late
        assert app.choreography is not None
        assert app.choreography.run(make_order("1")).status is SagaStatus.COMPENSATED
        failed = app.shop.deliveries.last(SAGA)
        assert failed is not None and failed.name == "delivery.failed"
        assert failed.data["undone"] is True
        assert app.shop.snapshot()["deliveries"] == {SAGA: "cancelled"}
        assert "delivery.scheduled" not in bus_events(app)  # a late answer is never published


def test_starting_a_stalled_saga_again_resumes_it() -> None:
    with bootstrap(None, clock=FakeClock(), style="choreography") as app:
        assert app.choreography is not None
        arm(app.shop, "refund-fails")
        assert app.choreography.run(make_order("1")).status is SagaStatus.COMPENSATING
        again = app.choreography.run(make_order("1"), timeout=30)
        assert again.status is SagaStatus.COMPENSATED
        assert all(n == 1 for n in app.shop.effects(SAGA).values())
        done = app.choreography.run(make_order("1"), timeout=30)  # ended: nothing happens
        assert done == again


def test_an_event_without_a_saga_id_is_ignored() -> None:
    with bootstrap(None, clock=FakeClock(), style="choreography") as app:
        app.bus.emit("order.created", {"order": make_order("1")})
        assert app.shop.inventory.reservations == {}
        assert list(app.bus.errors) == []


@pytest.mark.skipif(
    importlib.util.find_spec("level_2_intermediate.eventbus_queue") is None,
    reason="Level 2's QueuedEventBus is not built yet",
)
def test_choreography_over_level_2s_queued_bus() -> None:
    from level_2_intermediate.eventbus_queue import QueuedEventBus

    shop = build_shop(clock=SystemClock())
    bus = QueuedEventBus(workers=2, key=lambda e: e.correlation_id)  # per-saga order
    try:
        with Choreography(shop, bus, timeout=5.0) as choreography:
            arm(shop, "delivery-fails")
            first = choreography.run(make_order("1"), timeout=30)
            second = choreography.run(make_order("2", customer="bob"), timeout=30)
            third = choreography.run(make_order("3"), timeout=30)
            assert [first.status, second.status, third.status] == [
                SagaStatus.COMPENSATED,
                SagaStatus.COMPENSATED,
                SagaStatus.COMPLETED,
            ]
            assert bus.join(timeout=30)
    finally:
        bus.close(timeout=30)
        shop.close()
    assert shop.snapshot()["orders"] == {
        "order-1": "cancelled",
        "order-2": "cancelled",
        "order-3": "confirmed",
    }
    assert shop.snapshot()["stock"]["book"] == 8


# -- the picture of a run --------------------------------------------------------------------------
UNAVAILABLE = "TransientError: schedule: service temporarily unavailable (injected)"
KNOWN_RUN = "\n".join(
    [
        "sequenceDiagram",
        "    title known run",
        "    participant Orchestrator",
        "    participant Order",
        "    participant Inventory",
        "    participant Payment",
        "    participant Delivery",
        "    Note over Orchestrator: saga s started (order)",
        "    Orchestrator->>Order: create_order",
        "    Order-->>Orchestrator: done",
        "    Orchestrator->>Inventory: reserve_stock",
        "    Inventory-->>Orchestrator: done",
        "    Orchestrator->>Payment: reserve_funds",
        "    Payment-->>Orchestrator: done (amount_held=5600)",
        "    Orchestrator->>Order: confirm_order",
        "    Order-->>Orchestrator: done",
        "    Orchestrator->>Delivery: schedule_delivery",
        f"    Delivery--xOrchestrator: attempt 1: {UNAVAILABLE}",
        "    Note over Orchestrator: retry schedule_delivery in 0.05s",
        f"    Delivery--xOrchestrator: attempt 2: {UNAVAILABLE}",
        "    Note over Orchestrator: retry schedule_delivery in 0.1s",
        f"    Delivery--xOrchestrator: transient: {UNAVAILABLE}",
        "    Note over Orchestrator: schedule_delivery failed: compensate schedule_delivery, "
        "reserve_funds, reserve_stock, create_order",
        "    Orchestrator->>Delivery: undo schedule_delivery",
        "    Delivery-->>Orchestrator: undone",
        "    Orchestrator->>Payment: undo reserve_funds",
        "    Payment-->>Orchestrator: undone",
        "    Orchestrator->>Inventory: undo reserve_stock",
        "    Inventory-->>Orchestrator: undone",
        "    Orchestrator->>Order: undo create_order",
        "    Order-->>Orchestrator: undone",
        "    Note over Orchestrator: saga compensated",
        "",
    ]
)


def test_the_mermaid_diagram_of_a_known_run() -> None:
    with bootstrap(None, clock=FakeClock()) as app:
        arm(app.shop, "delivery-fails")
        run_order(app.orchestrator, make_order("1"), saga_id="s")
        assert app.orchestrator is not None
        assert render_sequence(app.orchestrator.records("s"), title="known run") == KNOWN_RUN


def test_the_diagram_of_a_choreographed_run_from_an_events_log(tmp_path: Path) -> None:
    with bootstrap(tmp_path, clock=FakeClock(), style="choreography") as app:
        assert app.choreography is not None
        app.choreography.run(make_order("1"))
        app.choreography.run(scenario_order("payment-declined", "2"))
    events = load_events(tmp_path / "events.log", "order-2")  # one saga out of two
    assert render_sequence(events, consumers=CONSUMERS) == (
        "sequenceDiagram\n"
        "    participant Order\n"
        "    participant Inventory\n"
        "    participant Payment\n"
        "    Order->>Inventory: order.created\n"
        "    Inventory->>Payment: inventory.reserved\n"
        "    Payment->>Inventory: payment.declined\n"
        "    Inventory->>Order: inventory.released\n"
        "    Note over Order: order.cancelled\n"
    )
    to_bus = render_sequence(events)
    assert "    participant Bus\n" in to_bus and "Payment->>Bus: payment.declined" in to_bus


def test_the_diagram_shows_a_crash_and_the_restart() -> None:
    def record(name: str, **data: object) -> Event:
        return Event(name, dict(data), correlation_id="s")

    records = [
        record("saga.started", saga="order", steps=["a", "b"], context={}),
        record("saga.step_started", step="a", index=0, participant="Pay; Co #1"),
        record("saga.resumed", by="recover", pid=42, in_flight="a"),
        record("saga.step_started", step="a", index=0, participant="Pay; Co #1"),
        record("saga.step_completed", step="a", output={}),
        record("saga.completed"),
    ]
    text = render_sequence(records)
    assert "    participant Pay__Co__1 as Pay, Co no.1\n" in text  # escaped: no ';' or '#'
    assert "Note over Orchestrator: the orchestrator process died here" in text
    assert "Note over Orchestrator: resumed by recover in pid 42" in text
    assert "Orchestrator->>Pay__Co__1: a (again, after the restart)" in text


def test_write_markdown_lists_the_events(tmp_path: Path) -> None:
    events = [Event("order.created", {"order": {}}, correlation_id="s")]
    path = write_markdown(tmp_path / "d" / "x.md", "T", "sequenceDiagram\n", events)
    assert path.read_text() == (
        "# T\n\n```mermaid\nsequenceDiagram\n```\n\n## Events, in order\n\n1. `order.created`\n"
    )


# -- the demo --------------------------------------------------------------------------------------
@pytest.mark.usefixtures("restore_logging")
def test_the_demo_runs_every_scenario_and_draws_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for scenario in demo.ALL_SCENARIOS:
        assert f"=== {scenario}:" in out
    assert out.count("same final state in both styles: yes; each effect once: yes") == 6
    assert "orchestration: saga order-1 compensated" in out
    assert "PARKED: compensation of reserve_funds failed after 3 attempt(s)" in out
    assert "the process died here; resumed by recover in pid" in out
    assert "kill -9" in out
    diagrams = sorted(p.name for p in (tmp_path / "diagrams").iterdir())
    assert diagrams == sorted(
        f"{scenario}-{style}.md"
        for scenario in demo.ALL_SCENARIOS
        for style in ("orchestration", "choreography")
    )
    crash = (tmp_path / "diagrams" / "crash-recover-orchestration.md").read_text()
    assert "the orchestrator process died here" in crash
    assert "confirm_order" in crash


@pytest.mark.parametrize(
    "command",
    [["level_4_hard/saga_pattern/demo.py"], ["-m", "level_4_hard.saga_pattern.demo"]],
)
def test_the_demo_runs_both_ways(tmp_path: Path, python: str, command: list[str]) -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [python, *command, "--scenario", "payment-declined", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path if command[0] == "-m" else root,  # -m works from any folder
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "payment.declined: reason=insufficient funds: bob has 3000" in done.stdout
    assert (tmp_path / "diagrams" / "payment-declined-choreography.md").exists()
