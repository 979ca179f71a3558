"""The one small interface that the producer and the workers are written against.

:func:`broker.connect` returns a :class:`Channel`: a :class:`SimulatedChannel` over the
in-process broker, or a :class:`PikaChannel` over a real RabbitMQ. Its methods carry pika's
names and signatures (``exchange_declare``, ``queue_bind``, ``basic_qos``, ``basic_consume``,
``basic_ack``, ``basic_nack``, ``basic_publish``, ``confirm_delivery``,
``process_data_events``...), and consumers receive pika's own data classes
(``pika.spec.Basic.Deliver``, ``pika.BasicProperties``) from both, so code written against it
reads like pika's examples and runs unchanged on either broker.

One addition to pika's blocking API: :meth:`Channel.publish` publishes with a *window* of
outstanding publisher confirms and returns a :class:`Confirmation` at once. pika's
``BlockingChannel.basic_publish`` waits for each confirm (one round trip per message: about
ten times slower); the real adapter pipelines through pika's asynchronous ``SelectConnection``
on a publisher thread, and every nack or returned message still fails its Confirmation.
"""

from __future__ import annotations

import copy
import itertools
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from pika import BasicProperties
from pika.spec import Basic

from common.logger import get_logger

__all__ = ["BasicProperties", "Channel", "Confirmation", "OnMessage", "with_message_id"]

log = get_logger(__name__)

# on_message_callback(channel, method, properties, body), exactly as in pika.
OnMessage = Callable[["Channel", Basic.Deliver, BasicProperties, bytes], None]


_id_prefix = f"pub-{os.getpid():x}-{os.urandom(3).hex()}"
_id_counter = itertools.count(1)


def with_message_id(properties: BasicProperties | None) -> BasicProperties:
    """``properties`` if it has a ``message_id``; else a copy with a fresh one.

    A returned message is matched to its publish by ``message_id`` (basic.return carries no
    delivery tag), so every mandatory message published with :meth:`Channel.publish` has one.
    """
    if properties is not None and properties.message_id is not None:
        return properties
    properties = copy.copy(properties) if properties is not None else BasicProperties()
    properties.message_id = f"{_id_prefix}-{next(_id_counter)}"
    return properties


class Confirmation:
    """The broker's answer to one publish: pending, then confirmed or failed.

    ``result(timeout)`` returns None once the broker confirmed the message and raises the
    :class:`~.errors.PublishError` that failed it (unroutable, nacked, timed out, channel
    closed). Done-callbacks run in the thread that resolves it (the publisher's I/O thread):
    keep them short.
    """

    __slots__ = ("_callbacks", "_cond", "_done", "_error", "message_id")

    def __init__(self, message_id: str | None, cond: threading.Condition | None = None) -> None:
        self.message_id = message_id
        self._cond = cond
        self._done = False
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Confirmation], None]] | None = None

    @classmethod
    def resolved(cls, message_id: str | None, error: BaseException | None = None) -> Confirmation:
        """An answer that is already known (the simulated broker confirms synchronously)."""
        conf = cls(message_id)
        conf._done = True
        conf._error = error
        return conf

    def done(self) -> bool:
        return self._done

    @property
    def confirmed(self) -> bool:
        """True once the broker acknowledged the message (False while pending or failed)."""
        return self._done and self._error is None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait up to ``timeout`` seconds; the failure, or None if confirmed."""
        if not self._done:
            if self._cond is None:
                raise TimeoutError(f"no confirm for message {self.message_id}")
            with self._cond:
                if not self._cond.wait_for(lambda: self._done, timeout):
                    raise TimeoutError(
                        f"no confirm for message {self.message_id} within {timeout}s"
                    )
        return self._error

    def result(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds; raise the failure, if any."""
        error = self.exception(timeout)
        if error is not None:
            raise error

    def add_done_callback(self, fn: Callable[[Confirmation], None]) -> None:
        """Call ``fn(self)`` when resolved (now, if it already is)."""
        if self._cond is not None:
            with self._cond:
                if not self._done:
                    if self._callbacks is None:
                        self._callbacks = []
                    self._callbacks.append(fn)
                    return
        fn(self)

    def _set(self, error: BaseException | None) -> bool:
        """Resolve once; False if it already was. The caller holds ``_cond``, and afterwards
        runs :meth:`_take_callbacks` outside it."""
        if self._done:
            return False
        self._error = error
        self._done = True
        return True

    def _take_callbacks(self) -> list[Callable[[Confirmation], None]]:
        callbacks, self._callbacks = self._callbacks, None
        return callbacks or []

    def __repr__(self) -> str:
        state = "pending" if not self._done else ("failed" if self._error else "confirmed")
        return f"<Confirmation {self.message_id} {state}>"


