"""Saga choreography: the same order process with no coordinator.

Each service reacts to the previous service's event and emits the next; a failure event
starts the compensations, which travel back the same way. The whole process is the table
:data:`REACTIONS` — read it top to bottom and you have read the saga:

* ``order.created`` -> Inventory reserves stock -> ``inventory.reserved`` or
  ``inventory.reservation_failed``;
* ``inventory.reserved`` -> Payment reserves funds -> ``payment.funds_reserved`` or
  ``payment.declined``;
* ``payment.funds_reserved`` -> Order confirms -> ``order.confirmed`` or
  ``order.confirmation_failed``;
* ``order.confirmed`` -> Delivery schedules -> ``delivery.scheduled`` or ``delivery.failed``;
* ``delivery.failed`` / ``order.confirmation_failed`` -> Payment refunds -> ``payment.refunded``;
* ``payment.declined`` / ``payment.refunded`` -> Inventory releases -> ``inventory.released``;
* ``inventory.reservation_failed`` / ``inventory.released`` -> Order cancels ->
  ``order.cancelled``.

The saga ends *completed* with ``delivery.scheduled``, *compensated* with ``order.cancelled``.
The compensations run in the same reverse order as the orchestrator's, so both styles reach
the same final state; what differs is where the process lives (a table of reactions spread
over the services, against one list of steps in one place) and what you can ask of it.

Each handler retries its service call on transient errors with the same backoff policy, and
bounds it with the same timeout (through the clock). When a *forward* call fails for good, the
service "gives up" (``give_up``): it records the failure event — a tombstone that refuses a
late call and undoes a late effect — and that event starts the compensations. A compensation
that keeps failing leaves the saga in flight: :meth:`Choreography.recover` picks it up.

Crash recovery needs no saga log: the services' ledgers (their outboxes) already hold every
fact. :meth:`Choreography.recover` finds, for each unfinished saga, the facts no reaction has
answered yet and publishes them again; the reacting services are idempotent by saga id.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.base_eventbus import BaseEventBus, Subscription
from common.events import Event
from common.logger import get_logger
from common.retry import retry_call
from level_4_hard.saga_pattern.clock import Clock
from level_4_hard.saga_pattern.errors import BusinessError
from level_4_hard.saga_pattern.ledger import Outcome, validate_order
from level_4_hard.saga_pattern.saga_log import SagaStatus
from level_4_hard.saga_pattern.saga_orchestrator import COMPENSATION_RETRY, ORDER_RETRY, Retry
from level_4_hard.saga_pattern.shop import Shop

__all__ = [
    "REACTIONS",
    "Choreography",
    "ChoreographyResult",
    "Reaction",
    "choreography_status",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class Reaction:
    """``participant`` reacts to ``trigger`` by doing ``action``, which emits one of
    ``outputs``; ``forward`` reactions give up with a failure event, compensations never do."""

    trigger: str
    participant: str
    action: str
    outputs: tuple[str, ...]
    forward: bool


REACTIONS: tuple[Reaction, ...] = (
    Reaction(
        "order.created",
        "Inventory",
        "reserve stock",
        ("inventory.reserved", "inventory.reservation_failed"),
        True,
    ),
    Reaction(
        "inventory.reserved",
        "Payment",
        "reserve funds",
        ("payment.funds_reserved", "payment.declined"),
        True,
    ),
    Reaction(
        "payment.funds_reserved",
        "Order",
        "confirm order",
        ("order.confirmed", "order.confirmation_failed"),
        True,
    ),
    Reaction(
        "order.confirmed",
        "Delivery",
        "schedule delivery",
        ("delivery.scheduled", "delivery.failed"),
        True,
    ),
    Reaction("delivery.failed", "Payment", "refund", ("payment.refunded", "payment.voided"), False),
    Reaction(
        "order.confirmation_failed",
        "Payment",
        "refund",
        ("payment.refunded", "payment.voided"),
        False,
    ),
    Reaction(
        "payment.declined",
        "Inventory",
        "release stock",
        ("inventory.released", "inventory.voided"),
        False,
    ),
    Reaction(
        "payment.refunded",
        "Inventory",
        "release stock",
        ("inventory.released", "inventory.voided"),
        False,
    ),
    Reaction(
        "payment.voided",
        "Inventory",
        "release stock",
        ("inventory.released", "inventory.voided"),
        False,
    ),
    Reaction(
        "inventory.reservation_failed",
        "Order",
        "cancel order",
        ("order.cancelled", "order.voided"),
        False,
    ),
    Reaction(
        "inventory.released", "Order", "cancel order", ("order.cancelled", "order.voided"), False
    ),
    Reaction(
        "inventory.voided", "Order", "cancel order", ("order.cancelled", "order.voided"), False
    ),
)
_BY_TRIGGER = {r.trigger: r for r in REACTIONS}
COMPENSATED_EVENTS = frozenset({"order.cancelled", "order.voided", "order.rejected"})
FAILURE_EVENTS = frozenset(
    {
        "inventory.reservation_failed",
        "payment.declined",
        "order.confirmation_failed",
        "delivery.failed",
        "order.rejected",
    }
)


def choreography_status(names: set[str] | frozenset[str]) -> SagaStatus:
    """A choreographed saga's status from the names of the facts recorded about it."""
    if names & COMPENSATED_EVENTS:
        return SagaStatus.COMPENSATED
    if names & FAILURE_EVENTS:
        return SagaStatus.COMPENSATING
    if "delivery.scheduled" in names:
        return SagaStatus.COMPLETED
    return SagaStatus.RUNNING


