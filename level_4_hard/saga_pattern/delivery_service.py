"""The delivery service: schedule a delivery, cancel it as a compensation.

Events (``services/delivery.jsonl``): ``delivery.scheduled``, ``delivery.failed`` (a refusal,
or a choreography handler giving up), ``delivery.cancelled`` (the compensation) and
``delivery.voided`` (cancelled before anything was scheduled: a late schedule is refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.events import Event
from level_4_hard.saga_pattern.ledger import LedgerService, Outcome

__all__ = ["DeliveryService"]

SCHEDULED = "delivery.scheduled"
FAILED = "delivery.failed"
CANCELLED = "delivery.cancelled"


class DeliveryService(LedgerService):
    """Deliveries per saga id, each scheduled or cancelled."""

    name = "delivery"

    def _reset(self) -> None:
        self.deliveries: dict[str, dict[str, Any]] = {}

    def _apply(self, event: Event) -> None:
        saga_id = event.correlation_id
        if event.name == SCHEDULED:
            self.deliveries[saga_id] = {
                "delivery_id": event.data["delivery_id"],
                "address": event.data["address"],
                "status": "scheduled",
            }
        elif event.name == CANCELLED or (event.name == FAILED and event.data.get("undone")):
            self.deliveries[saga_id]["status"] = "cancelled"

    def schedule(self, saga_id: str, order: Mapping[str, Any]) -> Outcome:
        """Schedule the delivery of the saga's order to its address."""

        def body(refusal: str | None) -> Outcome:
            earlier = self._go_ahead(saga_id, SCHEDULED, "delivery")
            if earlier is not None:
                return earlier
            if refusal:
                raise self._fail(FAILED, saga_id, refusal, "refused")
            data = {
                "delivery_id": f"dlv-{order['order_id']}",
                "address": order["address"],
                "order_id": order["order_id"],
            }
            return Outcome(self._record(SCHEDULED, data, saga_id), True)

        return self._perform("schedule", body)

    def cancel(self, saga_id: str) -> Outcome:
        """Compensation: cancel the saga's delivery (idempotent; voids if none was scheduled)."""

        def body(_refusal: str | None) -> Outcome:
            return self._undo(saga_id, {SCHEDULED: CANCELLED})

        return self._perform("cancel", body)

    def give_up(self, saga_id: str, reason: str) -> Outcome:
        """Choreography: scheduling failed for good (``delivery.failed``)."""
        return self._give_up(saga_id, reason, done=SCHEDULED, failed=FAILED)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"deliveries": {k: v["status"] for k, v in sorted(self.deliveries.items())}}
