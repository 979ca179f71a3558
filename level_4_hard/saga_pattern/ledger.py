"""The base of the four services: state rebuilt from the service's own ledger of events.

A service never keeps state that is not in its ledger. Every change is one
:class:`~common.events.Event` (``inventory.reserved``, ``payment.refunded``…) with
``correlation_id`` = the saga id, appended to ``services/<name>.jsonl`` through
:class:`~common.storage.AppendLog` *before* the in-memory state changes; opening the service
replays the ledger (a torn last line left by a killed process is cut off by AppendLog). So a
service restarted after a crash knows exactly what it did, which is what makes its operations
idempotent across processes:

* every operation is keyed by saga id and looks at what the ledger already says about that saga
  first: calling it again returns the recorded outcome (``Outcome(event, new=False)``) with no
  second effect;
* a compensation for a saga whose action never took effect records a tombstone
  (``<service>.voided``), so a late action arriving afterwards is refused
  (:class:`~level_4_hard.saga_pattern.errors.SagaVoided`) instead of taking effect.

The ledger is also the service's *outbox*: the caller (the orchestrator's step, or a
choreography handler) publishes the returned event on the bus once the call has returned.
Operations hold one lock per service, so concurrent calls (a late call from a timed-out worker
thread and its compensation) are serialised.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from common.events import Event
from common.logger import get_logger
from common.storage import AppendLog
from level_4_hard.saga_pattern.clock import Clock, SystemClock
from level_4_hard.saga_pattern.errors import (
    BusinessError,
    InsufficientFunds,
    InsufficientStock,
    SagaLogError,
    SagaVoided,
    ServiceRefused,
)
from level_4_hard.saga_pattern.faults import Faults
from level_4_hard.saga_pattern.saga_log import read_events

__all__ = ["LedgerService", "Outcome", "order_total", "validate_order"]

log = get_logger(__name__)

# The kind of a recorded failure -> the error raised when the same call comes again.
FAILURE_KINDS: dict[str, type[BusinessError]] = {
    "insufficient_stock": InsufficientStock,
    "insufficient_funds": InsufficientFunds,
    "refused": ServiceRefused,
    "gave_up": SagaVoided,
}


class Outcome(NamedTuple):
    """What an operation did: the ledger event that records it, and whether it is new.

    ``new`` is False when the call repeated an earlier one (same saga id): nothing happened
    again, and ``event`` is the one recorded the first time.
    """

    event: Event
    new: bool


def validate_order(order: Any) -> dict[str, Any]:
    """Check an order's shape; returns it, or raises ValueError naming what is wrong.

    An order is ``{"order_id": str, "customer": str, "address": str,
    "items": [{"sku": str, "qty": int > 0, "price": int >= 0}, ...]}`` (prices in cents).
    """
    if not isinstance(order, Mapping):
        raise ValueError(f"an order must be a dict, got {type(order).__name__}")
    for key in ("order_id", "customer", "address"):
        value = order.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"order[{key!r}] must be a non-empty string, got {value!r}")
    items = order.get("items")
    if not isinstance(items, list) or not items:
        raise ValueError("order['items'] must be a non-empty list")
    for n, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"order item {n} must be a dict, got {type(item).__name__}")
        sku, qty, price = item.get("sku"), item.get("qty"), item.get("price")
        if not isinstance(sku, str) or not sku:
            raise ValueError(f"order item {n}: 'sku' must be a non-empty string, got {sku!r}")
        if isinstance(qty, bool) or not isinstance(qty, int) or qty < 1:
            raise ValueError(f"order item {n}: 'qty' must be a positive integer, got {qty!r}")
        if isinstance(price, bool) or not isinstance(price, int) or price < 0:
            raise ValueError(f"order item {n}: 'price' must be an integer >= 0, got {price!r}")
    return dict(order)


def order_total(order: Mapping[str, Any]) -> int:
    """The order's amount in cents."""
    return sum(item["qty"] * item["price"] for item in order["items"])


