"""NotificationService: an email on ``order.created``, an SMS on ``order.paid``.

The service decides *what* to say; a sender delivers it. Senders are injected: the demo uses
:class:`ConsoleSender`, tests read an :class:`Outbox`, production would plug in SMTP and an SMS
gateway behind the same ``send(channel, to, text)`` method.

Idempotent: each event id is handled at most once. Queued buses deliver at least once (a retry
after a timeout, an event redelivered after a worker process was killed), and a customer must
not get the same email twice. The id is claimed before sending and released if the sender
fails, so a retry of a failed send is not mistaken for a duplicate.

State lives in injectable mappings (``seen``, ``counts``) guarded by an injectable ``lock``:
plain in-process objects by default, ``multiprocessing.Manager`` proxies when the listeners run
in worker processes (see ``main.py --bus process``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, MutableMapping, MutableSequence
from typing import Any, Protocol

from common.events import Event
from level_2_intermediate.order_service import format_money

__all__ = ["ConsoleSender", "NotificationService", "Outbox", "Sender"]


class Sender(Protocol):
    def send(self, channel: str, to: str, text: str) -> None: ...


class ConsoleSender:
    """Prints each message (the demo's sender). Picklable, so it works in worker processes."""

    def __init__(self, write: Callable[..., Any] = print) -> None:
        self.write = write

    def send(self, channel: str, to: str, text: str) -> None:
        self.write(f"  {channel:<5} to {to}: {text}", flush=True)


class Outbox:
    """Keeps every message as ``(channel, to, text)``; tests read ``messages``."""

    def __init__(self, messages: MutableSequence[tuple[str, str, str]] | None = None) -> None:
        self.messages = [] if messages is None else messages

    def send(self, channel: str, to: str, text: str) -> None:
        self.messages.append((channel, to, text))

    def by_channel(self, channel: str) -> list[tuple[str, str, str]]:
        return [m for m in list(self.messages) if m[0] == channel]


class NotificationService:
    """Subscribes to ``order.created`` (email) and ``order.paid`` (SMS) on ``bus``."""

    def __init__(
        self,
        bus: Any,
        sender: Sender,
        *,
        seen: MutableMapping[str, bool] | None = None,
        counts: MutableMapping[str, int] | None = None,
        lock: Any = None,
    ) -> None:
        self.sender = sender
        self._seen = {} if seen is None else seen
        self._counts = {} if counts is None else counts
        self._lock = threading.Lock() if lock is None else lock
        bus.subscribe("order.created", self.on_order_created)
        bus.subscribe("order.paid", self.on_order_paid)

    def on_order_created(self, event: Event) -> None:
        data = event.data
        items = sum(item["quantity"] for item in data["items"])
        text = (
            f"order {data['order_id']} received: {items} item(s), "
            f"total {format_money(data['total_cents'])}"
        )
        self._send_once(event, "email", data["customer"], text)

    def on_order_paid(self, event: Event) -> None:
        data = event.data
        text = f"payment of {format_money(data['amount_cents'])} for {data['order_id']} received"
        self._send_once(event, "sms", data["customer"], text)

    def _send_once(self, event: Event, channel: str, to: str, text: str) -> None:
        with self._lock:
            if event.id in self._seen:
                self._bump("duplicates_skipped")
                return
            self._seen[event.id] = True  # claimed
        try:
            self.sender.send(channel, to, text)
        except BaseException:
            with self._lock:
                self._seen.pop(event.id, None)  # released: the bus's retry will send it
            raise
        with self._lock:
            self._bump(f"{channel}_sent")

    def _bump(self, name: str) -> None:
        self._counts[name] = self._counts.get(name, 0) + 1

    def snapshot(self) -> dict[str, int]:
        """``{"emails": n, "sms": n, "duplicates_skipped": n}``."""
        with self._lock:
            counts = dict(self._counts)
        return {
            "emails": counts.get("email_sent", 0),
            "sms": counts.get("sms_sent", 0),
            "duplicates_skipped": counts.get("duplicates_skipped", 0),
        }
