"""AnalyticsService: a read model of the shop — orders, payments, revenue, conversion rate.

It only listens (``order.created``, ``order.paid``) and answers ``snapshot()``. Safe under
concurrent delivery: every update is a read-modify-write under one lock, and each event id
counts once, so a redelivered event (at-least-once buses) does not inflate the numbers.

As in :mod:`notification_service`, the state (``store``, ``seen``) and the ``lock`` are
injectable: plain objects in one process, ``multiprocessing.Manager`` proxies when the listener
runs in worker processes.
"""

from __future__ import annotations

import threading
from collections.abc import MutableMapping
from typing import Any

from common.events import Event
from level_2_intermediate.order_service import format_money

__all__ = ["AnalyticsService"]


class AnalyticsService:
    """Counts what the shop did, from its events alone."""

    def __init__(
        self,
        bus: Any,
        *,
        store: MutableMapping[str, int] | None = None,
        seen: MutableMapping[str, bool] | None = None,
        lock: Any = None,
    ) -> None:
        self._store = {} if store is None else store
        self._seen = {} if seen is None else seen
        self._lock = threading.Lock() if lock is None else lock
        bus.subscribe("order.created", self.on_order_created)
        bus.subscribe("order.paid", self.on_order_paid)

    def on_order_created(self, event: Event) -> None:
        items = sum(item["quantity"] for item in event.data["items"])
        self._apply(event, orders=1, items_sold=items)

    def on_order_paid(self, event: Event) -> None:
        self._apply(event, payments=1, revenue_cents=event.data["amount_cents"])

    def _apply(self, event: Event, **increments: int) -> None:
        with self._lock:
            if event.id in self._seen:
                return  # delivered again: already counted
            self._seen[event.id] = True
            for name, amount in increments.items():
                self._store[name] = self._store.get(name, 0) + amount

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy: counts, revenue (cents and text) and the conversion rate."""
        with self._lock:
            state = dict(self._store)
        orders = state.get("orders", 0)
        payments = state.get("payments", 0)
        revenue = state.get("revenue_cents", 0)
        return {
            "orders": orders,
            "payments": payments,
            "items_sold": state.get("items_sold", 0),
            "revenue_cents": revenue,
            "revenue": format_money(revenue),
            "conversion_rate": round(payments / orders, 4) if orders else 0.0,
            "average_order_cents": revenue // payments if payments else 0,
        }
