"""Level 4 saga: the services, the orchestrator and the order saga, on a fake clock.

Recovery, crashes and the CLI are in test_saga_recovery.py; choreography, diagrams and the demo
in test_saga_choreography.py.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest

from common.events import InvalidEventError
from common.retry import Backoff
from common.waiting import wait_until
from level_4_hard.saga_pattern.bootstrap import SagaApp, bootstrap
from level_4_hard.saga_pattern.clock import FakeClock, SystemClock
from level_4_hard.saga_pattern.errors import (
    BusinessError,
    InsufficientFunds,
    InsufficientStock,
    SagaDefinitionError,
    SagaError,
    SagaLogError,
    SagaNotFound,
    SagaStateError,
    SagaVoided,
    StepTimeout,
    TransientError,
)
from level_4_hard.saga_pattern.ledger import Outcome, validate_order
from level_4_hard.saga_pattern.saga_orchestrator import (
    Retry,
    SagaOrchestrator,
    SagaStatus,
    SagaStep,
    run_order,
)
from level_4_hard.saga_pattern.scenarios import arm, scenario_order
from level_4_hard.saga_pattern.shop import DEFAULT_BALANCES, DEFAULT_STOCK, build_shop, make_order

INITIAL = {
    "stock": dict(sorted(DEFAULT_STOCK.items())),
    "reserved": {},
    "balances": dict(sorted(DEFAULT_BALANCES.items())),
    "held": {},
    "deliveries": {},
}
FORWARD = ["order.created", "inventory.reserved", "payment.funds_reserved", "order.confirmed"]
UNDO_ALL = ["payment.refunded", "inventory.released", "order.cancelled"]


def domain_events(app: SagaApp, saga_id: str) -> list[str]:
    """The services' events the bus carried for one saga, in order."""
    return [
        e.name
        for e in app.bus.event_log
        if e.correlation_id == saga_id and not e.name.startswith("saga.")
    ]


def saga_records(app: SagaApp, saga_id: str) -> list[str]:
    return [
        e.name
        for e in app.bus.event_log
        if e.correlation_id == saga_id and e.name.startswith("saga.")
    ]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(clock: FakeClock):
    with bootstrap(None, clock=clock) as app:
        yield app


# -- the services ------------------------------------------------------------------------------
def test_every_operation_is_idempotent_by_saga_id() -> None:
    shop = build_shop()
    order = make_order("7")

    def forward() -> list[Outcome]:
        return [
            shop.orders.create("s", order),
            shop.inventory.reserve("s", order),
            shop.payments.reserve_funds("s", order),
            shop.orders.confirm("s"),
            shop.deliveries.schedule("s", order),
        ]

    def undo() -> list[Outcome]:
        return [shop.deliveries.cancel("s"), shop.payments.refund("s"), shop.inventory.release("s")]

    first = forward()
    state = shop.snapshot()
    again = forward()
    assert all(o.new for o in first) and not any(o.new for o in again)
    assert [o.event.id for o in again] == [o.event.id for o in first]  # the recorded outcome
    assert shop.snapshot() == state
    assert state["stock"] == {"book": 8, "lamp": 3, "pen": 97}
    assert state["balances"]["ann"] == DEFAULT_BALANCES["ann"] - 5_600

    undone, undone_again = undo(), undo()
    assert all(o.new for o in undone) and not any(o.new for o in undone_again)
    assert shop.effects("s") == dict.fromkeys(
        [
            "order.created",
            "inventory.reserved",
            "payment.funds_reserved",
            "order.confirmed",
            "delivery.scheduled",
            "delivery.cancelled",
            "payment.refunded",
            "inventory.released",
        ],
        1,
    )
    assert shop.snapshot()["stock"] == INITIAL["stock"]
    assert shop.snapshot()["balances"] == INITIAL["balances"]


