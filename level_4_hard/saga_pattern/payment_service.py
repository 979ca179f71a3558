"""The payment service: reserve (hold) an order's funds, refund them as a compensation.

Events (``services/payment.jsonl``): ``payment.deposited``, ``payment.funds_reserved``,
``payment.declined`` (insufficient funds — a business failure —, a refusal, or a choreography
handler giving up), ``payment.refunded`` (the compensation) and ``payment.voided``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.events import Event
from level_4_hard.saga_pattern.ledger import LedgerService, Outcome, order_total

__all__ = ["PaymentService"]

RESERVED = "payment.funds_reserved"
DECLINED = "payment.declined"
REFUNDED = "payment.refunded"


class PaymentService(LedgerService):
    """Balances per customer (cents); a hold per saga id. ``balances`` seeds a new ledger."""

    name = "payment"

    def __init__(self, balances: Mapping[str, int] | None = None, **options: Any) -> None:
        super().__init__(**options)
        if balances and not self.history:
            for customer, amount in balances.items():
                self.deposit(customer, amount)

    def _reset(self) -> None:
        self.balances: dict[str, int] = {}
        self.held: dict[str, dict[str, Any]] = {}

    def _apply(self, event: Event) -> None:
        data, saga_id = event.data, event.correlation_id
        if event.name == "payment.deposited":
            self.balances[data["customer"]] = (
                self.balances.get(data["customer"], 0) + data["amount"]
            )
        elif event.name == RESERVED:
            self.balances[data["customer"]] = (
                self.balances.get(data["customer"], 0) - data["amount"]
            )
            self.held[saga_id] = {"customer": data["customer"], "amount": data["amount"]}
        elif event.name == REFUNDED or (event.name == DECLINED and data.get("undone")):
            hold = self.held.pop(saga_id, None)
            if hold is not None:
                self.balances[hold["customer"]] += hold["amount"]

    def deposit(self, customer: str, amount: int) -> Event:
        """Add money to a customer's balance (not part of any saga)."""
        if not isinstance(customer, str) or not customer:
            raise ValueError(f"customer must be a non-empty string, got {customer!r}")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
            raise ValueError(f"amount must be a positive integer (cents), got {amount!r}")
        with self._lock:
            return self._record("payment.deposited", {"customer": customer, "amount": amount}, None)

    def reserve_funds(self, saga_id: str, order: Mapping[str, Any]) -> Outcome:
        """Hold the order total from the customer's balance; InsufficientFunds if it is short."""
        customer, amount = order["customer"], order_total(order)

        def body(refusal: str | None) -> Outcome:
            earlier = self._go_ahead(saga_id, RESERVED, "funds reservation")
            if earlier is not None:
                return earlier
            if refusal:
                raise self._fail(DECLINED, saga_id, refusal, "refused")
            balance = self.balances.get(customer, 0)
            if balance < amount:
                reason = f"insufficient funds: {customer} has {balance}, the order needs {amount}"
                raise self._fail(DECLINED, saga_id, reason, "insufficient_funds")
            data = {"customer": customer, "amount": amount, "order": dict(order)}
            return Outcome(self._record(RESERVED, data, saga_id), True)

        return self._perform("reserve_funds", body)

    def refund(self, saga_id: str) -> Outcome:
        """Compensation: give the held amount back (idempotent; voids if nothing was held)."""

        def body(_refusal: str | None) -> Outcome:
            hold = self.held.get(saga_id, {})
            return self._undo(saga_id, {RESERVED: REFUNDED}, **hold)

        return self._perform("refund", body)

    def give_up(self, saga_id: str, reason: str) -> Outcome:
        """Choreography: the funds reservation failed for good (``payment.declined``)."""
        return self._give_up(saga_id, reason, done=RESERVED, failed=DECLINED)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "balances": dict(sorted(self.balances.items())),
                "held": {k: v["amount"] for k, v in sorted(self.held.items())},
            }
