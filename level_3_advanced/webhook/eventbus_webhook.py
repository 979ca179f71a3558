"""The bus and the listeners wired for the webhook: the workers that react after the 202.

The HTTP side only makes an event durable and hands it to a :class:`WebhookBus`, a Level 2
:class:`~level_2_intermediate.eventbus_queue.QueuedEventBus` whose worker threads run the
listeners later (a failing listener is retried with backoff, then dead-lettered; the worker
never dies):

* ``order.created`` -> :meth:`OrderListeners.send_order_email` (the confirmation email);
* ``order.*`` (every order event) -> :meth:`OrderListeners.record_order` (log + analytics).

Listeners do not perform their effects directly: they *decide* on them
(``bus.effects.add(event, {...})``). When every listener of an event has finished, the bus
calls ``on_handled(event, failed, effects)``, and the server writes the effects together with
the "handled" marker in one line (see :mod:`level_3_advanced.webhook.store`). That is what
makes handling exactly-once across crashes: a handling that dies before that line leaves no
trace and is simply done again after a restart. The effects are then applied to
:class:`OrderProjection` (the outbox of emails and the counts), which a restart rebuilds from
the same lines instead of handling anything twice. A real mailer would tail that outbox and
send each email once per ``message_id`` (the outbox pattern).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from common.events import Event
from common.logger import get_logger
from common.retry import Backoff
from level_2_intermediate.eventbus_queue import QueuedEventBus
from level_3_advanced.webhook.store import HandledRecord

__all__ = [
    "EffectCollector",
    "OrderListeners",
    "OrderProjection",
    "WebhookBus",
    "build_bus",
    "wire_listeners",
]

log = get_logger(__name__)

OnHandled = Callable[[Event, bool, list[dict[str, Any]]], None]


class EffectCollector:
    """The effects listeners decided on, per event id, until the event is committed.

    A listener adds its effect as its last step: a listener that fails is retried, and an
    effect added before the failure would be added twice.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_event: dict[str, list[dict[str, Any]]] = {}

    def add(self, event: Event, effect: dict[str, Any]) -> None:
        """Add one effect (a JSON-serialisable dict) for ``event``."""
        with self._lock:
            self._by_event.setdefault(event.id, []).append(effect)

    def pop(self, event_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return self._by_event.pop(event_id, [])

    def __len__(self) -> int:
        return len(self._by_event)


class WebhookBus(QueuedEventBus):
    """A QueuedEventBus that reports each finished event, with its effects, to ``on_handled``.

    ``on_handled(event, failed, effects)`` runs in the worker thread once all listeners of
    the event have finished (``failed`` is True if one was dead-lettered). The server sets it
    to its commit step; an exception there is logged, never kills the worker.
    """

    def __init__(self, workers: int = 2, maxsize: int = 10_000, **kwargs: Any) -> None:
        if "on_done" in kwargs:
            raise TypeError("WebhookBus sets on_done itself; assign bus.on_handled instead")
        self.effects = EffectCollector()
        self.on_handled: OnHandled | None = None
        super().__init__(workers, maxsize, on_done=self._event_done, **kwargs)

    def _event_done(self, event: Event, failed: bool) -> None:
        effects = self.effects.pop(event.id)
        handler = self.on_handled
        if handler is not None:  # an exception is logged by the bus; the worker carries on
            handler(event, failed, effects)


class OrderListeners:
    """The workers' reactions to order events.

    ``email_delay`` (seconds) stands for the round trip to a mail server; the demo and the
    crash test use it to keep events in flight.
    """

    def __init__(
        self,
        effects: EffectCollector,
        *,
        email_delay: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if email_delay < 0:
            raise ValueError("email_delay must be >= 0")
        self.effects = effects
        self.email_delay = email_delay
        self._sleep = sleep

    def send_order_email(self, event: Event) -> None:
        """order.created: the confirmation email, one per order event (keyed by event id)."""
        if self.email_delay:
            self._sleep(self.email_delay)
        order_id = event.data["order_id"]
        self.effects.add(
            event,
            {
                "kind": "email",
                "event_id": event.id,
                "to": f"customer-{order_id}@example.com",
                "subject": f"Order #{order_id} received",
                "message_id": f"<{event.id}@webhook.eda.example>",
            },
        )

    def record_order(self, event: Event) -> None:
        """Every order event: a log line and an analytics count."""
        log.info("order %s is %s [%s]", event.data["order_id"], event.data["status"], event.id)
        self.effects.add(
            event,
            {
                "kind": "analytics",
                "order_id": event.data["order_id"],
                "status": event.data["status"],
            },
        )


def wire_listeners(bus: WebhookBus, *, email_delay: float = 0.0) -> OrderListeners:
    """Subscribe the order listeners to ``bus``; returns them."""
    listeners = OrderListeners(bus.effects, email_delay=email_delay)
    bus.subscribe("order.created", listeners.send_order_email)
    bus.subscribe("order.*", listeners.record_order)
    return listeners


def build_bus(
    *,
    workers: int = 2,
    maxsize: int = 10_000,
    email_delay: float = 0.0,
    max_retries: int = 3,
    backoff: Backoff | None = None,
    put_timeout: float = 1.0,
) -> WebhookBus:
    """The webhook's bus with its listeners subscribed (threads start on first publish)."""
    bus = WebhookBus(
        workers,
        maxsize,
        put_timeout=put_timeout,
        max_retries=max_retries,
        backoff=backoff if backoff is not None else Backoff(base=0.05, cap=1.0),
    )
    wire_listeners(bus, email_delay=email_delay)
    return bus


class OrderProjection:
    """State derived from handled records: rebuilt from handled.log on start, then live.

    ``outbox`` keeps the most recent emails (``outbox_limit``); the counters cover all.
    """

    def __init__(self, outbox_limit: int = 1_000) -> None:
        self._lock = threading.Lock()
        self.outbox: deque[dict[str, Any]] = deque(maxlen=outbox_limit)
        self.emails = 0
        self.by_status: Counter[str] = Counter()
        self.handled = 0
        self.failed = 0

    def apply(self, record: HandledRecord) -> None:
        with self._lock:
            self.handled += 1
            self.failed += record.failed
            for effect in record.effects:
                kind = effect.get("kind")
                if kind == "email":
                    self.emails += 1
                    self.outbox.append(effect)
                elif kind == "analytics":
                    self.by_status[str(effect.get("status"))] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "handled": self.handled,
                "failed": self.failed,
                "emails": self.emails,
                "by_status": dict(self.by_status),
            }