def run_callbacks(conf: Confirmation, callbacks: list[Callable[[Confirmation], None]]) -> None:
    """Run a resolved Confirmation's done-callbacks; one that raises is logged, not spread."""
    for fn in callbacks:
        try:
            fn(conf)
        except Exception:
            log.exception("a done-callback of %r failed", conf)


class Channel(ABC):
    """A channel with its own connection: pika's blocking API plus pipelined :meth:`publish`.

    Not thread-safe, like pika's ``BlockingChannel``: use it from one thread. The exceptions
    are :mod:`.errors`'s (translated from pika's by the real adapter). ``kind`` is
    ``"simulated"`` or ``"rabbitmq"``.
    """

    kind: str = "abstract"

    # -- topology ---------------------------------------------------------------------------
    @abstractmethod
    def exchange_declare(
        self,
        exchange: str,
        exchange_type: str = "direct",
        passive: bool = False,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> Any:
        """Create the exchange, or check that the existing one has these settings (406)."""

    @abstractmethod
    def exchange_delete(self, exchange: str, if_unused: bool = False) -> Any: ...

    @abstractmethod
    def queue_declare(
        self,
        queue: str,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> Any:
        """Create or check a queue; ``result.method`` has queue, message_count, consumer_count."""

    @abstractmethod
    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False) -> Any: ...

    @abstractmethod
    def queue_purge(self, queue: str) -> Any: ...

    @abstractmethod
    def queue_bind(
        self,
        queue: str,
        exchange: str,
        routing_key: str | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> Any: ...

    @abstractmethod
    def queue_unbind(
        self,
        queue: str,
        exchange: str,
        routing_key: str | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> Any: ...

    # -- publishing -------------------------------------------------------------------------
    @abstractmethod
    def confirm_delivery(self) -> None:
        """Confirm mode for :meth:`basic_publish`: it then waits for the broker's answer."""

    @abstractmethod
    def basic_publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties | None = None,
        mandatory: bool = False,
    ) -> None:
        """pika's semantics: in confirm mode, wait for the confirm and raise
        :class:`~.errors.UnroutableError` / :class:`~.errors.NackError`."""

    @abstractmethod
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties | None = None,
        mandatory: bool = True,
    ) -> Confirmation:
        """Publish with pipelined confirms; returns at once (blocks only while a buffer of
        unconfirmed messages, four windows, is full). The Confirmation fails for every nacked
        or returned message. ``properties.message_id`` identifies returned messages: one is
        assigned if missing."""

    @abstractmethod
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every :meth:`publish` so far is confirmed or failed; False on timeout."""

    # -- consuming --------------------------------------------------------------------------
    @abstractmethod
    def basic_qos(
        self, prefetch_size: int = 0, prefetch_count: int = 0, global_qos: bool = False
    ) -> None: ...

    @abstractmethod
    def basic_consume(
        self,
        queue: str,
        on_message_callback: OnMessage,
        auto_ack: bool = False,
        exclusive: bool = False,
        consumer_tag: str | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> str: ...

    @abstractmethod
    def basic_cancel(self, consumer_tag: str = "") -> Any: ...

    @abstractmethod
    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None: ...

    @abstractmethod
    def basic_nack(
        self, delivery_tag: int = 0, multiple: bool = False, requeue: bool = True
    ) -> None: ...

    @abstractmethod
    def basic_reject(self, delivery_tag: int = 0, requeue: bool = True) -> None: ...

    @abstractmethod
    def basic_get(self, queue: str, auto_ack: bool = False) -> tuple[Any, Any, Any]:
        """One message, or ``(None, None, None)`` when the queue is empty."""

    @property
    @abstractmethod
    def consumer_tags(self) -> list[str]: ...

    @abstractmethod
    def process_data_events(self, time_limit: float | None = 0) -> None:
        """Do I/O and run the callbacks that are due (deliveries, returns, thread-safe
        callbacks); waits up to ``time_limit`` seconds for the first one."""

    @abstractmethod
    def start_consuming(self) -> None: ...

    @abstractmethod
    def stop_consuming(self, consumer_tag: str | None = None) -> None: ...

    @abstractmethod
    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        """The one thread-safe method: run ``callback`` in the consuming thread."""

    # -- life cycle -------------------------------------------------------------------------
    @property
    @abstractmethod
    def is_open(self) -> bool: ...

    @abstractmethod
    def close(self) -> None:
        """Close the channel and its connection; unacked deliveries go back to their queues."""

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