def test_a_compensation_before_its_action_leaves_a_tombstone_that_refuses_the_late_action() -> None:
    shop = build_shop()
    order = make_order("8")
    assert shop.inventory.release("s").event.name == "inventory.voided"
    assert shop.payments.refund("s").event.name == "payment.voided"
    assert shop.deliveries.cancel("s").event.name == "delivery.voided"
    assert shop.orders.cancel("s").event.name == "order.voided"
    with pytest.raises(SagaVoided):
        shop.inventory.reserve("s", order)
    with pytest.raises(SagaVoided):
        shop.payments.reserve_funds("s", order)
    with pytest.raises(SagaVoided):
        shop.deliveries.schedule("s", order)
    with pytest.raises(SagaVoided):
        shop.orders.create("s", order)
    assert shop.snapshot() == {**INITIAL, "orders": {}}


def test_a_business_failure_is_recorded_once_and_repeats_with_the_same_answer() -> None:
    shop = build_shop()
    order = make_order("9", customer="bob")
    with pytest.raises(InsufficientFunds) as first:
        shop.payments.reserve_funds("s", order)
    with pytest.raises(InsufficientFunds) as again:
        shop.payments.reserve_funds("s", order)
    assert first.value.new and not again.value.new
    assert first.value.event is again.value.event
    assert first.value.event.name == "payment.declined"
    assert "bob has 3000, the order needs 5600" in str(first.value)
    assert shop.effects("s") == {"payment.declined": 1}
    assert shop.payments.balances["bob"] == 3_000

    lamps = make_order("10", items=[{"sku": "lamp", "qty": 4, "price": 100}])
    with pytest.raises(
        InsufficientStock, match=re.escape("wanted {'lamp': 4}, available {'lamp': 3}")
    ):
        shop.inventory.reserve("t", lamps)
    assert shop.inventory.stock["lamp"] == 3


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ("not an order", "must be a dict"),
        ({**make_order("1"), "customer": ""}, "'customer'"),
        ({**make_order("1"), "items": []}, "non-empty list"),
        ({**make_order("1"), "items": [{"sku": "book", "qty": 0, "price": 1}]}, "'qty'"),
        ({**make_order("1"), "items": [{"sku": "book", "qty": 1, "price": -1}]}, "'price'"),
        ({**make_order("1"), "items": [{"sku": "book", "qty": True, "price": 1}]}, "'qty'"),
        ({**make_order("1"), "items": ["book"]}, "item 0 must be a dict"),
    ],
)
def test_a_bad_order_is_refused_with_a_clear_error_and_nothing_recorded(
    app: SagaApp, order: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        validate_order(order)
    with pytest.raises(ValueError, match=message):
        run_order(app.orchestrator, order, saga_id="bad")  # type: ignore[arg-type]
    assert app.orchestrator is not None and app.orchestrator.sagas() == []
    assert app.shop.events("bad") == []


def test_bad_seed_input_is_refused() -> None:
    shop = build_shop()
    with pytest.raises(ValueError, match="positive integer"):
        shop.inventory.restock({"book": -1})
    with pytest.raises(ValueError, match="positive integer"):
        shop.payments.deposit("ann", 0)
    with pytest.raises(ValueError, match="non-empty string"):
        shop.payments.deposit("", 10)
    assert shop.snapshot()["stock"] == INITIAL["stock"]


def test_a_service_rebuilds_its_state_from_its_ledger(tmp_path: Path) -> None:
    with build_shop(tmp_path) as shop:
        shop.orders.create("s", make_order("1"))
        shop.inventory.reserve("s", make_order("1"))
        shop.payments.reserve_funds("s", make_order("1"))
        state = shop.snapshot()
    ledger = tmp_path / "services" / "inventory.jsonl"
    assert ledger.read_text().count("inventory.restocked") == 1
    with build_shop(tmp_path, stock={"book": 99}) as reopened:  # the seed is for a new ledger
        assert reopened.snapshot() == state
        assert not reopened.inventory.reserve("s", make_order("1")).new  # idempotent across runs
    assert ledger.read_text().count("inventory.restocked") == 1


def test_a_torn_ledger_tail_is_cut_and_a_corrupt_line_is_a_clear_error(tmp_path: Path) -> None:
    with build_shop(tmp_path) as shop:
        shop.inventory.reserve("s", make_order("1"))
    ledger = tmp_path / "services" / "inventory.jsonl"
    with open(ledger, "ab") as fh:
        fh.write(b'{"id": "x", "event": "inventory.rel')  # a writer killed mid-line
    with build_shop(tmp_path) as shop:
        assert shop.inventory.stock["book"] == 8
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(lines[0] + b"not json\n" + b"".join(lines[1:]))
    with pytest.raises(SagaLogError, match=r"inventory.jsonl line 2: malformed JSON"):
        build_shop(tmp_path)


# -- the general orchestrator --------------------------------------------------------------------
class Recorder:
    """Steps that note every call; ``fail`` maps a step to the exception its action raises."""

    def __init__(self, fail: dict[str, BaseException] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail or {}

    def step(self, name: str, **options: Any) -> SagaStep:
        def action(ctx: dict[str, Any]) -> dict[str, Any]:
            self.calls.append(name)
            if name in self.fail:
                raise self.fail[name]
            return {f"{name}_done": True}

        def compensation(ctx: dict[str, Any]) -> None:
            self.calls.append(f"undo {name}")

        return SagaStep(name, action, compensation, **options)


def test_a_saga_runs_its_steps_in_order_and_merges_their_outputs(clock: FakeClock) -> None:
    rec = Recorder()
    with SagaOrchestrator([rec.step("a"), rec.step("b"), rec.step("c")], clock=clock) as saga:
        result = saga.run({"x": 1}, saga_id="s1")
    assert result.status is SagaStatus.COMPLETED and result.ok
    assert rec.calls == ["a", "b", "c"]
    assert result.completed == ("a", "b", "c")
    assert result.context == {
        "x": 1,
        "saga_id": "s1",
        "a_done": True,
        "b_done": True,
        "c_done": True,
    }
    assert all(e.correlation_id == "s1" for e in saga.bus.event_log)


@pytest.mark.parametrize(
    ("error", "undone"),
    [
        # a definite "no": the failed step did nothing and is not compensated
        (BusinessError("no"), ["undo c", "undo b", "undo a"]),
        # an unknown outcome: the failed step is compensated too, first
        (RuntimeError("boom"), ["undo d", "undo c", "undo b", "undo a"]),
    ],
)
def test_a_failure_compensates_in_reverse_order(
    clock: FakeClock, error: Exception, undone: list[str]
) -> None:
    rec = Recorder(fail={"d": error})
    steps = [rec.step(n) for n in "abcde"]
    with SagaOrchestrator(steps, clock=clock) as saga:
        result = saga.run(saga_id="s1")
    assert result.status is SagaStatus.COMPENSATED
    assert rec.calls == ["a", "b", "c", "d", *undone]
    assert result.failed_step == "d"
    assert result.error == f"{type(error).__name__}: {error}"
    assert result.compensated == tuple(u.split()[1] for u in undone)


def test_transient_errors_are_retried_with_exponential_backoff_without_sleeping() -> None:
    clock = FakeClock()
    attempts = []

    def flaky(ctx: dict[str, Any]) -> None:
        attempts.append(clock.now())
        if len(attempts) < 3:
            raise TransientError("503")

    retry = Retry(attempts=4, backoff=Backoff(base=0.5, factor=2.0, cap=10))
    with SagaOrchestrator([SagaStep("pay", flaky, retry=retry)], clock=clock) as saga:
        result = saga.run(saga_id="s1")
        records = saga.records("s1")
    assert result.ok
    assert clock.sleeps == [0.5, 1.0]  # exponential, and not a real second slept
    assert attempts == [0.0, 0.5, 1.5]
    retrying = [e.data for e in records if e.name == "saga.step_retrying"]
    assert [(r["attempt"], r["delay"]) for r in retrying] == [(1, 0.5), (2, 1.0)]
    assert retrying[0]["error"] == "TransientError: 503"


def test_retries_that_run_out_fail_the_step_and_other_errors_are_not_retried() -> None:
    clock = FakeClock()
    calls = {"flaky": 0, "bug": 0}

    def flaky(ctx: dict[str, Any]) -> None:
        calls["flaky"] += 1
        raise ConnectionError("reset")

    def bug(ctx: dict[str, Any]) -> None:
        calls["bug"] += 1
        raise KeyError("oops")

    retry = Retry(attempts=3)
    with SagaOrchestrator([SagaStep("a", flaky, retry=retry)], clock=clock) as one:
        assert one.run().status is SagaStatus.COMPENSATED
    with SagaOrchestrator([SagaStep("b", bug, retry=retry)], clock=clock) as two:
        assert two.run().status is SagaStatus.COMPENSATED
    assert calls == {"flaky": 3, "bug": 1}


def test_a_step_that_exceeds_its_timeout_fails_and_its_late_effect_is_compensated(
    app: SagaApp, clock: FakeClock
) -> None:
    app.shop.deliveries.faults.slow("schedule", 10.0)  # the effect lands, the reply is late
    result = run_order(app.orchestrator, make_order("1"), saga_id="s")
    assert result.status is SagaStatus.COMPENSATED
    assert result.failed_step == "schedule_delivery"
    assert result.error == "StepTimeout: no answer within 2s"
    assert domain_events(app, "s") == [
        *FORWARD,
        "delivery.scheduled",  # late, but it happened...
        "delivery.cancelled",  # ...so the compensation of the timed-out step undoes it
        *UNDO_ALL,
    ]
    assert app.shop.snapshot() == {
        **INITIAL,
        "orders": {"s": "cancelled"},
        "deliveries": {"s": "cancelled"},
    }
    assert clock.sleeps == [10.0]


def test_a_timeout_on_the_real_clock_and_a_late_call_that_arrives_after_the_compensation() -> None:
    gate = threading.Event()
    late: list[BaseException | str] = []
    with bootstrap(None, clock=SystemClock(), timeout=0.2) as app:
        schedule = app.shop.deliveries.schedule

        def stuck_carrier(saga_id: str, order: dict[str, Any]):  # returns after the timeout
            assert gate.wait(30), "the test never released the late call"
            try:
                outcome = schedule(saga_id, order)
                late.append(outcome.event.name)
                return outcome
            except BaseException as exc:
                late.append(exc)
                raise

        app.shop.deliveries.schedule = stuck_carrier  # type: ignore[method-assign]
        result = run_order(app.orchestrator, make_order("1"), saga_id="s")
        assert result.status is SagaStatus.COMPENSATED
        assert result.error == "StepTimeout: no answer within 0.2s"
        assert app.shop.deliveries.last("s").name == "delivery.voided"  # the tombstone
        gate.set()  # the late call arrives now, after every compensation
        wait_until(lambda: late, timeout=30, message="the late call to finish")
        assert isinstance(late[0], SagaVoided)
        assert app.shop.effects("s").get("delivery.scheduled") is None
        assert app.shop.snapshot() == {**INITIAL, "orders": {"s": "cancelled"}}


def test_a_hung_timed_call_holds_only_its_own_worker() -> None:
    clock = SystemClock()
    gate = threading.Event()
    with pytest.raises(StepTimeout, match=r"no answer within 0\.05s"):
        clock.call(lambda: gate.wait(30), timeout=0.05)
    assert clock.call(lambda: 7, timeout=30) == 7  # served by another worker meanwhile
    with pytest.raises(KeyError):  # the call's own error comes back as it is
        clock.call(lambda: {}["missing"], timeout=30)
    assert clock.stragglers() == 1
    assert not clock.close(timeout=0.01)
    gate.set()
    assert clock.close(timeout=30)
    assert clock.stragglers() == 0


def test_the_fake_clock_times_out_a_call_that_raised_after_its_deadline() -> None:
    clock = FakeClock()

    def slow_then_fail() -> None:
        clock.sleep(5)
        raise ValueError("too late to matter")

    with pytest.raises(StepTimeout):
        clock.call(slow_then_fail, timeout=1)
    with pytest.raises(ValueError):
        clock.call(slow_then_fail, timeout=10)


def test_a_failing_compensation_parks_the_saga_and_retry_finishes_it(app: SagaApp) -> None:
    arm(app.shop, "refund-fails")  # delivery fails 3 times, then the refund fails 3 times
    saga = app.orchestrator
    assert saga is not None
    parked = run_order(saga, make_order("1"), saga_id="s")
    assert parked.status is SagaStatus.FAILED
    assert parked.reason == (
        "compensation of reserve_funds failed after 3 attempt(s): "
        "TransientError: refund: service temporarily unavailable (injected)"
    )
    assert parked.compensated == ("schedule_delivery",)
    assert app.shop.payments.held == {"s": {"customer": "ann", "amount": 5_600}}  # not refunded
    assert saga_records(app, "s")[-1] == "saga.failed"
    with pytest.raises(SagaStateError, match="parked"):
        saga.run({"order": make_order("1")}, saga_id="s")

    done = saga.retry("s")
    assert done.status is SagaStatus.COMPENSATED
    assert done.compensated == (
        "schedule_delivery",
        "reserve_funds",
        "reserve_stock",
        "create_order",
    )
    assert domain_events(app, "s") == [*FORWARD, "delivery.voided", *UNDO_ALL]
    assert app.shop.snapshot() == {**INITIAL, "orders": {"s": "cancelled"}}
    with pytest.raises(SagaStateError, match="only a parked"):
        saga.retry("s")
    with pytest.raises(SagaNotFound):
        saga.retry("nope")


SCENARIO_EVENTS = {
    "success": [*FORWARD, "delivery.scheduled"],
    "payment-declined": [
        "order.created",
        "inventory.reserved",
        "payment.declined",
        "inventory.released",
        "order.cancelled",
    ],
    "delivery-fails": [*FORWARD, "delivery.voided", *UNDO_ALL],
    "delivery-timeout": [*FORWARD, "delivery.scheduled", "delivery.cancelled", *UNDO_ALL],
}
SCENARIO_STATES = {
    "success": {
        "stock": {"book": 8, "lamp": 3, "pen": 97},
        "reserved": {"s": [{"sku": "book", "qty": 2}, {"sku": "pen", "qty": 3}]},
        "balances": {"ann": 94_400, "bob": 3_000},
        "held": {"s": 5_600},
        "orders": {"s": "confirmed"},
        "deliveries": {"s": "scheduled"},
    },
    "payment-declined": {**INITIAL, "orders": {"s": "cancelled"}},
    "delivery-fails": {**INITIAL, "orders": {"s": "cancelled"}},
    "delivery-timeout": {**INITIAL, "orders": {"s": "cancelled"}, "deliveries": {"s": "cancelled"}},
}


@pytest.mark.parametrize("scenario", sorted(SCENARIO_EVENTS))
def test_each_scenario_ends_in_its_final_state_with_its_exact_events(
    app: SagaApp, clock: FakeClock, scenario: str
) -> None:
    arm(app.shop, scenario)
    result = run_order(app.orchestrator, scenario_order(scenario, "1"), saga_id="s")
    expected = SagaStatus.COMPLETED if scenario == "success" else SagaStatus.COMPENSATED
    assert result.status is expected
    assert domain_events(app, "s") == SCENARIO_EVENTS[scenario]
    assert app.shop.snapshot() == SCENARIO_STATES[scenario]
    assert all(n == 1 for n in app.shop.effects("s").values())
    if scenario == "delivery-fails":
        assert clock.sleeps == [0.05, 0.1]  # ORDER_RETRY: 3 attempts, backoff 0.05 x2


def test_the_saga_records_tell_the_whole_story_in_order(app: SagaApp) -> None:
    run_order(app.orchestrator, scenario_order("payment-declined", "1"), saga_id="s")
    assert saga_records(app, "s") == [
        "saga.started",
        "saga.step_started",  # create_order
        "saga.step_completed",
        "saga.step_started",  # reserve_stock
        "saga.step_completed",
        "saga.step_started",  # reserve_funds
        "saga.step_failed",
        "saga.compensation_started",  # reserve_stock
        "saga.step_compensated",
        "saga.compensation_started",  # create_order
        "saga.step_compensated",
        "saga.compensated",
    ]
    failed = next(e for e in app.bus.event_log if e.name == "saga.step_failed")
    assert failed.data["kind"] == "business"
    assert failed.data["compensate"] == ["reserve_stock", "create_order"]
    assert {e.correlation_id for e in app.bus.event_log} == {"s"}


def test_running_a_saga_id_again_returns_its_result_and_does_nothing_twice(app: SagaApp) -> None:
    first = run_order(app.orchestrator, make_order("1"))
    again = run_order(app.orchestrator, make_order("1"))
    assert first.saga_id == again.saga_id == "order-1"
    assert again == first
    assert all(n == 1 for n in app.shop.effects("order-1").values())
    assert saga_records(app, "order-1").count("saga.started") == 1


def test_misuse_raises_before_anything_is_logged(clock: FakeClock, tmp_path: Path) -> None:
    rec = Recorder()
    with SagaOrchestrator([rec.step("a")], clock=clock, log_dir=tmp_path) as saga:
        with pytest.raises(InvalidEventError, match="not JSON-serialisable"):
            saga.run({"when": object()})
        with pytest.raises(TypeError, match="context must be a dict"):
            saga.run(["not", "a", "dict"])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="saga_id"):
            saga.run(saga_id="has space")
        assert saga.sagas() == [] and rec.calls == []
    assert (tmp_path / "saga.jsonl").read_bytes() == b""
    with pytest.raises(SagaError, match="closed"):
        saga.run()


def test_a_step_must_return_a_serialisable_dict_or_it_fails(clock: FakeClock) -> None:
    undone: list[str] = []
    bad_outputs = [["a list"], {"when": object()}, {"saga_id": "hijack"}]
    for output in bad_outputs:
        step = SagaStep("s", lambda ctx, out=output: out, lambda ctx: undone.append("s"))
        with SagaOrchestrator([step], clock=clock) as saga:
            result = saga.run()
        assert result.status is SagaStatus.COMPENSATED  # its effect may have happened: undone
    assert undone == ["s", "s", "s"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SagaOrchestrator([]), "at least one step"),
        (lambda: SagaOrchestrator([SagaStep("a", print), SagaStep("a", print)]), "unique"),
        (lambda: SagaOrchestrator(["a"]), "SagaStep"),  # type: ignore[list-item]
        (lambda: SagaOrchestrator([SagaStep("a", print)], name="../x"), "safe file name"),
        (lambda: SagaStep("", print), "step name"),
        (lambda: SagaStep("a", "not callable"), "callable"),  # type: ignore[arg-type]
        (lambda: SagaStep("a", print, timeout=0), "timeout"),
        (lambda: SagaStep("a", print, timeout=True), "timeout"),
        (lambda: Retry(attempts=0), "at least 1"),
    ],
)
def test_an_invalid_saga_definition_is_refused(make: Any, message: str) -> None:
    with pytest.raises(SagaDefinitionError, match=message):
        make()


def test_a_saga_log_that_could_lose_records_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="durability must be 'flush' or 'fsync'"):
        SagaOrchestrator([SagaStep("a", print)], log_dir=tmp_path, durability="none")
    assert not (tmp_path / "saga.lock").exists()
