"""The real broker behind the :class:`~.channel.Channel` interface, through pika 1.x.

:class:`PikaChannel` owns a ``BlockingConnection`` and one ``BlockingChannel`` for
everything pika's blocking API does well: declaring, consuming with manual acks, and
``basic_publish`` that waits for its confirm. Its :meth:`~PikaChannel.publish` goes through
an :class:`AsyncPublisher`: a second connection, pika's asynchronous ``SelectConnection``, on
its own I/O thread, that keeps up to ``window`` messages awaiting their confirms (RabbitMQ
itself recommends separate connections for publishing and consuming), and writes the frames
of a batch of messages in one buffer instead of one ``send()`` per frame.

Every pika exception is translated into :mod:`.errors` at this boundary (:func:`translate`).
"""

from __future__ import annotations

import functools
import os
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, TypeVar

import pika
import pika.exceptions as pex
import pika.frame
from pika import spec
from pika.spec import Basic

from common.logger import get_logger
from common.retry import Backoff
from level_3_advanced.rabbitmq_simulation.channel import (
    BasicProperties,
    Channel,
    Confirmation,
    OnMessage,
    run_callbacks,
    with_message_id,
)
from level_3_advanced.rabbitmq_simulation.errors import (
    AccessRefused,
    BrokerError,
    ChannelError,
    ConnectionLost,
    NackError,
    PublishError,
    PublishTimeout,
    UnroutableError,
)

__all__ = ["AsyncPublisher", "PikaChannel", "connection_parameters", "translate"]

log = get_logger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

_PIKA_ERRORS = (pex.AMQPError, pex.ChannelError, pex.ReentrancyError)
_AUTH_ERRORS = (
    pex.AuthenticationError,
    pex.ProbableAuthenticationError,
    pex.ProbableAccessDeniedError,
)
_FATAL_CONNECTION_CODES = {402, 403, 530}  # INVALID_PATH, ACCESS_REFUSED, NOT_ALLOWED
PUBLISHER_BACKOFF = Backoff(base=0.1, factor=2.0, cap=5.0)


def translate(exc: BaseException) -> BrokerError:
    """The :mod:`.errors` exception for a pika exception (retryable or fatal)."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, pex.UnroutableError | pex.NackError):
        returned = exc.messages[0] if exc.messages else None
        message_id = returned.properties.message_id if returned is not None else None
        if isinstance(exc, pex.NackError):
            return NackError(
                f"message {message_id} was nacked by the broker", message_id=message_id
            )
        method = returned.method if returned is not None else None
        code = getattr(method, "reply_code", 312)
        text = getattr(method, "reply_text", "NO_ROUTE")
        return UnroutableError(
            f"({code}) {text}: message {message_id} matched no queue", message_id=message_id
        )
    if isinstance(exc, pex.ChannelClosedByBroker):
        return ChannelError(exc.reply_code, exc.reply_text)
    if isinstance(exc, pex.ChannelClosedByClient):
        return ChannelError(0, "channel closed by the client")
    if isinstance(exc, _AUTH_ERRORS):
        return AccessRefused(f"access refused: {exc!r}")
    if isinstance(exc, pex.ConnectionClosedByBroker):
        if exc.reply_code in _FATAL_CONNECTION_CODES:
            return AccessRefused(f"({exc.reply_code}) {exc.reply_text}")
        # 320 CONNECTION_FORCED (the broker is stopping or restarting), 541, 501...: retryable.
        return ConnectionLost(f"({exc.reply_code}) {exc.reply_text}", reply_code=exc.reply_code)
    if isinstance(exc, pex.AMQPConnectionError):
        # Refused, reset, timed out, heartbeat lost, closed by client, or an EOF while the
        # broker boots (pika reports that as IncompatibleProtocolError): reconnecting helps.
        return ConnectionLost(f"connection lost: {exc!r}")
    if isinstance(exc, pex.ChannelWrongStateError):
        return ChannelError(0, "channel is closed")
    return BrokerError(f"{type(exc).__name__}: {exc}")


def _translated(method: F) -> F:
    """Run a PikaChannel method, translating pika exceptions (with the cause attached)."""

    @functools.wraps(method)
    def wrapper(self: PikaChannel, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except _PIKA_ERRORS as exc:
            raise self._translate(exc) from exc

    return wrapper  # type: ignore[return-value]


def connection_parameters(
    url: str, *, name: str | None = None, timeout: float = 5.0
) -> pika.URLParameters:
    """pika parameters from an ``amqp://`` URL: one attempt, bounded socket and handshake."""
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.retry_delay = 0
    params.socket_timeout = timeout
    params.stack_timeout = timeout
    params.blocked_connection_timeout = max(timeout, 60.0)
    if name:
        params.client_properties = {"connection_name": name}
    return params


