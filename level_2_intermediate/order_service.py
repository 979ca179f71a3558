"""OrderService: the shop's command side. It validates, stores, and emits the facts.

``create_order(customer, items)`` emits ``order.created``; ``pay_order(order_id)`` emits
``order.paid``. Both events carry the order id as ``correlation_id``, so a queued bus can keep
each order's events in order (``key=by_order``) while different orders are handled in parallel.

Error policy (a command, not an event: failures go to the caller): bad input raises
:class:`InvalidOrderError` (a ValueError) naming the problem; paying an unknown order raises
:class:`UnknownOrderError`; paying twice raises :class:`OrderAlreadyPaidError`. In every case
nothing is stored and nothing is emitted. If the bus refuses the event (a full queue, a closed
bus), the order is taken back (created) or left unpaid (paid) and the bus's error is raised:
the service never holds an order whose event was not accepted.

Money is kept in integer cents: prices are parsed as decimals, so 0.1 + 0.2 is exactly 0.30.
:class:`AsyncOrderService` is the same service for :class:`AsyncEventBus` (``await``).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from common.events import Event
from level_2_intermediate.errors import (
    InvalidOrderError,
    OrderAlreadyPaidError,
    UnknownOrderError,
)

__all__ = [
    "AsyncOrderService",
    "Order",
    "OrderItem",
    "OrderService",
    "by_order",
    "format_money",
    "parse_items",
]


@dataclass(frozen=True)
class OrderItem:
    sku: str
    quantity: int
    price_cents: int

    def to_dict(self) -> dict[str, Any]:
        return {"sku": self.sku, "quantity": self.quantity, "price_cents": self.price_cents}


@dataclass(frozen=True)
class Order:
    id: str
    customer: str
    items: tuple[OrderItem, ...]
    total_cents: int
    status: str = "created"  # created -> paying -> paid


def format_money(cents: int) -> str:
    """``1234`` -> ``"12.34"``."""
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"


def by_order(event: Event) -> str | None:
    """Ordering key for a queued bus: the order id, carried as the correlation id."""
    return event.correlation_id


def _price_cents(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise InvalidOrderError(f"{where}: price must be a number, got {value!r}")
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise InvalidOrderError(f"{where}: price is not a number: {value!r}") from None
    if not price.is_finite() or price < 0:
        raise InvalidOrderError(f"{where}: price must be a non-negative amount, got {value!r}")
    cents = price * 100
    if cents != cents.to_integral_value():
        raise InvalidOrderError(f"{where}: price has more than 2 decimals: {value!r}")
    return int(cents)


def parse_items(items: Any) -> tuple[OrderItem, ...]:
    """Validate ``items``: a non-empty list of ``{"sku", "quantity", "price"}`` (or OrderItem)."""
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise InvalidOrderError(f"items must be a list of items, got {type(items).__name__}")
    parsed = []
    for number, item in enumerate(items, 1):
        where = f"item {number}"
        if isinstance(item, OrderItem):
            item = {"sku": item.sku, "quantity": item.quantity, "price_cents": item.price_cents}
        if not isinstance(item, Mapping):
            raise InvalidOrderError(f"{where} must be a mapping, got {type(item).__name__}")
        sku = item.get("sku")
        if not isinstance(sku, str) or not sku.strip():
            raise InvalidOrderError(f"{where}: sku must be a non-empty string, got {sku!r}")
        quantity = item.get("quantity")
        if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity <= 0:
            raise InvalidOrderError(
                f"{where} ({sku}): quantity must be a positive integer, got {quantity!r}"
            )
        if "price_cents" in item:
            cents = item["price_cents"]
            if isinstance(cents, bool) or not isinstance(cents, int) or cents < 0:
                raise InvalidOrderError(
                    f"{where} ({sku}): price_cents must be an integer >= 0, got {cents!r}"
                )
        elif "price" in item:
            cents = _price_cents(item["price"], f"{where} ({sku})")
        else:
            raise InvalidOrderError(f"{where} ({sku}): price is missing")
        parsed.append(OrderItem(sku.strip(), quantity, cents))
    if not parsed:
        raise InvalidOrderError("an order needs at least one item")
    return tuple(parsed)


class _OrderBook:
    """The state and rules shared by the sync and async services (no I/O, no bus)."""

    def __init__(self, id_prefix: str = "ord") -> None:
        self._lock = threading.Lock()
        self._orders: dict[str, Order] = {}
        self._ids = itertools.count(1)
        self._id_prefix = id_prefix

    def _open(self, customer: Any, items: Any) -> tuple[Order, dict[str, Any]]:
        if not isinstance(customer, str) or not customer.strip():
            raise InvalidOrderError(f"customer must be a non-empty string, got {customer!r}")
        parsed = parse_items(items)
        total = sum(item.quantity * item.price_cents for item in parsed)
        with self._lock:
            order_id = f"{self._id_prefix}-{next(self._ids):06d}"
            order = Order(order_id, customer.strip(), parsed, total)
            self._orders[order.id] = order
        data = {
            "order_id": order.id,
            "customer": order.customer,
            "items": [item.to_dict() for item in order.items],
            "total_cents": order.total_cents,
        }
        return order, data

    def _take_back(self, order: Order) -> None:
        with self._lock:
            self._orders.pop(order.id, None)

    def _begin_payment(self, order_id: Any) -> tuple[Order, dict[str, Any]]:
        with self._lock:
            order = self._orders.get(order_id) if isinstance(order_id, str) else None
            if order is None:
                raise UnknownOrderError(f"no order with id {order_id!r}")
            if order.status == "paid":
                raise OrderAlreadyPaidError(f"order {order_id} is already paid")
            if order.status == "paying":
                raise OrderAlreadyPaidError(f"a payment for order {order_id} is in progress")
            self._orders[order.id] = _with_status(order, "paying")
        data = {
            "order_id": order.id,
            "customer": order.customer,
            "amount_cents": order.total_cents,
        }
        return order, data

    def _end_payment(self, order: Order, accepted: bool) -> Order:
        with self._lock:
            done = _with_status(order, "paid" if accepted else "created")
            self._orders[order.id] = done
            return done

    # -- queries ----------------------------------------------------------------------------
    def get(self, order_id: str) -> Order:
        with self._lock:
            order = self._orders.get(order_id)
        if order is None:
            raise UnknownOrderError(f"no order with id {order_id!r}")
        return order

    @property
    def orders(self) -> list[Order]:
        with self._lock:
            return list(self._orders.values())

    def totals(self) -> dict[str, int]:
        """The ground truth the read models must agree with."""
        orders = self.orders
        paid = [o for o in orders if o.status == "paid"]
        return {
            "orders": len(orders),
            "payments": len(paid),
            "revenue_cents": sum(o.total_cents for o in paid),
        }


def _with_status(order: Order, status: str) -> Order:
    return Order(order.id, order.customer, order.items, order.total_cents, status)


class OrderService(_OrderBook):
    """Creates and pays orders, emitting ``order.created`` and ``order.paid`` on ``bus``."""

    def __init__(self, bus: Any, *, id_prefix: str = "ord") -> None:
        super().__init__(id_prefix)
        self._bus = bus

    def create_order(self, customer: str, items: Iterable[Mapping[str, Any] | OrderItem]) -> Order:
        """Validate, store, and emit ``order.created``; returns the Order."""
        order, data = self._open(customer, items)
        try:
            self._bus.emit("order.created", data, correlation_id=order.id)
        except BaseException:
            self._take_back(order)
            raise
        return order

    def pay_order(self, order_id: str) -> Order:
        """Mark the order paid and emit ``order.paid``; returns the paid Order."""
        order, data = self._begin_payment(order_id)
        try:
            self._bus.emit("order.paid", data, correlation_id=order.id)
        except BaseException:
            self._end_payment(order, accepted=False)
            raise
        return self._end_payment(order, accepted=True)


class AsyncOrderService(_OrderBook):
    """OrderService for AsyncEventBus: the same rules, ``await``-ed emits."""

    def __init__(self, bus: Any, *, id_prefix: str = "ord") -> None:
        super().__init__(id_prefix)
        self._bus = bus

    async def create_order(
        self, customer: str, items: Iterable[Mapping[str, Any] | OrderItem]
    ) -> Order:
        order, data = self._open(customer, items)
        try:
            await self._bus.emit("order.created", data, correlation_id=order.id)
        except BaseException:
            self._take_back(order)
            raise
        return order

    async def pay_order(self, order_id: str) -> Order:
        order, data = self._begin_payment(order_id)
        try:
            await self._bus.emit("order.paid", data, correlation_id=order.id)
        except BaseException:
            self._end_payment(order, accepted=False)
            raise
        return self._end_payment(order, accepted=True)
