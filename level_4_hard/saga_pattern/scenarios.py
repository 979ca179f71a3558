"""The demo's scenarios: an order and the faults that send its saga down one path.

Shared by ``demo.py``, the CLI's ``run`` command (which the crash test starts in a
subprocess) and the tests, so that every path is set up in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from level_4_hard.saga_pattern.saga_log import SagaStatus
from level_4_hard.saga_pattern.shop import Shop, make_order

__all__ = ["SCENARIOS", "Scenario", "arm", "scenario_order"]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    customer: str
    expected: SagaStatus  # how the saga ends (before any retry or recovery)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "success",
            "ann orders 2 books and 3 pens; every step succeeds",
            "ann",
            SagaStatus.COMPLETED,
        ),
        Scenario(
            "payment-declined",
            "bob orders 56.00 with 30.00 on his account: payment declines, stock is released",
            "bob",
            SagaStatus.COMPENSATED,
        ),
        Scenario(
            "delivery-fails",
            "the carrier is down for every attempt: after the retries, payment, stock and order "
            "are compensated in reverse order",
            "ann",
            SagaStatus.COMPENSATED,
        ),
        Scenario(
            "delivery-timeout",
            "the carrier schedules the delivery but answers after the step's timeout: the late "
            "delivery is cancelled by the compensation",
            "ann",
            SagaStatus.COMPENSATED,
        ),
        Scenario(
            "refund-fails",
            "delivery fails, then the refund fails on every retry: the saga is parked as failed, "
            "and `retry` finishes it",
            "ann",
            SagaStatus.FAILED,
        ),
    )
}


def scenario_order(scenario: str, order_id: str) -> dict[str, Any]:
    """The order a scenario places."""
    return make_order(order_id, customer=SCENARIOS[scenario].customer)


def arm(
    shop: Shop,
    scenario: str,
    *,
    attempts: int = 3,
    compensation_attempts: int = 3,
    slow_seconds: float = 10.0,
) -> None:
    """Arm ``shop``'s faults for ``scenario`` (``attempts``: the retry budget to exhaust)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {sorted(SCENARIOS)}")
    if scenario in ("delivery-fails", "refund-fails"):
        shop.deliveries.faults.flaky("schedule", attempts)
    if scenario == "refund-fails":
        shop.payments.faults.flaky("refund", compensation_attempts)
    if scenario == "delivery-timeout":
        shop.deliveries.faults.slow("schedule", slow_seconds)
