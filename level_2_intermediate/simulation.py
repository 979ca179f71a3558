"""The shop simulation behind ``main.py``: a reproducible stream of orders through any bus.

:func:`plan_orders` turns a seed into customers, baskets and which orders get paid;
:func:`run_simulation` wires the three services (plus a deliberately flaky loyalty service) to
the chosen bus, plays the plan through :class:`OrderService`, closes the bus (which drains it)
and compares what the listeners saw with the ground truth. Every event passes through the bus.

The flaky listener fails on purpose, deterministically: attempt ``n`` for order ``o`` fails iff
``Random(f"{seed}:{o}:{n}").random() < fail_rate``, so a seed gives the same failures on every
bus, whatever the thread or process interleaving. Its failures must not disturb the other
listeners (isolation), the queued buses retry it (backoff), and what never succeeds is
dead-lettered — so every paid order is either awarded points or in ``dead_letters``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import threading
import time
from collections.abc import Callable, MutableMapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from common.events import Event
from common.retry import Backoff
from level_1_basic.eventbus import EventBus
from level_2_intermediate.analytics_service import AnalyticsService
from level_2_intermediate.errors import Level2Error
from level_2_intermediate.eventbus_async import AsyncEventBus
from level_2_intermediate.eventbus_process import ProcessEventBus
from level_2_intermediate.eventbus_queue import QueuedEventBus
from level_2_intermediate.notification_service import ConsoleSender, NotificationService, Outbox
from level_2_intermediate.order_service import (
    AsyncOrderService,
    OrderService,
    by_order,
    format_money,
)

__all__ = [
    "BUSES",
    "LoyaltyService",
    "PlannedOrder",
    "SimulationConfig",
    "expected_totals",
    "plan_orders",
    "run_simulation",
]

BUSES = ("sync", "thread", "process", "async")
CATALOG = (
    ("book", "12.50"),
    ("mug", "7.99"),
    ("t-shirt", "19.90"),
    ("poster", "4.75"),
    ("headphones", "59.00"),
    ("socks", "3.10"),
)
CUSTOMERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
RETRY_BACKOFF = Backoff(base=0.005, cap=0.05)


@dataclass(frozen=True)
class PlannedOrder:
    customer: str
    items: tuple[dict[str, Any], ...]
    pay: bool

    @property
    def total_cents(self) -> int:
        return sum(int(Decimal(i["price"]) * 100) * i["quantity"] for i in self.items)


@dataclass(frozen=True)
class SimulationConfig:
    orders: int = 20
    pay_ratio: float = 0.7
    seed: int = 7
    bus: str = "thread"
    workers: int = 2
    fail_rate: float = 0.2
    max_retries: int = 3
    console: bool = True  # print each notification as it is sent
    write: Callable[..., Any] = field(default=print, compare=False)


def plan_orders(count: int, pay_ratio: float, seed: int) -> list[PlannedOrder]:
    """The same seed always gives the same customers, baskets and payments."""
    rng = random.Random(seed)
    plan = []
    for _ in range(count):
        customer = rng.choice(CUSTOMERS)
        chosen = rng.sample(CATALOG, rng.randint(1, 3))
        items = tuple(
            {"sku": sku, "quantity": rng.randint(1, 3), "price": price} for sku, price in chosen
        )
        plan.append(PlannedOrder(customer, items, rng.random() < pay_ratio))
    return plan


def expected_totals(plan: list[PlannedOrder]) -> dict[str, int]:
    """What the listeners must report for ``plan``, computed from the plan alone."""
    paid = [p for p in plan if p.pay]
    return {
        "orders": len(plan),
        "payments": len(paid),
        "revenue_cents": sum(p.total_cents for p in paid),
    }


class FlakyServiceError(Level2Error):
    """The loyalty service's deliberate failure."""


