"""The inventory service: reserve stock for an order, release it as a compensation.

Events (its ledger, ``services/inventory.jsonl``): ``inventory.restocked``,
``inventory.reserved``, ``inventory.reservation_failed`` (out of stock, a refusal, or a
choreography handler giving up), ``inventory.released`` (the compensation) and
``inventory.voided`` (released before anything was reserved: a late reservation is refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.events import Event
from level_4_hard.saga_pattern.ledger import LedgerService, Outcome

__all__ = ["InventoryService"]

RESERVED = "inventory.reserved"
FAILED = "inventory.reservation_failed"
RELEASED = "inventory.released"


class InventoryService(LedgerService):
    """Stock per SKU; a reservation per saga id. ``stock`` seeds a new (empty) ledger only."""

    name = "inventory"

    def __init__(self, stock: Mapping[str, int] | None = None, **options: Any) -> None:
        super().__init__(**options)
        if stock and not self.history:
            self.restock(stock)

    def _reset(self) -> None:
        self.stock: dict[str, int] = {}
        self.reservations: dict[str, list[dict[str, Any]]] = {}

    def _apply(self, event: Event) -> None:
        data, saga_id = event.data, event.correlation_id
        if event.name == "inventory.restocked":
            for sku, qty in data["items"].items():
                self.stock[sku] = self.stock.get(sku, 0) + qty
        elif event.name == RESERVED:
            for item in data["items"]:
                self.stock[item["sku"]] = self.stock.get(item["sku"], 0) - item["qty"]
            self.reservations[saga_id] = data["items"]
        elif event.name == RELEASED or (event.name == FAILED and data.get("undone")):
            for item in self.reservations.pop(saga_id, ()):
                self.stock[item["sku"]] += item["qty"]

    def restock(self, items: Mapping[str, int]) -> Event:
        """Add stock (not part of any saga)."""
        if not isinstance(items, Mapping) or not items:
            raise ValueError("restock needs a non-empty mapping of sku -> quantity")
        for sku, qty in items.items():
            if not isinstance(sku, str) or not sku:
                raise ValueError(f"sku must be a non-empty string, got {sku!r}")
            if isinstance(qty, bool) or not isinstance(qty, int) or qty < 1:
                raise ValueError(f"quantity of {sku!r} must be a positive integer, got {qty!r}")
        with self._lock:
            return self._record("inventory.restocked", {"items": dict(items)}, None)

    def reserve(self, saga_id: str, order: Mapping[str, Any]) -> Outcome:
        """Take the order's items out of stock for this saga; InsufficientStock if short."""
        wanted: dict[str, int] = {}
        for item in order["items"]:
            wanted[item["sku"]] = wanted.get(item["sku"], 0) + item["qty"]

        def body(refusal: str | None) -> Outcome:
            earlier = self._go_ahead(saga_id, RESERVED, "reservation")
            if earlier is not None:
                return earlier
            if refusal:
                raise self._fail(FAILED, saga_id, refusal, "refused")
            short = {sku: qty for sku, qty in wanted.items() if self.stock.get(sku, 0) < qty}
            if short:
                available = {sku: self.stock.get(sku, 0) for sku in short}
                reason = f"out of stock: wanted {short}, available {available}"
                raise self._fail(FAILED, saga_id, reason, "insufficient_stock")
            items = [{"sku": sku, "qty": qty} for sku, qty in wanted.items()]
            return Outcome(
                self._record(RESERVED, {"items": items, "order": dict(order)}, saga_id), True
            )

        return self._perform("reserve", body)

    def release(self, saga_id: str) -> Outcome:
        """Compensation: put the saga's reserved items back (idempotent; voids if none)."""

        def body(_refusal: str | None) -> Outcome:
            items = self.reservations.get(saga_id, [])
            return self._undo(saga_id, {RESERVED: RELEASED}, items=items)

        return self._perform("release", body)

    def give_up(self, saga_id: str, reason: str) -> Outcome:
        """Choreography: the reservation failed for good (``inventory.reservation_failed``)."""
        return self._give_up(saga_id, reason, done=RESERVED, failed=FAILED)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "stock": dict(sorted(self.stock.items())),
                "reserved": {k: list(v) for k, v in sorted(self.reservations.items())},
            }