class LedgerService:
    """Ledger, lock, faults and clock shared by the services; subclasses hold the business.

    ``ledger_path`` None keeps the ledger in memory only (tests, benchmarks); ``durability``
    is AppendLog's (``"flush"`` survives the process dying, ``"fsync"`` a power cut).
    Subclasses define ``name``, ``_reset()`` (empty state) and ``_apply(event)`` (one state
    transition, used both live and on replay).
    """

    name: ClassVar[str] = "service"

    def __init__(
        self,
        *,
        ledger_path: str | os.PathLike[str] | None = None,
        durability: str = "flush",
        clock: Clock | None = None,
    ) -> None:
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.faults = Faults()
        self.history: list[Event] = []
        self._lock = threading.RLock()
        # Per saga id: its events here, in order; the last one is its step's status.
        self._by_saga: dict[str, list[Event]] = {}
        self._reset()
        self.ledger_path = Path(ledger_path) if ledger_path is not None else None
        self._file: AppendLog | None = None
        if self.ledger_path is not None:
            self._file = AppendLog(self.ledger_path, durability=durability)
            try:
                self._replay()
            except BaseException:
                self.close()
                raise

    # -- subclass hooks -----------------------------------------------------------------
    def _reset(self) -> None:
        raise NotImplementedError

    def _apply(self, event: Event) -> None:
        raise NotImplementedError

    # -- the ledger ---------------------------------------------------------------------
    def _replay(self) -> None:
        assert self.ledger_path is not None
        for event in read_events(self.ledger_path):
            try:
                self._remember(event)
            except (KeyError, TypeError, ValueError) as exc:
                raise SagaLogError(
                    f"{self.ledger_path}: cannot apply {event.name} [{event.id}]: {exc!r}"
                ) from None

    def _remember(self, event: Event) -> None:
        self._apply(event)
        self.history.append(event)
        if event.correlation_id is not None:
            self._by_saga.setdefault(event.correlation_id, []).append(event)

    def _record(self, name: str, data: dict[str, Any], saga_id: str | None) -> Event:
        """Append one event to the ledger, then apply it (the caller holds the lock)."""
        event = Event(name, data, correlation_id=saga_id)
        if self._file is not None:
            self._file.append(event.to_json_bytes())  # before the state changes
        self._remember(event)
        return event

    def last(self, saga_id: str) -> Event | None:
        """The latest event this service recorded for ``saga_id`` (None if none)."""
        with self._lock:
            return self._last(saga_id)

    def events(self, saga_id: str | None = None) -> list[Event]:
        """The ledger's events, all or those of one saga, in the order they were recorded."""
        with self._lock:
            if saga_id is None:
                return list(self.history)
            return list(self._by_saga.get(saga_id, ()))

    def _last(self, saga_id: str) -> Event | None:
        events = self._by_saga.get(saga_id)
        return events[-1] if events else None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    # -- helpers for operations ---------------------------------------------------------
    def _perform(self, op: str, body: Callable[[str | None], Outcome]) -> Outcome:
        """Run one operation: its injected faults, then ``body(refusal)`` under the lock."""
        plan = self.faults.plan(op)  # may raise TransientError (before any effect)
        if plan.delay_before:
            self.clock.sleep(plan.delay_before)
        try:
            with self._lock:
                return body(plan.refusal)
        finally:
            if plan.delay_after:
                self.clock.sleep(plan.delay_after)

    def _go_ahead(
        self, saga_id: str, done: str, what: str, *, after: str | None = None
    ) -> Outcome | None:
        """The idempotency check before a forward action (the caller holds the lock).

        None: the action may go ahead (nothing recorded for this saga yet, or the state it
        needs, ``after``). An Outcome: the same action was done before, return what it did.
        Raises: the recorded failure of an earlier identical call, or SagaVoided when the saga
        was compensated meanwhile (a late call).
        """
        last = self._last(saga_id)
        if last is None:
            if after is None:
                return None
            raise ServiceRefused(f"{self.name}: no {after} for saga {saga_id}")
        if last.name == done:
            return Outcome(last, False)
        if last.name == after:
            return None
        if "kind" in last.data:  # a failure event
            raise self._repeat_failure(last)
        log.warning("%s: refused a late %s for saga %s (compensated)", self.name, what, saga_id)
        raise SagaVoided(f"{self.name}: {what} for saga {saga_id} refused: already compensated")

    def _undo(self, saga_id: str, undoable: Mapping[str, str], **data: Any) -> Outcome:
        """A compensation (the caller holds the lock): record the undoing event if the saga's
        last event here is in ``undoable`` (done name -> undone name); a tombstone
        ``<name>.voided`` if nothing was ever done; else the recorded outcome again."""
        last = self._last(saga_id)
        if last is None:
            return Outcome(self._record(f"{self.name}.voided", {}, saga_id), True)
        undone = undoable.get(last.name)
        if undone is None:
            return Outcome(last, False)
        return Outcome(self._record(undone, dict(data), saga_id), True)

    def _give_up(
        self, saga_id: str, reason: str, *, done: str, failed: str, after: str | None = None
    ) -> Outcome:
        """A choreography handler gives up on its step (retries spent, or a timeout).

        Records ``failed`` (kind ``gave_up``): the failure event the next service reacts to,
        and a tombstone that refuses a late call. A late effect that already landed is undone
        by the same event (``undone: true``). Repeating it returns the recorded outcome.
        """
        with self._lock:
            last = self._last(saga_id)
            state = None if last is None else last.name
            if state not in (None, after, done):
                return Outcome(last, False)
            data = {"reason": reason, "kind": "gave_up", "undone": state == done}
            return Outcome(self._record(failed, data, saga_id), True)

    def _fail(self, name: str, saga_id: str, reason: str, kind: str, **data: Any) -> BusinessError:
        """Record a business failure event and return the error to raise (it carries it)."""
        event = self._record(name, {"reason": reason, "kind": kind, **data}, saga_id)
        return FAILURE_KINDS[kind](f"{self.name}: {reason}", event, new=True)

    def _repeat_failure(self, event: Event) -> BusinessError:
        """The error for a call repeating one that failed (recorded in ``event``)."""
        kind = event.data.get("kind", "refused")
        return FAILURE_KINDS.get(kind, ServiceRefused)(
            f"{self.name}: {event.data.get('reason', 'refused earlier')}", event
        )

    def __repr__(self) -> str:
        where = self.ledger_path or "memory"
        return f"<{type(self).__name__} {where} events={len(self.history)}>"
