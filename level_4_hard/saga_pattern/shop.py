"""The shop the order saga runs against: four services, built in one place.

:func:`build_shop` is the composition root of the services: with a ``data_dir`` each keeps its
ledger in ``<data_dir>/services/<name>.jsonl`` (reopening the shop in another process replays
them); without one, everything stays in memory. Initial stock and balances are written to a
ledger only when it is new, so a restarted shop starts from what it recorded, not from the seed.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.events import Event
from common.logger import get_logger
from level_4_hard.saga_pattern.clock import Clock, SystemClock
from level_4_hard.saga_pattern.delivery_service import DeliveryService
from level_4_hard.saga_pattern.inventory_service import InventoryService
from level_4_hard.saga_pattern.ledger import LedgerService
from level_4_hard.saga_pattern.order_service import OrderService
from level_4_hard.saga_pattern.payment_service import PaymentService

__all__ = ["DEFAULT_BALANCES", "DEFAULT_STOCK", "Shop", "build_shop", "make_order"]

log = get_logger(__name__)

DEFAULT_STOCK = {"book": 10, "lamp": 3, "pen": 100}
DEFAULT_BALANCES = {"ann": 100_000, "bob": 3_000}  # cents


def make_order(
    order_id: str,
    customer: str = "ann",
    items: list[dict[str, Any]] | None = None,
    address: str = "1 Main St",
) -> dict[str, Any]:
    """An order in the shape the services expect (default: 2 books at 25.00, 3 pens at 2.00)."""
    if items is None:
        items = [{"sku": "book", "qty": 2, "price": 2_500}, {"sku": "pen", "qty": 3, "price": 200}]
    return {"order_id": order_id, "customer": customer, "items": items, "address": address}


@dataclass
class Shop:
    """The four services and the clock they share (a late call's worker thread runs on it)."""

    orders: OrderService
    inventory: InventoryService
    payments: PaymentService
    deliveries: DeliveryService
    clock: Clock

    @property
    def services(self) -> tuple[LedgerService, ...]:
        return (self.orders, self.inventory, self.payments, self.deliveries)

    def snapshot(self) -> dict[str, Any]:
        """The final state a user cares about: stock, funds, orders, deliveries."""
        state: dict[str, Any] = {}
        for service in self.services:
            state.update(service.snapshot())  # type: ignore[attr-defined]
        return state

    def events(self, saga_id: str | None = None) -> list[Event]:
        """Every service's ledger events (of one saga), merged in the order they happened."""
        merged = [e for s in self.services for e in s.events(saga_id)]
        merged.sort(key=lambda e: e.timestamp_ns)  # stable: ties keep the service order
        return merged

    def effects(self, saga_id: str) -> dict[str, int]:
        """How many times each event was recorded for ``saga_id`` (exactly-once checks)."""
        counts: dict[str, int] = defaultdict(int)
        for service in self.services:
            for event in service.events(saga_id):
                counts[event.name] += 1
        return dict(counts)

    def close(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout`` s) for late calls still running, then close the ledgers."""
        if not self.clock.close(timeout):
            log.warning("closing the shop with late calls still running after %.1fs", timeout)
        for service in self.services:
            service.close()

    def __enter__(self) -> Shop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_shop(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    clock: Clock | None = None,
    durability: str = "flush",
    stock: dict[str, int] | None = None,
    balances: dict[str, int] | None = None,
) -> Shop:
    """The four services, on ledgers under ``<data_dir>/services/`` (or in memory)."""
    folder = Path(data_dir) / "services" if data_dir is not None else None
    clock = clock if clock is not None else SystemClock()

    def options(name: str) -> dict[str, Any]:
        path = folder / f"{name}.jsonl" if folder is not None else None
        return {"ledger_path": path, "durability": durability, "clock": clock}

    opened: list[LedgerService] = []
    try:  # a ledger that cannot be read must not leave the others open
        opened.append(OrderService(**options("order")))
        opened.append(
            InventoryService(DEFAULT_STOCK if stock is None else stock, **options("inventory"))
        )
        opened.append(
            PaymentService(DEFAULT_BALANCES if balances is None else balances, **options("payment"))
        )
        opened.append(DeliveryService(**options("delivery")))
    except BaseException:
        for service in opened:
            service.close()
        raise
    orders, inventory, payments, deliveries = opened
    return Shop(orders, inventory, payments, deliveries, clock)  # type: ignore[arg-type]