@dataclass(frozen=True)
class ChoreographyResult:
    """How a choreographed saga stands, and the facts the services recorded for it, in order."""

    saga_id: str
    status: SagaStatus
    events: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.status is SagaStatus.COMPLETED


class Choreography:
    """Subscribes the four services' reactions on ``bus``; ``close()`` unsubscribes them.

    Works on any bus of the repository: on the synchronous EventBus a whole saga runs inside
    :meth:`start` (events emitted by handlers are queued, breadth first); on a queued bus the
    handlers run on worker threads and :meth:`run` waits for the saga's terminal event.
    """

    def __init__(
        self,
        shop: Shop,
        bus: BaseEventBus,
        *,
        clock: Clock | None = None,
        retry: Retry = ORDER_RETRY,
        timeout: float | None = 2.0,
        compensation_retry: Retry = COMPENSATION_RETRY,
    ) -> None:
        self.shop = shop
        self.bus = bus
        self.clock: Clock = clock if clock is not None else shop.clock
        self.retry = retry
        self.compensation_retry = compensation_retry
        self.timeout = timeout
        self._lock = threading.Lock()
        self._finished: dict[str, threading.Event] = {}  # set when a saga ends or stalls
        self._stalled: set[str] = set()
        inv, pay, orders, dlv = shop.inventory, shop.payments, shop.orders, shop.deliveries
        order_of: Callable[[Event], Mapping[str, Any]] = lambda e: e.data["order"]  # noqa: E731
        release = (lambda s, e: inv.release(s), None)
        refund = (lambda s, e: pay.refund(s), None)
        cancel = (lambda s, e: orders.cancel(s), None)
        # trigger -> (call(saga_id, event) -> Outcome, give_up(saga_id, reason) or None)
        self._calls: dict[str, tuple[Callable[[str, Event], Outcome], Any]] = {
            "order.created": (lambda s, e: inv.reserve(s, order_of(e)), inv.give_up),
            "inventory.reserved": (lambda s, e: pay.reserve_funds(s, order_of(e)), pay.give_up),
            "payment.funds_reserved": (lambda s, e: orders.confirm(s), orders.give_up),
            "order.confirmed": (lambda s, e: dlv.schedule(s, order_of(e)), dlv.give_up),
            "delivery.failed": refund,
            "order.confirmation_failed": refund,
            "payment.declined": release,
            "payment.refunded": release,
            "payment.voided": release,
            "inventory.reservation_failed": cancel,
            "inventory.released": cancel,
            "inventory.voided": cancel,
        }
        self._subscriptions: list[Subscription] = []
        for reaction in REACTIONS:
            self._subscriptions.append(bus.subscribe(reaction.trigger, self._handler(reaction)))
        for name in (*COMPENSATED_EVENTS, "delivery.scheduled"):
            self._subscriptions.append(bus.subscribe(name, self._observe))

    # -- starting and waiting -------------------------------------------------------------------
    def start(self, order: Mapping[str, Any], *, saga_id: str | None = None) -> str:
        """Create the order (``order.created``): the first domino. Returns the saga id
        (default ``order-<order_id>``). Starting an existing saga again does nothing if it
        ended, and resumes it (like :meth:`recover`, for this saga) if it is in flight."""
        order = validate_order(order)
        saga_id = saga_id or f"order-{order['order_id']}"
        with self._lock:
            self._finished.setdefault(saga_id, threading.Event())
        try:
            outcome = self.shop.orders.create(saga_id, order)
        except BusinessError as exc:  # order.rejected: the saga ends before it starts
            if exc.new and exc.event is not None:
                self.bus.publish(exc.event)
            return saga_id
        if outcome.new:
            self.bus.publish(outcome.event)
        else:
            self._republish(self.pending(saga_id))
        return saga_id

    def run(
        self, order: Mapping[str, Any], *, saga_id: str | None = None, timeout: float = 30.0
    ) -> ChoreographyResult:
        """Start a saga and wait (at most ``timeout`` real seconds) until it ends."""
        saga_id = self.start(order, saga_id=saga_id)
        self.wait(saga_id, timeout)
        return self.result(saga_id)

    def wait(self, saga_id: str, timeout: float = 30.0) -> bool:
        """Wait until the saga ends, or stalls (a compensation failed for good: nothing more
        happens until :meth:`recover`); False if ``timeout`` real seconds passed first."""
        with self._lock:
            finished = self._finished.setdefault(saga_id, threading.Event())
        if not self.status(saga_id).in_flight:
            with self._lock:  # ended: nothing to wait for, nothing to keep
                self._finished.pop(saga_id, None)
            return True
        return finished.wait(timeout)

    def stalled(self, saga_id: str) -> bool:
        """True if the saga stopped in flight here (it waits for :meth:`recover`)."""
        with self._lock:
            return saga_id in self._stalled and self.status(saga_id).in_flight

    def status(self, saga_id: str) -> SagaStatus:
        """Where the saga stands, from the facts in the services' ledgers."""
        return choreography_status({e.name for e in self.shop.events(saga_id)})

    def result(self, saga_id: str) -> ChoreographyResult:
        names = tuple(e.name for e in self.shop.events(saga_id))
        return ChoreographyResult(saga_id, choreography_status(set(names)), names)

    # -- recovery -----------------------------------------------------------------------------
    def pending(self, saga_id: str | None = None) -> dict[str, list[Event]]:
        """For each unfinished saga (or just ``saga_id``), the recorded facts that no
        reaction has answered yet."""
        facts: dict[str, list[Event]] = {}
        for event in self.shop.events(saga_id):
            if event.correlation_id is not None:
                facts.setdefault(event.correlation_id, []).append(event)
        pending: dict[str, list[Event]] = {}
        for saga_id, events in facts.items():
            names = {e.name for e in events}
            if not choreography_status(names).in_flight:
                continue
            unanswered = [
                e
                for e in events
                if e.name in _BY_TRIGGER and not names.intersection(_BY_TRIGGER[e.name].outputs)
            ]
            if unanswered:
                pending[saga_id] = unanswered
        return pending

    def recover(self) -> list[str]:
        """Publish again every unanswered fact (after a crash, or a compensation that kept
        failing); returns the saga ids it touched. Reactions are idempotent by saga id."""
        pending = self.pending()
        self._republish(pending)
        return list(pending)

    def _republish(self, pending: dict[str, list[Event]]) -> None:
        for saga_id, events in pending.items():
            with self._lock:
                self._stalled.discard(saga_id)
                self._finished.setdefault(saga_id, threading.Event()).clear()
            log.info(
                "recovering choreographed saga %s: re-publishing %s",
                saga_id,
                [e.name for e in events],
            )
            for event in events:
                self.bus.publish(event)

    def close(self) -> None:
        """Unsubscribe every reaction."""
        for subscription in self._subscriptions:
            subscription.cancel()
        self._subscriptions.clear()

    def __enter__(self) -> Choreography:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the reactions ----------------------------------------------------------------------------
    def _observe(self, event: Event) -> None:
        saga_id = event.correlation_id
        if saga_id is None or self.status(saga_id).in_flight:
            return
        with self._lock:  # ended: wake the waiters and forget it (wait() checks the ledgers)
            self._stalled.discard(saga_id)
            finished = self._finished.pop(saga_id, None)
        if finished is not None:
            finished.set()

    def _stall(self, saga_id: str) -> None:
        """Nothing more will happen to this saga until recover(): wake whoever waits on it."""
        with self._lock:
            self._stalled.add(saga_id)
            finished = self._finished.setdefault(saga_id, threading.Event())
        finished.set()

    def _handler(self, reaction: Reaction) -> Callable[[Event], None]:
        call, give_up = self._calls[reaction.trigger]

        def react(event: Event) -> None:
            saga_id = event.correlation_id
            if saga_id is None:
                log.warning("%s without a saga id (correlation_id): ignored", event.name)
                return
            try:
                self._react(reaction, event, saga_id, call, give_up)
            except BaseException:  # a bug or a broken ledger: the bus logs it, recover() resumes
                self._stall(saga_id)
                raise

        react.__qualname__ = f"{reaction.participant}.on_{reaction.trigger.replace('.', '_')}"
        return react

    def _react(
        self,
        reaction: Reaction,
        event: Event,
        saga_id: str,
        call: Callable[[str, Event], Outcome],
        give_up: Callable[[str, str], Outcome] | None,
    ) -> None:
        policy = self.retry if reaction.forward else self.compensation_retry

        def on_retry(attempt: int, exc: BaseException, delay: float) -> None:
            log.info(
                "saga %s: %s attempt %d failed (%s); retry in %.3gs",
                saga_id,
                reaction.action,
                attempt,
                exc,
                delay,
            )

        try:
            outcome = retry_call(
                lambda: self.clock.call(lambda: call(saga_id, event), self.timeout),
                attempts=policy.attempts,
                backoff=policy.backoff,
                retry_on=policy.retry_on,
                sleep=self.clock.sleep,
                on_retry=on_retry,
            )
        except BusinessError as exc:  # a definite "no": the service recorded its failure event
            if exc.new and exc.event is not None:
                self.bus.publish(exc.event)
            return
        except Exception as exc:
            if give_up is None:
                log.error(
                    "saga %s: %s failed after %d attempt(s) (%s); the saga stays in flight "
                    "until recover()",
                    saga_id,
                    reaction.action,
                    policy.attempts,
                    exc,
                )
                self._stall(saga_id)
                return
            outcome = give_up(saga_id, f"{reaction.action} failed: {type(exc).__name__}: {exc}")
        if outcome.new:
            self.bus.publish(outcome.event)