class PikaChannel(Channel):
    """A real RabbitMQ channel (see the module docstring). Use it from one thread."""

    kind = "rabbitmq"

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        timeout: float = 5.0,
        window: int = 1000,
        publish_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.name = name or f"eda-{os.getpid()}"
        self._timeout = timeout
        self._window = window
        self._publish_timeout = publish_timeout
        self._publisher: AsyncPublisher | None = None
        self._confirming = False
        params = connection_parameters(url, name=self.name, timeout=timeout)
        try:
            self._connection = pika.BlockingConnection(params)
        except _PIKA_ERRORS as exc:
            raise translate(exc) from exc
        try:
            self._channel = self._connection.channel()
        except _PIKA_ERRORS as exc:
            self._close_quietly()
            raise translate(exc) from exc

    def __repr__(self) -> str:
        return f"<PikaChannel {self.name!r} open={self.is_open}>"

    def _translate(self, exc: BaseException) -> BrokerError:
        if not self._connection.is_open and isinstance(
            exc, pex.ChannelWrongStateError | pex.ChannelClosedByClient
        ):
            return ConnectionLost(f"connection lost: {exc!r}")
        return translate(exc)

    # -- topology ---------------------------------------------------------------------------
    @_translated
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
        return self._channel.exchange_declare(
            exchange, exchange_type, passive, durable, auto_delete, internal, arguments
        )

    @_translated
    def exchange_delete(self, exchange: str, if_unused: bool = False) -> Any:
        return self._channel.exchange_delete(exchange, if_unused)

    @_translated
    def queue_declare(
        self,
        queue: str,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> Any:
        return self._channel.queue_declare(
            queue, passive, durable, exclusive, auto_delete, arguments
        )

    @_translated
    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False) -> Any:
        return self._channel.queue_delete(queue, if_unused, if_empty)

    @_translated
    def queue_purge(self, queue: str) -> Any:
        return self._channel.queue_purge(queue)

    @_translated
    def queue_bind(
        self,
        queue: str,
        exchange: str,
        routing_key: str | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> Any:
        return self._channel.queue_bind(queue, exchange, routing_key, arguments)

    @_translated
    def queue_unbind(
        self,
        queue: str,
        exchange: str,
        routing_key: str | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> Any:
        return self._channel.queue_unbind(queue, exchange, routing_key, arguments)

    # -- publishing -------------------------------------------------------------------------
    @_translated
    def confirm_delivery(self) -> None:
        if not self._confirming:
            self._channel.confirm_delivery()
            self._confirming = True

    @_translated
    def basic_publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties | None = None,
        mandatory: bool = False,
    ) -> None:
        self._channel.basic_publish(exchange, routing_key, body, properties, mandatory)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties | None = None,
        mandatory: bool = True,
    ) -> Confirmation:
        publisher = self._publisher
        if publisher is None:
            publisher = self._publisher = AsyncPublisher(
                connection_parameters(
                    self.url, name=f"{self.name}-publisher", timeout=self._timeout
                ),
                window=self._window,
                publish_timeout=self._publish_timeout,
                name=f"{self.name}-publisher",
            )
        return publisher.publish(exchange, routing_key, body, properties, mandatory)

    def flush(self, timeout: float | None = None) -> bool:
        return self._publisher is None or self._publisher.flush(timeout)

    @property
    def publisher(self) -> AsyncPublisher | None:
        """The pipelined publisher (started by the first :meth:`publish`), or None."""
        return self._publisher

    # -- consuming --------------------------------------------------------------------------
    @_translated
    def basic_qos(
        self, prefetch_size: int = 0, prefetch_count: int = 0, global_qos: bool = False
    ) -> None:
        self._channel.basic_qos(prefetch_size, prefetch_count, global_qos)

    @_translated
    def basic_consume(
        self,
        queue: str,
        on_message_callback: OnMessage,
        auto_ack: bool = False,
        exclusive: bool = False,
        consumer_tag: str | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> str:
        def deliver(_ch: Any, method: Any, properties: Any, body: bytes) -> None:
            on_message_callback(self, method, properties, body)

        return self._channel.basic_consume(
            queue, deliver, auto_ack, exclusive, consumer_tag, arguments
        )

    @_translated
    def basic_cancel(self, consumer_tag: str = "") -> Any:
        return self._channel.basic_cancel(consumer_tag)

    @_translated
    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None:
        self._channel.basic_ack(delivery_tag, multiple)

    @_translated
    def basic_nack(
        self, delivery_tag: int = 0, multiple: bool = False, requeue: bool = True
    ) -> None:
        self._channel.basic_nack(delivery_tag, multiple, requeue)

    @_translated
    def basic_reject(self, delivery_tag: int = 0, requeue: bool = True) -> None:
        self._channel.basic_reject(delivery_tag, requeue)

    @_translated
    def basic_get(self, queue: str, auto_ack: bool = False) -> tuple[Any, Any, Any]:
        return self._channel.basic_get(queue, auto_ack)

    @property
    def consumer_tags(self) -> list[str]:
        return self._channel.consumer_tags

    @_translated
    def process_data_events(self, time_limit: float | None = 0) -> None:
        self._connection.process_data_events(time_limit)
        if self._channel.is_closed:  # closed by the broker meanwhile: say why
            reason = getattr(self._channel, "_closing_reason", None)
            raise self._translate(reason or pex.ChannelWrongStateError("channel is closed"))

    @_translated
    def start_consuming(self) -> None:
        self._channel.start_consuming()

    @_translated
    def stop_consuming(self, consumer_tag: str | None = None) -> None:
        self._channel.stop_consuming(consumer_tag)

    @_translated
    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        self._connection.add_callback_threadsafe(callback)

    # -- life cycle -------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._connection.is_open and self._channel.is_open

    def close(self) -> None:
        """Close the publisher (unconfirmed messages fail) and the connection; idempotent."""
        if self._publisher is not None:
            self._publisher.close()
        self._close_quietly()

    def _close_quietly(self) -> None:
        try:
            if self._connection.is_open:
                self._connection.close()
        except _PIKA_ERRORS as exc:  # already lost: nothing to close
            log.debug("%s: close: %r", self.name, exc)


class _Pending(Confirmation):
    """A message on its way: the Confirmation the caller holds, plus what to publish."""

    __slots__ = ("body", "deadline", "exchange", "header", "mandatory", "routing_key")

    def __init__(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        header: bytes,
        mandatory: bool,
        message_id: str | None,
        cond: threading.Condition,
        deadline: float,
    ) -> None:
        # Confirmation's fields, set here directly: this runs once per published message.
        self.message_id = message_id
        self._cond = cond
        self._done = False
        self._error = None
        self._callbacks = None
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.header = header  # the encoded properties: the payload of its header frame
        self.mandatory = mandatory
        self.deadline = deadline


_FRAME_END = bytes((spec.FRAME_END,))
_NO_PROPERTIES = BasicProperties()
_frame_header = struct.Struct(">BHI").pack  # type, channel, payload size
_content_header = struct.Struct(">HxxQ").pack  # class (basic), weight (always 0), body size
_BASIC = spec.BasicProperties.INDEX


def encode_properties(properties: BasicProperties) -> bytes:
    """The payload of a message's content header after its body size, as pika encodes it.

    Raises ValueError for a property pika cannot encode (a string over 255 bytes, a wrong
    type), so that the publisher's caller hears it, not its I/O thread.
    """
    try:
        return b"".join(properties.encode())
    except (AssertionError, TypeError, ValueError, struct.error, pex.ShortStringTooLong) as exc:
        raise ValueError(f"properties cannot be encoded: {exc!r}") from exc


class _PublishingConnection(pika.SelectConnection):
    """pika's ``SelectConnection`` with a batched ``basic.publish`` for :class:`AsyncPublisher`.

    pika frames each message with several objects and writes every frame separately: its
    transport sends each with its own ``send()`` (three system calls per message, each one
    releasing the GIL to the other threads). :meth:`publish` writes the same bytes (the
    method frame of an exchange and routing key is encoded once; the properties were encoded
    by the caller's thread) and, between :meth:`coalesce` and :meth:`emit`, a batch of
    messages leaves in slices of ``_SLICE`` bytes through pika's own transport.
    """

    _SLICE = 256 * 1024
    _held: list[bytes] | None = None
    _held_bytes = 0
    _held_frames = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._method_frames: dict[tuple[int, str, str, bool], bytes] = {}
        super().__init__(*args, **kwargs)

    def coalesce(self) -> None:
        """Hold what :meth:`publish` writes from now on until :meth:`emit`."""
        self._held = []
        self._held_bytes = self._held_frames = 0

    def emit(self) -> None:
        """Write what is held, and stop holding."""
        held, self._held = self._held, None
        if held:
            self._write(b"".join(held), self._held_frames)

    def publish(self, channel_number: int, item: _Pending) -> None:
        """``basic.publish`` of ``item`` on an open channel: method, header and body frames."""
        key = (channel_number, item.exchange, item.routing_key, item.mandatory)
        method = self._method_frames.get(key)
        if method is None:
            publish = Basic.Publish(
                exchange=item.exchange, routing_key=item.routing_key, mandatory=item.mandatory
            )
            method = self._method_frames[key] = pika.frame.Method(channel_number, publish).marshal()
        body = item.body
        size = len(body)
        header = item.header
        pieces = [
            method,
            _frame_header(spec.FRAME_HEADER, channel_number, 12 + len(header)),
            _content_header(_BASIC, size),
            header,
            _FRAME_END,
        ]
        frames = 2
        limit = self._body_max_length
        for start in range(0, size, limit):
            chunk = body[start : start + limit] if size > limit else body
            pieces += (
                _frame_header(spec.FRAME_BODY, channel_number, len(chunk)),
                chunk,
                _FRAME_END,
            )
            frames += 1
        held = self._held
        if held is None:
            self._write(b"".join(pieces), frames)
            return
        held += pieces
        self._held_frames += frames
        self._held_bytes += size + len(header) + 60
        if self._held_bytes >= self._SLICE:
            self._write(b"".join(held), self._held_frames)
            held.clear()
            self._held_bytes = self._held_frames = 0

    def _write(self, data: bytes, frames: int) -> None:
        # What pika's _output_marshaled_frames does, for a run of frames at once.
        self.bytes_sent += len(data)
        self.frames_sent += frames
        self._adapter_emit_data(data)


class AsyncPublisher:
    """Publisher confirms, pipelined: pika's ``SelectConnection`` on its own I/O thread.

    ``publish()`` (any thread) encodes the properties (a bad one raises ValueError there),
    puts the message in an outbox and, unless the window is full (then the next confirm
    refills it), wakes the I/O thread with ``ioloop.add_callback_threadsafe`` once per
    batch; it blocks only while ``buffer`` messages (default: four windows) are
    unconfirmed, waiting or in flight. The I/O thread keeps up to ``window`` messages in
    flight: it publishes each batch in a few socket writes (:class:`_PublishingConnection`),
    numbers each message with its delivery tag, resolves the :class:`Confirmation` on
    ``basic.ack`` (single or ``multiple``, a range at once), and refills the window from the
    outbox in the same pass — the producer never stands between an ack and the next publish
    (as in Kafka's producer: an accumulator, and a bound on requests in flight). A message
    fails with :class:`UnroutableError` if the broker returned it first
    (``basic.return`` precedes the ack and is matched by ``message_id``), with
    :class:`NackError` on ``basic.nack``.

    When the connection drops, messages without a confirm are published again after the
    reconnect (capped exponential backoff): at-least-once, consumers deduplicate by message
    id. A message still unconfirmed after ``publish_timeout`` fails with
    :class:`PublishTimeout`; a channel closed by the broker (404 on a missing exchange)
    fails the messages in flight with :class:`ChannelError` and reopens a channel; bad
    credentials fail everything with :class:`AccessRefused` and stop.
    """

    def __init__(
        self,
        parameters: pika.ConnectionParameters,
        *,
        window: int = 1000,
        buffer: int | None = None,
        publish_timeout: float = 30.0,
        backoff: Backoff = PUBLISHER_BACKOFF,
        name: str = "publisher",
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.name = name
        self._params = parameters
        self._window_size = window
        self._buffer_size = buffer if buffer is not None else 4 * window
        if self._buffer_size < window:
            raise ValueError(f"buffer ({self._buffer_size}) must be at least window ({window})")
        self._publish_timeout = publish_timeout
        self._backoff = backoff
        # The hot path takes no lock shared with the I/O thread: publishers append to the
        # outbox (deque operations are atomic) and count under a lock of their own; the I/O
        # thread pops, and counts resolutions under _cond, which waiters (window, flush,
        # Confirmation.result) wait on.
        self._cond = threading.Condition()
        self._submit_lock = threading.Lock()
        self._outbox: deque[_Pending] = deque()
        self._submitted = 0  # publishers only, under _submit_lock
        self._resolved = 0  # the I/O thread only, under _cond
        self._ready = False  # written by the I/O thread: a channel in confirm mode is open
        self._wake_pending = False  # a _drain is scheduled on the I/O loop
        # The window is full: the next confirm drains the outbox, publishers need not wake it.
        self._window_full = False
        self._closing = False
        self._finished = False  # the I/O thread has ended: nobody else will drain the outbox
        self._connection: _PublishingConnection | None = None
        # Only the I/O thread touches these.
        self._channel: Any = None
        self._inflight: OrderedDict[int, _Pending] = OrderedDict()
        self._returned: dict[str, deque[tuple[int, str]]] = {}
        self._seq = 0
        self._healthy = False
        self._last_reason: BaseException | None = None
        self._fatal: BrokerError | None = None
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name=f"{name}-io", daemon=True)
        self._thread.start()

    # -- any thread -------------------------------------------------------------------------
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties | None = None,
        mandatory: bool = True,
    ) -> Confirmation:
        """Queue one message; returns its Confirmation (see the class docstring)."""
        if self._fatal is not None:
            raise self._fatal
        if self._closing:
            raise PublishError("the publisher is closed")
        if isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes):
            raise TypeError(f"body must be bytes or str, got {type(body).__name__}")
        if mandatory:
            properties = with_message_id(properties)
        elif properties is None:
            properties = _NO_PROPERTIES
        message_id = properties.message_id
        item = _Pending(
            exchange,
            routing_key,
            body,
            encode_properties(properties),
            mandatory,
            message_id,
            self._cond,
            time.monotonic() + self._publish_timeout,
        )
        if self._submitted - self._resolved >= self._buffer_size:
            with self._cond:
                if not self._cond.wait_for(self._has_room, self._publish_timeout):
                    raise PublishTimeout(
                        f"{self._buffer_size} messages still await their confirm after "
                        f"{self._publish_timeout}s: is the broker up?",
                        message_id=message_id,
                    )
            if self._fatal is not None:
                raise self._fatal
        with self._submit_lock:
            self._submitted += 1
        self._outbox.append(item)
        if self._finished:  # raced with close() or a fatal error: fail it, never leave it
            self._fail_outbox(self._fatal or PublishError("the publisher is closed"))
            return item
        # Order matters: append, then look at the flags the I/O thread resets before it pops.
        if self._ready and not self._wake_pending and not self._window_full:
            self._wake_pending = True
            connection = self._connection
            if connection is not None:
                try:
                    connection.ioloop.add_callback_threadsafe(self._drain)
                except Exception:  # the loop is closing: the next channel drains the outbox
                    self._wake_pending = False
        return item

    def _has_room(self) -> bool:
        return self._submitted - self._resolved < self._buffer_size or self._fatal is not None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every message published so far is confirmed or failed; False on timeout."""
        target = self._submitted
        with self._cond:
            return self._cond.wait_for(lambda: self._resolved >= target, timeout)

    @property
    def outstanding(self) -> int:
        """Messages published and not yet confirmed or failed."""
        return self._submitted - self._resolved

    def close(self, timeout: float = 5.0) -> None:
        """Stop: close the connection; messages still unconfirmed fail. Idempotent."""
        with self._cond:
            if self._closing and not self._thread.is_alive():
                return
            self._closing = True
            connection = self._connection
        self._stop.set()
        if connection is not None:
            try:
                connection.ioloop.add_callback_threadsafe(self._close_connection)
            except Exception:
                log.debug("%s: the I/O loop is already closed", self.name)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s: the I/O thread did not stop within %.1fs", self.name, timeout)

    # -- the I/O thread ---------------------------------------------------------------------
    def _run(self) -> None:
        attempt = 0
        try:
            while not self._stop.is_set():
                self._healthy = False
                connection = _PublishingConnection(
                    self._params,
                    on_open_callback=self._on_open,
                    on_open_error_callback=self._on_open_error,
                    on_close_callback=self._on_closed,
                )
                with self._cond:
                    self._connection = connection
                    closing = self._closing
                if closing:
                    connection.ioloop.add_callback_threadsafe(self._close_connection)
                try:
                    connection.ioloop.start()
                finally:
                    with self._cond:
                        self._connection = None
                        self._ready = False
                    connection.ioloop.close()
                if self._fatal is not None or self._stop.is_set():
                    break
                attempt = 1 if self._healthy else attempt + 1
                delay = self._backoff.delay(attempt)
                self.reconnects += 1
                self._expire(time.monotonic())
                log.warning(
                    "%s: connection lost (%s); reconnecting in %.2fs",
                    self.name,
                    self._last_reason,
                    delay,
                )
                self._stop.wait(delay)
        except Exception as exc:  # a bug here must not leave publishers waiting forever
            log.exception("%s: the I/O thread failed", self.name)
            self._fatal = self._fatal or BrokerError(f"publisher I/O thread failed: {exc!r}")
        finally:
            self._finished = True  # before the last sweep: see publish()
            error = self._fatal or PublishError("the publisher closed before the broker confirmed")
            self._fail_all(error)
            self.connected.set()

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)
        connection.ioloop.call_later(0.5, self._tick)

    def _on_open_error(self, connection: pika.SelectConnection, error: BaseException) -> None:
        self._last_reason = error
        if isinstance(error, _AUTH_ERRORS):
            self._fatal = translate(error)
            log.error("%s: %s (not retrying)", self.name, self._fatal)
        connection.ioloop.stop()

    def _on_closed(self, connection: pika.SelectConnection, reason: BaseException) -> None:
        self._last_reason = reason
        self._channel = None
        with self._cond:
            self._ready = False
        error = translate(reason)
        if isinstance(error, AccessRefused):
            self._fatal = error
        self._requeue_inflight()
        connection.ioloop.stop()

    def _on_channel_open(self, channel: Any) -> None:
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(
            ack_nack_callback=self._on_confirm,
            callback=lambda _frame: self._on_confirm_mode(channel),
        )

    def _on_confirm_mode(self, channel: Any) -> None:
        self._channel = channel
        self._seq = 0
        self._returned.clear()
        self._healthy = True
        self._ready = True
        self.connected.set()
        self._drain()

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        self._ready = False
        if isinstance(reason, pex.ChannelClosedByBroker):
            error = ChannelError(reason.reply_code, reason.reply_text)
            log.error(
                "%s: channel closed by the broker (%s); %d message(s) in flight fail",
                self.name,
                error,
                len(self._inflight),
            )
            failed = list(self._inflight.values())
            self._inflight.clear()
            self._resolve([(item, error) for item in failed])
            connection = self._connection
            if connection is not None and connection.is_open and not self._closing:
                connection.channel(on_open_callback=self._on_channel_open)
        else:
            self._requeue_inflight()

    def _requeue_inflight(self) -> None:
        """Messages without a confirm go back to the front of the outbox, in order."""
        if not self._inflight:
            return
        items = list(self._inflight.values())
        self._inflight.clear()
        self._outbox.extendleft(reversed(items))
        log.info("%s: %d unconfirmed message(s) will be published again", self.name, len(items))

    def _drain(self) -> None:
        self._wake_pending = False  # before popping: see publish()
        if not self._ready or self._channel is None:
            return
        connection = self._connection
        channel = self._channel
        if connection is None or not connection.is_open or not channel.is_open:
            return  # closing: the callbacks of the close requeue or fail what is in flight
        publish = connection.publish
        number = channel.channel_number
        inflight = self._inflight
        outbox = self._outbox
        seq = self._seq
        window = self._window_size
        connection.coalesce()  # the whole batch in a few socket writes
        try:
            while outbox and len(inflight) < window:
                item = outbox.popleft()
                if item._done:
                    continue  # timed out while waiting in the outbox
                try:
                    publish(number, item)
                except Exception as exc:  # a bug, not the network (nothing is sent here)
                    log.exception("%s: cannot frame message %s", self.name, item.message_id)
                    self._resolve([(item, PublishError(f"cannot publish: {exc!r}"))])
                    continue
                seq += 1
                inflight[seq] = item
        finally:
            self._seq = seq
            self._window_full = len(inflight) >= window
            connection.emit()

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        # basic.return arrives before the basic.ack of the same message.
        message_id = properties.message_id
        self._returned.setdefault(message_id, deque()).append(
            (method.reply_code, method.reply_text)
        )

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, Basic.Ack)
        tag = method.delivery_tag
        inflight = self._inflight
        done: list[_Pending] = []
        if method.multiple:
            popitem = inflight.popitem
            while inflight and next(iter(inflight)) <= tag:
                done.append(popitem(last=False)[1])
        else:
            item = inflight.pop(tag, None)
            if item is not None:
                done.append(item)
        # Order matters (see publish()): clear the flag, then look at the outbox.
        self._window_full = False
        connection = self._connection
        if self._outbox and not self._wake_pending and connection is not None:
            self._wake_pending = True  # refill the window once the frames read are handled
            connection.ioloop.call_later(0, self._drain)  # this thread: no wake-up needed
        returned = self._returned
        if acked and not returned:  # the common case: all confirmed
            self._resolve_confirmed(done)
            return
        results: list[tuple[_Pending, BaseException | None]] = []
        for item in done:
            error: BaseException | None = None
            message_id = item.message_id
            if not acked:
                error = NackError(
                    f"message {message_id} was nacked by the broker", message_id=message_id
                )
            if returned and message_id in returned:
                reasons = returned[message_id]
                code, text = reasons.popleft()
                if not reasons:
                    del returned[message_id]
                error = UnroutableError(
                    f"({code}) {text}: message {message_id} to exchange '{item.exchange}' with "
                    f"routing key '{item.routing_key}' matched no queue",
                    message_id=message_id,
                )
            results.append((item, error))
        self._resolve(results)

    def _tick(self) -> None:
        self._expire(time.monotonic())
        if self._outbox and self._ready:
            self._drain()  # a safety net: the wake-ups make this a no-op
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.ioloop.call_later(0.5, self._tick)

    def _expire(self, now: float) -> None:
        # Both are in publish order, so the oldest deadlines are at the front.
        outbox = self._outbox
        expired = []
        while outbox and outbox[0].deadline <= now:
            expired.append(outbox.popleft())
        inflight = self._inflight
        while inflight:
            tag = next(iter(inflight))
            if inflight[tag].deadline > now:
                break
            expired.append(inflight.pop(tag))
        if expired:
            self._resolve(
                [
                    (
                        item,
                        PublishTimeout(
                            f"no confirm for message {item.message_id} within "
                            f"{self._publish_timeout}s; it may or may not have reached the broker",
                            message_id=item.message_id,
                        ),
                    )
                    for item in expired
                ]
            )

    def _fail_all(self, error: BaseException) -> None:
        items = list(self._inflight.values())
        self._inflight.clear()
        self._resolve([(item, error) for item in items])
        self._fail_outbox(error)

    def _fail_outbox(self, error: BaseException) -> None:
        """Fail what waits in the outbox (any thread: each item is popped by one of them)."""
        items = []
        outbox = self._outbox
        while True:
            try:
                items.append(outbox.popleft())
            except IndexError:
                break
        self._resolve([(item, error) for item in items])

    def _resolve(self, results: list[tuple[_Pending, BaseException | None]]) -> None:
        if not results:
            return
        resolved = []
        with self._cond:
            for item, error in results:
                if item._set(error):
                    resolved.append(item)
            self._resolved += len(resolved)
            self._cond.notify_all()
        for item in resolved:
            if item._callbacks:
                run_callbacks(item, item._take_callbacks())

    def _resolve_confirmed(self, items: list[_Pending]) -> None:
        """:meth:`_resolve` without errors, inlined: it runs for every confirmed message."""
        with_callbacks = []
        count = 0
        with self._cond:
            for item in items:
                if not item._done:
                    item._done = True
                    count += 1
                    if item._callbacks:
                        with_callbacks.append(item)
            self._resolved += count
            self._cond.notify_all()
        for item in with_callbacks:
            run_callbacks(item, item._take_callbacks())

    def _close_connection(self) -> None:
        connection = self._connection
        if connection is None:
            return
        if connection.is_closing or connection.is_closed:
            connection.ioloop.stop()
            return
        try:
            connection.close()
        except pex.ConnectionWrongStateError:
            connection.ioloop.stop()