class LoyaltyService:
    """Awards a point per unit of currency paid; fails on purpose (see the module docstring)."""

    def __init__(
        self,
        bus: Any,
        *,
        fail_rate: float,
        seed: int,
        store: MutableMapping[str, int] | None = None,
        attempts: MutableMapping[str, int] | None = None,
        awarded: MutableMapping[str, bool] | None = None,
        lock: Any = None,
    ) -> None:
        self.fail_rate = fail_rate
        self.seed = seed
        self._store = {} if store is None else store
        self._attempts = {} if attempts is None else attempts  # event id -> tries so far
        self._awarded = {} if awarded is None else awarded  # event ids already awarded
        self._lock = threading.Lock() if lock is None else lock
        bus.subscribe("order.paid", self.on_order_paid)

    def on_order_paid(self, event: Event) -> None:
        order_id = event.data["order_id"]
        with self._lock:
            attempt = self._attempts.get(event.id, 0) + 1
            self._attempts[event.id] = attempt
            self._bump("attempts")
        if random.Random(f"{self.seed}:{order_id}:{attempt}").random() < self.fail_rate:
            with self._lock:
                self._bump("failures")
            raise FlakyServiceError(f"loyalty service unavailable ({order_id}, try {attempt})")
        with self._lock:
            if event.id not in self._awarded:  # idempotent, like the other services
                self._awarded[event.id] = True
                self._bump("awarded")
                self._bump("points", event.data["amount_cents"] // 100)

    def _bump(self, name: str, amount: int = 1) -> None:
        self._store[name] = self._store.get(name, 0) + amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            state = dict(self._store)
        return {k: state.get(k, 0) for k in ("attempts", "failures", "awarded", "points")}


# -- wiring ---------------------------------------------------------------------------------
class _Shop:
    """The services of one run, wired to one bus."""

    def __init__(self, bus: Any, config: SimulationConfig, shared: Callable[[str], Any]) -> None:
        lock = shared("lock")
        self.outbox = None if config.console else Outbox(shared("list"))
        sender = ConsoleSender(config.write) if config.console else self.outbox
        assert sender is not None
        self.notifications = NotificationService(
            bus, sender, seen=shared("dict"), counts=shared("dict"), lock=lock
        )
        self.analytics = AnalyticsService(bus, store=shared("dict"), seen=shared("dict"), lock=lock)
        self.loyalty = LoyaltyService(
            bus,
            fail_rate=config.fail_rate,
            seed=config.seed,
            store=shared("dict"),
            attempts=shared("dict"),
            awarded=shared("dict"),
            lock=lock,
        )


def _local(kind: str) -> Any:
    return {"lock": threading.Lock, "dict": dict, "list": list}[kind]()


def run_simulation(config: SimulationConfig) -> dict[str, Any]:
    """Play the plan through the chosen bus; return the summary (JSON-serialisable)."""
    if config.bus not in BUSES:
        raise ValueError(f"bus must be one of {', '.join(BUSES)}, got {config.bus!r}")
    plan = plan_orders(config.orders, config.pay_ratio, config.seed)
    started = time.perf_counter()
    queued = {
        "workers": config.workers,
        "key": by_order,  # each order's events in order; different orders in parallel
        "max_retries": config.max_retries,
        "backoff": RETRY_BACKOFF,
    }
    if config.bus == "async":
        bus: Any = AsyncEventBus(**queued)
        shop = _Shop(bus, config, _local)
        orders = AsyncOrderService(bus)
        asyncio.run(_play_async(bus, orders, plan))
        return _summary(config, plan, bus, shop, orders, started)
    with ExitStack() as stack:
        shared: Callable[[str], Any] = _local
        if config.bus == "sync":
            bus = stack.enter_context(EventBus())
        elif config.bus == "thread":
            bus = stack.enter_context(QueuedEventBus(**queued))
        else:
            # State that listeners in worker processes change must live outside them.
            manager = stack.enter_context(multiprocessing.get_context("spawn").Manager())
            factories = {"lock": manager.Lock, "dict": manager.dict, "list": manager.list}

            def shared(kind: str) -> Any:
                return factories[kind]()

            bus = stack.enter_context(ProcessEventBus(**queued, context="spawn"))
        shop = _Shop(bus, config, shared)
        orders = OrderService(bus)
        for planned in plan:
            order = orders.create_order(planned.customer, planned.items)
            if planned.pay:
                orders.pay_order(order.id)
        if config.bus != "sync":
            bus.close()  # drains: every accepted event is handled before the summary
        return _summary(config, plan, bus, shop, orders, started)


async def _play_async(
    bus: AsyncEventBus, orders: AsyncOrderService, plan: list[PlannedOrder]
) -> None:
    async with bus:
        for planned in plan:
            order = await orders.create_order(planned.customer, planned.items)
            if planned.pay:
                await orders.pay_order(order.id)


def _summary(
    config: SimulationConfig,
    plan: list[PlannedOrder],
    bus: Any,
    shop: _Shop,
    orders: OrderService | AsyncOrderService,
    started: float,
) -> dict[str, Any]:
    truth = orders.totals()
    analytics = shop.analytics.snapshot()
    notifications = shop.notifications.snapshot()
    loyalty = shop.loyalty.snapshot()
    dead = len(getattr(bus, "dead_letters", ()))
    errors = len(bus.errors)
    gave_up = errors if config.bus == "sync" else dead  # the sync bus has no dead letters
    checks = {
        "analytics orders": analytics["orders"] == truth["orders"],
        "analytics payments": analytics["payments"] == truth["payments"],
        "analytics revenue": analytics["revenue_cents"] == truth["revenue_cents"],
        "emails": notifications["emails"] == truth["orders"],
        "sms": notifications["sms"] == truth["payments"],
        "loyalty awarded or dead-lettered": loyalty["awarded"] + gave_up == truth["payments"],
        "plan": truth == expected_totals(plan),
    }
    return {
        "bus": config.bus,
        "workers": 1 if config.bus == "sync" else config.workers,
        "seed": config.seed,
        "orders": config.orders,
        "pay_ratio": config.pay_ratio,
        "fail_rate": config.fail_rate,
        "max_retries": config.max_retries,
        "ground_truth": {**truth, "revenue": format_money(truth["revenue_cents"])},
        "analytics": analytics,
        "notifications": notifications,
        "loyalty": loyalty,
        "dead_letters": dead,
        "listener_errors": errors,
        "events": len(bus.event_log),
        "consistent": all(checks.values()),
        "failed_checks": [name for name, ok in checks.items() if not ok],
        "seconds": round(time.perf_counter() - started, 3),
    }
