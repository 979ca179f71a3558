"""The order service: create the order, confirm it, cancel it as a compensation.

Events (``services/order.jsonl``): ``order.created`` (status pending), ``order.rejected`` (a
refusal to take the order: nothing is created), ``order.confirmed``,
``order.confirmation_failed`` (a refusal, or a choreography handler giving up),
``order.cancelled`` (the compensation of ``create``) and ``order.voided``.

Confirmation has no compensation of its own: cancelling the order (the compensation of the
first step, which runs last) undoes it, and a late confirmation of a cancelled order is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.events import Event
from level_4_hard.saga_pattern.ledger import LedgerService, Outcome, order_total, validate_order

__all__ = ["OrderService"]

CREATED = "order.created"
CONFIRMED = "order.confirmed"
CONFIRMATION_FAILED = "order.confirmation_failed"
CANCELLED = "order.cancelled"
REJECTED = "order.rejected"


class OrderService(LedgerService):
    """Orders per saga id, each with a status: pending, confirmed or cancelled."""

    name = "order"

    def _reset(self) -> None:
        self.orders: dict[str, dict[str, Any]] = {}
        self._created: dict[str, Event] = {}

    def _apply(self, event: Event) -> None:
        saga_id = event.correlation_id
        if event.name == CREATED:
            order = event.data["order"]
            self.orders[saga_id] = {
                "order_id": order["order_id"],
                "customer": order["customer"],
                "total": order_total(order),
                "status": "pending",
            }
            self._created[saga_id] = event
        elif event.name == CONFIRMED:
            self.orders[saga_id]["status"] = "confirmed"
        elif event.name == CONFIRMATION_FAILED and event.data.get("undone"):
            self.orders[saga_id]["status"] = "pending"
        elif event.name == CANCELLED:
            self.orders[saga_id]["status"] = "cancelled"

    def create(self, saga_id: str, order: Mapping[str, Any]) -> Outcome:
        """Record a new pending order (validated: a clear ValueError for a bad one)."""
        order = validate_order(order)

        def body(refusal: str | None) -> Outcome:
            created = self._created.get(saga_id)
            if created is not None and self.orders[saga_id]["status"] != "cancelled":
                return Outcome(created, False)
            earlier = self._go_ahead(saga_id, CREATED, "order creation")
            if earlier is not None:
                return earlier
            if refusal:
                raise self._fail(REJECTED, saga_id, refusal, "refused")
            return Outcome(self._record(CREATED, {"order": order}, saga_id), True)

        return self._perform("create", body)

    def confirm(self, saga_id: str) -> Outcome:
        """Confirm the saga's pending order."""

        def body(refusal: str | None) -> Outcome:
            earlier = self._go_ahead(saga_id, CONFIRMED, "confirmation", after=CREATED)
            if earlier is not None:
                return earlier
            if refusal:
                raise self._fail(CONFIRMATION_FAILED, saga_id, refusal, "refused")
            order = self._created[saga_id].data["order"]
            return Outcome(self._record(CONFIRMED, {"order": order}, saga_id), True)

        return self._perform("confirm", body)

    def cancel(self, saga_id: str, reason: str = "saga compensated") -> Outcome:
        """Compensation of ``create``: cancel the order, pending or confirmed (idempotent)."""

        def body(_refusal: str | None) -> Outcome:
            undoable = {CREATED: CANCELLED, CONFIRMED: CANCELLED, CONFIRMATION_FAILED: CANCELLED}
            return self._undo(saga_id, undoable, reason=reason)

        return self._perform("cancel", body)

    def give_up(self, saga_id: str, reason: str) -> Outcome:
        """Choreography: the confirmation failed for good (``order.confirmation_failed``)."""
        return self._give_up(
            saga_id, reason, done=CONFIRMED, failed=CONFIRMATION_FAILED, after=CREATED
        )

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"orders": {k: v["status"] for k, v in sorted(self.orders.items())}}
