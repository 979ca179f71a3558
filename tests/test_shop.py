"""The shop: order rules and bad input, the notification and analytics read sides, and the
simulation (``main.py``) whose summary must equal the ground truth on every bus."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from common.events import Event
from common.retry import Backoff
from level_1_basic.eventbus import EventBus
from level_2_intermediate import main as shop_main
from level_2_intermediate.analytics_service import AnalyticsService
from level_2_intermediate.errors import (
    InvalidOrderError,
    OrderAlreadyPaidError,
    QueueFullError,
    ShopError,
    UnknownOrderError,
)
from level_2_intermediate.eventbus_queue import QueuedEventBus
from level_2_intermediate.notification_service import NotificationService, Outbox
from level_2_intermediate.order_service import OrderService, by_order, format_money
from level_2_intermediate.simulation import expected_totals, plan_orders

ROOT = Path(__file__).resolve().parents[1]
BOOK = {"sku": "book", "quantity": 2, "price": "12.50"}


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


# -- OrderService ---------------------------------------------------------------------------
def test_create_order_stores_and_emits_order_created(bus) -> None:
    seen: list[Event] = []
    bus.subscribe("order.*", seen.append)
    orders = OrderService(bus)
    order = orders.create_order(" alice ", [BOOK, {"sku": "mug", "quantity": 1, "price": 7.99}])
    assert order.customer == "alice" and order.total_cents == 2 * 1250 + 799
    assert orders.get(order.id) == order and order.status == "created"
    (event,) = seen
    assert event.name == "order.created" and event.correlation_id == order.id == by_order(event)
    assert event.data == {
        "order_id": order.id,
        "customer": "alice",
        "items": [
            {"sku": "book", "quantity": 2, "price_cents": 1250},
            {"sku": "mug", "quantity": 1, "price_cents": 799},
        ],
        "total_cents": 3299,
    }


def test_money_is_exact(bus) -> None:
    orders = OrderService(bus)
    order = orders.create_order(
        "bob",
        [{"sku": "a", "quantity": 1, "price": 0.1}, {"sku": "b", "quantity": 1, "price": 0.2}],
    )
    assert order.total_cents == 30 and format_money(order.total_cents) == "0.30"
    free = orders.create_order("bob", [{"sku": "gift", "quantity": 3, "price": 0}])
    assert free.total_cents == 0 and format_money(123456) == "1234.56"


@pytest.mark.parametrize(
    ("customer", "items", "message"),
    [
        ("", [BOOK], "customer must be a non-empty string"),
        ("   ", [BOOK], "customer must be a non-empty string"),
        (None, [BOOK], "customer must be a non-empty string"),
        (42, [BOOK], "customer must be a non-empty string"),
        ("ann", [], "at least one item"),
        ("ann", "book", "items must be a list"),
        ("ann", BOOK, "items must be a list"),
        ("ann", None, "items must be a list"),
        ("ann", ["book"], "item 1 must be a mapping"),
        ("ann", [{"quantity": 1, "price": 1}], "sku must be a non-empty string"),
        ("ann", [{"sku": " ", "quantity": 1, "price": 1}], "sku must be a non-empty string"),
        ("ann", [{"sku": "x", "quantity": 0, "price": 1}], "quantity must be a positive integer"),
        ("ann", [{"sku": "x", "quantity": -2, "price": 1}], "quantity must be a positive integer"),
        ("ann", [{"sku": "x", "quantity": 1.5, "price": 1}], "quantity must be a positive integer"),
        ("ann", [{"sku": "x", "quantity": True, "price": 1}], "quantity must be a positive"),
        ("ann", [{"sku": "x", "quantity": "2", "price": 1}], "quantity must be a positive"),
        ("ann", [{"sku": "x", "quantity": 1, "price": -0.01}], "non-negative amount"),
        ("ann", [{"sku": "x", "quantity": 1, "price": "abc"}], "price is not a number"),
        ("ann", [{"sku": "x", "quantity": 1, "price": "NaN"}], "non-negative amount"),
        ("ann", [{"sku": "x", "quantity": 1, "price": float("inf")}], "non-negative amount"),
        ("ann", [{"sku": "x", "quantity": 1, "price": 1.234}], "more than 2 decimals"),
        ("ann", [{"sku": "x", "quantity": 1, "price": None}], "price must be a number"),
        ("ann", [{"sku": "x", "quantity": 1}], "price is missing"),
        ("ann", [BOOK, {"sku": "x", "quantity": 0, "price": 1}], "item 2 (x): quantity"),
    ],
)
def test_bad_orders_are_refused_and_nothing_is_stored_or_emitted(
    bus, customer: Any, items: Any, message: str
) -> None:
    orders = OrderService(bus)
    with pytest.raises(InvalidOrderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        orders.create_order(customer, items)
    assert orders.orders == [] and len(bus.event_log) == 0
    assert issubclass(InvalidOrderError, ValueError) and issubclass(InvalidOrderError, ShopError)


def test_pay_order_emits_once_and_refuses_unknown_or_paid_orders(bus) -> None:
    orders = OrderService(bus)
    order = orders.create_order("ann", [BOOK])
    paid = orders.pay_order(order.id)
    assert paid.status == "paid" and orders.get(order.id).status == "paid"
    assert [e.name for e in bus.event_log] == ["order.created", "order.paid"]
    assert bus.event_log[-1].data == {
        "order_id": order.id,
        "customer": "ann",
        "amount_cents": 2500,
    }
    with pytest.raises(OrderAlreadyPaidError, match="already paid"):
        orders.pay_order(order.id)
    with pytest.raises(UnknownOrderError, match="no order with id 'ord-999999'"):
        orders.pay_order("ord-999999")
    with pytest.raises(UnknownOrderError):
        orders.pay_order(None)  # type: ignore[arg-type]
    assert len(bus.event_log) == 2  # the refused commands emitted nothing
    assert orders.totals() == {"orders": 1, "payments": 1, "revenue_cents": 2500}


def test_a_refused_event_leaves_no_phantom_order() -> None:
    gate, entered = threading.Event(), threading.Event()

    def held(event: Event) -> None:
        entered.set()
        gate.wait(10)

    with QueuedEventBus(workers=1, maxsize=1, put_timeout=0) as qbus:
        try:
            qbus.subscribe("order.#", held)
            orders = OrderService(qbus)
            first = orders.create_order("ann", [BOOK])
            assert entered.wait(10)  # the worker holds it
            second = orders.create_order("bob", [BOOK])  # fills the queue
            with pytest.raises(QueueFullError):
                orders.create_order("cy", [BOOK])
            assert [o.id for o in orders.orders] == [first.id, second.id]
            with pytest.raises(QueueFullError):
                orders.pay_order(first.id)
            assert orders.get(first.id).status == "created"  # not paid: it can be paid later
        finally:
            gate.set()
        assert qbus.join(timeout=10)
        assert orders.pay_order(first.id).status == "paid"


def test_concurrent_payments_of_one_order_succeed_exactly_once(bus) -> None:
    orders = OrderService(bus)
    order = orders.create_order("ann", [BOOK])
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def pay() -> None:
        barrier.wait(10)
        try:
            orders.pay_order(order.id)
            outcomes.append("paid")
        except OrderAlreadyPaidError:
            outcomes.append("refused")

    threads = [threading.Thread(target=pay) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(outcomes) == ["paid"] + ["refused"] * 7
    assert [e.name for e in bus.event_log].count("order.paid") == 1


# -- NotificationService and AnalyticsService -----------------------------------------------
def test_notifications_email_on_created_sms_on_paid(bus) -> None:
    outbox = Outbox()
    notifications = NotificationService(bus, outbox)
    orders = OrderService(bus)
    order = orders.create_order("ann", [BOOK, {"sku": "mug", "quantity": 1, "price": "7.99"}])
    orders.pay_order(order.id)
    assert outbox.messages == [
        ("email", "ann", f"order {order.id} received: 3 item(s), total 32.99"),
        ("sms", "ann", f"payment of 32.99 for {order.id} received"),
    ]
    assert notifications.snapshot() == {"emails": 1, "sms": 1, "duplicates_skipped": 0}


def test_notifications_handle_each_event_id_at_most_once(bus) -> None:
    outbox = Outbox()
    notifications = NotificationService(bus, outbox)
    OrderService(bus).create_order("ann", [BOOK])
    bus.publish(bus.event_log[0])  # the same event again: an at-least-once redelivery
    assert len(outbox.by_channel("email")) == 1
    assert notifications.snapshot()["duplicates_skipped"] == 1


def test_a_failed_send_is_retried_and_sent_once() -> None:
    class FlakySender(Outbox):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def send(self, channel: str, to: str, text: str) -> None:
            self.calls += 1
            if self.calls == 1:
                raise ConnectionError("smtp down")
            super().send(channel, to, text)

    sender = FlakySender()
    with QueuedEventBus(workers=1, backoff=Backoff(base=0.001, cap=0.001)) as qbus:
        notifications = NotificationService(qbus, sender)
        OrderService(qbus).create_order("ann", [BOOK])
        assert qbus.join(timeout=10)
    assert sender.calls == 2 and len(sender.messages) == 1
    assert notifications.snapshot() == {"emails": 1, "sms": 0, "duplicates_skipped": 0}


def test_analytics_snapshot_and_conversion(bus) -> None:
    analytics = AnalyticsService(bus)
    assert analytics.snapshot()["conversion_rate"] == 0.0
    orders = OrderService(bus)
    ids = [orders.create_order("ann", [BOOK]).id for _ in range(4)]
    orders.pay_order(ids[0])
    bus.publish(bus.event_log[-1])  # redelivered payment: counted once
    assert analytics.snapshot() == {
        "orders": 4,
        "payments": 1,
        "items_sold": 8,
        "revenue_cents": 2500,
        "revenue": "25.00",
        "conversion_rate": 0.25,
        "average_order_cents": 2500,
    }


def test_analytics_is_exact_under_concurrent_delivery() -> None:
    with QueuedEventBus(workers=8) as qbus:
        analytics = AnalyticsService(qbus)
        orders = OrderService(qbus)

        def shopper(n: int) -> None:
            for i in range(50):
                order = orders.create_order(f"c{n}", [{"sku": "x", "quantity": 1, "price": 1}])
                if i % 2:
                    orders.pay_order(order.id)

        threads = [threading.Thread(target=shopper, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert qbus.join(timeout=20)
    snap = analytics.snapshot()
    assert (snap["orders"], snap["payments"], snap["revenue_cents"]) == (300, 150, 15000)


# -- the simulation -------------------------------------------------------------------------
def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = shop_main.main(["--json", *args])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.mark.parametrize("bus_kind", ["sync", "thread", "async"])
@pytest.mark.parametrize("seed", [1, 7, 2024])
def test_the_summary_equals_the_ground_truth(capsys, bus_kind: str, seed: int) -> None:
    code, summary = run_main(
        capsys, "--orders", "40", "--seed", str(seed), "--bus", bus_kind, "--workers", "4"
    )
    truth = expected_totals(plan_orders(40, 0.7, seed))  # from the seed alone
    assert code == 0 and summary["consistent"] is True and summary["failed_checks"] == []
    analytics = summary["analytics"]
    assert (analytics["orders"], analytics["payments"], analytics["revenue_cents"]) == (
        truth["orders"],
        truth["payments"],
        truth["revenue_cents"],
    )
    assert summary["notifications"]["emails"] == truth["orders"]
    assert summary["notifications"]["sms"] == truth["payments"]
    assert summary["events"] == truth["orders"] + truth["payments"]
    loyalty = summary["loyalty"]
    given_up = summary["listener_errors"] if bus_kind == "sync" else summary["dead_letters"]
    assert loyalty["awarded"] + given_up == truth["payments"]


@pytest.mark.parametrize("seed", [7, 99])
def test_the_process_bus_summary_equals_the_ground_truth_and_the_thread_bus(
    capsys, seed: int
) -> None:
    args = ["--orders", "25", "--seed", str(seed), "--workers", "2", "--fail-rate", "0.3"]
    code, summary = run_main(capsys, *args, "--bus", "process")
    _, threaded = run_main(capsys, *args, "--bus", "thread")
    assert code == 0 and summary["consistent"] is True
    truth = expected_totals(plan_orders(25, 0.7, seed))
    assert summary["analytics"]["revenue_cents"] == truth["revenue_cents"]
    # the flaky listener's failures depend on the seed only, not on threads or processes
    assert summary["loyalty"] == threaded["loyalty"]
    assert summary["dead_letters"] == threaded["dead_letters"]


def test_a_listener_that_always_fails_does_not_disturb_the_others(capsys) -> None:
    code, summary = run_main(
        capsys, "--orders", "20", "--seed", "3", "--fail-rate", "1", "--max-retries", "1"
    )
    truth = expected_totals(plan_orders(20, 0.7, 3))
    assert code == 0 and summary["consistent"] is True
    assert summary["loyalty"]["awarded"] == 0
    assert summary["dead_letters"] == truth["payments"]
    assert summary["loyalty"]["attempts"] == 2 * truth["payments"]  # one try, one retry
    assert summary["notifications"]["sms"] == truth["payments"]


def test_the_text_output_shows_notifications_and_the_summary(capsys) -> None:
    assert shop_main.main(["--orders", "5", "--seed", "7", "--bus", "sync"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("shop: 5 orders, pay ratio 0.70, seed 7, bus sync")
    assert out.count("  email to ") == 5
    assert "summary" in out and "matches the ground truth: yes" in out


@pytest.mark.parametrize(
    "args",
    [
        ["--orders", "0"],
        ["--orders", "many"],
        ["--pay-ratio", "1.5"],
        ["--fail-rate", "-0.1"],
        ["--bus", "kafka"],
        ["--workers", "0"],
        ["--workers", "65"],
    ],
)
def test_bad_options_exit_with_a_usage_error(capsys, args: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        shop_main.main(args)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["level_2_intermediate/main.py"],
        ["-m", "level_2_intermediate.main"],
    ],
)
def test_main_runs_as_a_script_and_as_a_module(tmp_path, command: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, *command, "--orders", "5", "--seed", "7", "--json"],
        cwd=tmp_path if command[0] == "-m" else ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["consistent"] is True
