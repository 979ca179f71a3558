"""An in-process broker that behaves like RabbitMQ, with pika's method names.

It teaches the AMQP 0-9-1 model without a server: a producer publishes to an **exchange**
with a routing key; **bindings** copy the message into **queues** (``fanout``: every bound
queue; ``direct``: bindings whose key equals the routing key; ``topic``: ``*`` one word, ``#``
zero or more, matched by :class:`common.patterns.PatternIndex`); a consumer receives a queue's
messages up to its **prefetch** count and must **ack** each one; what it leaves unacked goes
back to the queue, flagged ``redelivered``, when its channel or connection closes; a message
it **rejects** (``basic_nack(requeue=False)``) goes to the queue's **dead-letter exchange**
with an ``x-death`` header. Everything a client sees is pika's: ``pika.spec.Basic.Deliver``,
``pika.BasicProperties``, ``pika.frame.Method`` results.

RabbitMQ's behaviour, kept on purpose:

* a mandatory message that matches no queue is returned (``312 NO_ROUTE``): in confirm mode
  ``basic_publish`` raises :class:`UnroutableError`; otherwise the channel's return callbacks
  run (and a warning is logged). A non-mandatory one is dropped, as RabbitMQ does, but counted
  and logged: never silently;
* ``x-max-length`` counts ready messages; ``x-overflow: reject-publish`` nacks the publish
  (:class:`NackError` in confirm mode), the default ``drop-head`` dead-letters the oldest;
* channel errors close the channel: ``404`` publish to a missing exchange, ``406`` a declare
  with different settings or an ack of an unknown delivery tag, ``405`` another connection's
  exclusive queue, ``403`` a reserved ``amq.`` name;
* ``basic_cancel`` requeues the deliveries not yet handed to the callback (as pika's
  ``BlockingChannel`` does); those already handed over stay unacked until acked or until the
  channel closes;
* :meth:`SimulatedBroker.restart` closes every connection with ``320 CONNECTION_FORCED``,
  forgets non-durable exchanges and queues, and keeps only persistent messages
  (``delivery_mode=2``) of durable queues: durability is two settings, not one.

Not simulated: the ``headers`` exchange, exchange-to-exchange bindings, TTLs, priorities,
transactions, flow control. Routing keys in bindings must be valid topic patterns.

Thread safety: one lock guards the broker; each connection's deliveries wait in its own
inbox and run in the thread that calls ``process_data_events``/``start_consuming`` (as
with pika's ``BlockingConnection``); ``add_callback_threadsafe`` is the cross-thread door.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from pika import BasicProperties
from pika.frame import Method
from pika.spec import Basic, Exchange, Queue

from common.logger import get_logger
from common.patterns import PatternIndex, validate_pattern
from level_3_advanced.rabbitmq_simulation.channel import (
    Channel,
    Confirmation,
    OnMessage,
    with_message_id,
)
from level_3_advanced.rabbitmq_simulation.errors import (
    ChannelError,
    ConnectionLost,
    NackError,
    PublishError,
    UnroutableError,
)

__all__ = ["EXCHANGE_TYPES", "SimulatedBroker", "SimulatedChannel", "SimulatedConnection"]

log = get_logger(__name__)

EXCHANGE_TYPES = ("direct", "fanout", "topic")
_SHUTDOWN = (320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'")
_conn_ids = itertools.count(1)


class _Message:
    __slots__ = ("body", "exchange", "properties", "redelivered", "routing_key")

    def __init__(
        self, exchange: str, routing_key: str, body: bytes, properties: BasicProperties
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.properties = properties
        self.redelivered = False

    @property
    def persistent(self) -> bool:
        return self.properties.delivery_mode == 2


class _Exchange:
    __slots__ = ("arguments", "auto_delete", "bindings", "direct", "durable", "internal")
    __slots__ += ("name", "topic", "type")

    def __init__(
        self,
        name: str,
        type_: str,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: dict[str, Any],
    ) -> None:
        self.name = name
        self.type = type_
        self.durable = durable
        self.auto_delete = auto_delete
        self.internal = internal
        self.arguments = arguments
        self.bindings: dict[tuple[str, str], None] = {}  # (queue, key), in binding order
        self.direct: dict[str, dict[str, None]] = {}  # key -> queues (direct exchanges)
        self.topic: PatternIndex[str] = PatternIndex()  # pattern -> queues (topic exchanges)

    def bind(self, queue: str, key: str) -> None:
        if (queue, key) in self.bindings:
            return
        if self.type == "topic":
            self.topic.add(key, queue)
        elif self.type == "direct":
            self.direct.setdefault(key, {})[queue] = None
        self.bindings[(queue, key)] = None

    def unbind(self, queue: str, key: str) -> bool:
        if (queue, key) not in self.bindings:
            return False
        del self.bindings[(queue, key)]
        if self.type == "topic":
            self.topic.remove(key, queue)
        elif self.type == "direct":
            queues = self.direct[key]
            del queues[queue]
            if not queues:
                del self.direct[key]
        return True

    def route(self, routing_key: str) -> list[str]:
        """The queues a message with this key goes to (each once, however many bindings)."""
        if self.type == "fanout":
            return list(dict.fromkeys(q for q, _ in self.bindings))
        if self.type == "direct":
            return list(self.direct.get(routing_key, ()))
        try:
            return self.topic.match(routing_key)
        except ValueError:  # an empty key or empty words: only '#' bindings match it
            return list(dict.fromkeys(q for q, k in self.bindings if set(k.split(".")) == {"#"}))


class _Consumer:
    __slots__ = ("active", "auto_ack", "callback", "channel", "prefetch", "queue", "tag")
    __slots__ += ("exclusive", "unacked")

    def __init__(
        self,
        tag: str,
        queue: _Queue,
        channel: SimulatedChannel,
        callback: OnMessage,
        auto_ack: bool,
        prefetch: int,
    ) -> None:
        self.tag = tag
        self.queue = queue
        self.channel = channel
        self.callback = callback
        self.auto_ack = auto_ack
        self.prefetch = prefetch
        self.unacked = 0
        self.active = True
        self.exclusive = False

    def has_room(self) -> bool:
        if self.auto_ack:
            return True
        if self.prefetch and self.unacked >= self.prefetch:
            return False
        limit = self.channel._global_prefetch
        return not limit or len(self.channel._unacked) < limit


class _Queue:
    __slots__ = ("arguments", "auto_delete", "consumers", "dlrk", "dlx", "durable", "exclusive")
    __slots__ += ("had_consumers", "max_length", "messages", "name", "overflow", "rr")

    def __init__(
        self,
        name: str,
        durable: bool,
        exclusive: SimulatedConnection | None,
        auto_delete: bool,
        arguments: dict[str, Any],
    ) -> None:
        self.name = name
        self.durable = durable
        self.exclusive = exclusive
        self.auto_delete = auto_delete
        self.arguments = arguments
        self.messages: deque[_Message] = deque()
        self.consumers: list[_Consumer] = []
        self.rr = 0  # round-robin position among consumers
        self.had_consumers = False
        self.dlx: str | None = arguments.get("x-dead-letter-exchange")
        self.dlrk: str | None = arguments.get("x-dead-letter-routing-key")
        self.max_length: int | None = arguments.get("x-max-length")
        self.overflow: str = arguments.get("x-overflow", "drop-head")


class SimulatedBroker:
    """The broker: exchanges, queues, bindings and connections, under one lock.

    ``connection()`` is pika's ``BlockingConnection(...)``; ``channel()`` opens a connection
    with one channel (what :func:`broker.connect` returns). ``stats`` counts what happened
    (published, routed, unroutable, returned, delivered, redelivered, acked, requeued,
    dead_lettered, dropped, publish_nacked). ``queue_info``, ``bindings`` and ``queues``
    are the management UI's view.
    """

    def __init__(self, name: str = "simulated") -> None:
        self.name = name
        self._lock = threading.RLock()
        self._exchanges: dict[str, _Exchange] = {}
        self._queues: dict[str, _Queue] = {}
        self._connections: dict[int, SimulatedConnection] = {}
        self.stats: Counter[str] = Counter()
        for ex_name, ex_type in (
            ("", "direct"),
            ("amq.direct", "direct"),
            ("amq.fanout", "fanout"),
            ("amq.topic", "topic"),
        ):
            self._exchanges[ex_name] = _Exchange(ex_name, ex_type, True, False, False, {})

    def __repr__(self) -> str:
        return (
            f"<SimulatedBroker {self.name!r} exchanges={len(self._exchanges)} "
            f"queues={len(self._queues)} connections={len(self._connections)}>"
        )

    # -- clients ----------------------------------------------------------------------------
    def connection(self, name: str | None = None) -> SimulatedConnection:
        """Open a connection (pika: ``BlockingConnection(params)``)."""
        conn = SimulatedConnection(self, name)
        with self._lock:
            self._connections[conn.id] = conn
        return conn

    def channel(self, name: str | None = None) -> SimulatedChannel:
        """A connection with one channel; closing the channel closes its connection."""
        channel = self.connection(name).channel()
        channel._owns_connection = True
        return channel

    # -- the management view ----------------------------------------------------------------
    def queues(self) -> list[str]:
        with self._lock:
            return list(self._queues)

    def exchanges(self) -> list[str]:
        with self._lock:
            return [name for name in self._exchanges if name]

    def bindings(self, exchange: str) -> list[tuple[str, str]]:
        """``(queue, routing_key)`` pairs bound to ``exchange``."""
        with self._lock:
            ex = self._exchanges.get(exchange)
            return list(ex.bindings) if ex is not None else []

    def queue_info(self, queue: str) -> dict[str, int]:
        """``{"ready", "unacked", "consumers"}`` of a queue (KeyError if it does not exist)."""
        with self._lock:
            q = self._queues[queue]
            unacked = sum(
                1
                for conn in self._connections.values()
                for ch in conn._channels
                for (_, owner, _) in ch._unacked.values()
                if owner is q
            )
            return {"ready": len(q.messages), "unacked": unacked, "consumers": len(q.consumers)}

    def peek(self, queue: str) -> list[tuple[BasicProperties, bytes]]:
        """The ready messages of a queue, oldest first, without consuming them."""
        with self._lock:
            return [(_copy_properties(m.properties), m.body) for m in self._queues[queue].messages]

    # -- faults -----------------------------------------------------------------------------
    def kill_connections(
        self,
        name: str | None = None,
        *,
        reply_code: int = _SHUTDOWN[0],
        reply_text: str = _SHUTDOWN[1],
    ) -> int:
        """Close connections as the broker does (all, or those named ``name``).

        Their unacked deliveries go back to their queues flagged ``redelivered``; a thread
        inside ``process_data_events`` wakes up with :class:`ConnectionLost`. This is what a
        worker sees when its process is killed (from the broker's side) or the broker stops.
        """
        with self._lock:
            victims = [c for c in self._connections.values() if name is None or c.name == name]
            for conn in victims:
                conn._lose(ConnectionLost(f"({reply_code}) {reply_text}", reply_code=reply_code))
            return len(victims)

    def restart(self) -> None:
        """Stop and start the broker: what survives is what was made durable.

        Every connection is closed with 320 CONNECTION_FORCED; non-durable exchanges and
        queues disappear; durable queues keep only their persistent messages.
        """
        with self._lock:
            self.kill_connections()
            for name in [n for n, ex in self._exchanges.items() if not ex.durable]:
                del self._exchanges[name]
            for name in [n for n, q in self._queues.items() if not q.durable]:
                self._drop_queue(name)
            lost = 0
            for q in self._queues.values():
                kept = deque(m for m in q.messages if m.persistent)
                lost += len(q.messages) - len(kept)
                q.messages = kept
                q.consumers.clear()
            for ex in self._exchanges.values():
                for queue, key in list(ex.bindings):
                    if queue not in self._queues:
                        ex.unbind(queue, key)
            self.stats["lost_in_restart"] += lost
            log.info("%s restarted: %d transient message(s) lost", self.name, lost)

    # -- internals (called with the lock held) ----------------------------------------------
    def _exchange(self, channel: SimulatedChannel, name: str) -> _Exchange:
        ex = self._exchanges.get(name)
        if ex is None:
            channel._fail(404, f"NOT_FOUND - no exchange '{name}' in vhost '/'")
        return ex  # type: ignore[return-value]

    def _queue(self, channel: SimulatedChannel, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            channel._fail(404, f"NOT_FOUND - no queue '{name}' in vhost '/'")
        assert q is not None
        if q.exclusive is not None and q.exclusive is not channel._connection:
            channel._fail(
                405,
                f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' "
                "in vhost '/'",
            )
        return q

    def _route(self, exchange: _Exchange, routing_key: str) -> list[_Queue]:
        if exchange.name == "":  # the default exchange: every queue is bound by its name
            q = self._queues.get(routing_key)
            return [q] if q is not None else []
        names = exchange.route(routing_key)
        alternate = exchange.arguments.get("alternate-exchange")
        if not names and alternate in self._exchanges and alternate != exchange.name:
            return self._route(self._exchanges[alternate], routing_key)
        return [self._queues[n] for n in names if n in self._queues]

    def _publish(self, exchange: _Exchange, msg: _Message) -> tuple[bool, bool]:
        """Route and enqueue; returns ``(routed, nacked)``."""
        self.stats["published"] += 1
        queues = self._route(exchange, msg.routing_key)
        if not queues:
            self.stats["unroutable"] += 1
            return False, False
        nacked = False
        for q in queues:
            copy_ = _Message(msg.exchange, msg.routing_key, msg.body, msg.properties)
            if not self._enqueue(q, copy_):
                nacked = True
        self.stats["routed"] += 1
        return True, nacked

    def _enqueue(self, q: _Queue, msg: _Message) -> bool:
        if q.max_length is not None and len(q.messages) >= q.max_length:
            if q.overflow in ("reject-publish", "reject-publish-dlx"):
                self.stats["publish_nacked"] += 1
                if q.overflow == "reject-publish-dlx":
                    self._dead_letter(q, msg, "maxlen")
                return False
            q.messages.append(msg)
            while len(q.messages) > q.max_length:
                self._dead_letter(q, q.messages.popleft(), "maxlen")
        else:
            q.messages.append(msg)
        self._pump(q)
        return True

    def _pump(self, q: _Queue) -> None:
        """Hand ready messages to consumers with room, round robin."""
        consumers = q.consumers
        while q.messages and consumers:
            n = len(consumers)
            for i in range(n):
                consumer = consumers[(q.rr + i) % n]
                if consumer.has_room():
                    q.rr = (q.rr + i + 1) % n
                    consumer.channel._deliver(consumer, q.messages.popleft())
                    break
            else:
                return

    def _requeue(self, items: Iterable[tuple[_Queue, _Message]]) -> None:
        """Put messages back at the head of their queues, in their original order."""
        touched: dict[str, _Queue] = {}
        for q, msg in reversed(list(items)):
            if self._queues.get(q.name) is not q:
                continue  # the queue was deleted meanwhile
            msg.redelivered = True
            q.messages.appendleft(msg)
            touched[q.name] = q
            self.stats["requeued"] += 1
        for q in touched.values():
            self._pump(q)

    def _dead_letter(self, q: _Queue, msg: _Message, reason: str) -> None:
        if q.dlx is None or q.dlx not in self._exchanges:
            if q.dlx is not None:
                log.warning("dead-letter exchange %r of queue %r does not exist", q.dlx, q.name)
            self.stats["dropped"] += 1
            return
        props = _copy_properties(msg.properties)
        headers = props.headers
        deaths = list(headers.get("x-death") or [])
        for death in deaths:
            if death.get("queue") == q.name and death.get("reason") == reason:
                deaths.remove(death)
                death = {**death, "count": death.get("count", 1) + 1}
                deaths.insert(0, death)
                break
        else:
            deaths.insert(
                0,
                {
                    "count": 1,
                    "reason": reason,
                    "queue": q.name,
                    "time": datetime.now(timezone.utc).replace(microsecond=0),
                    "exchange": msg.exchange,
                    "routing-keys": [msg.routing_key],
                },
            )
        headers["x-death"] = deaths
        headers.setdefault("x-first-death-reason", reason)
        headers.setdefault("x-first-death-queue", q.name)
        headers.setdefault("x-first-death-exchange", msg.exchange)
        key = q.dlrk if q.dlrk is not None else msg.routing_key
        self.stats["dead_lettered"] += 1
        dead = _Message(q.dlx, key, msg.body, props)
        routed, _ = self._publish(self._exchanges[q.dlx], dead)
        if not routed:
            log.warning("dead letter from %r matched no queue in %r: dropped", q.name, q.dlx)

    def _drop_queue(self, name: str) -> int:
        q = self._queues.pop(name)
        for consumer in list(q.consumers):
            consumer.channel._broker_cancel(consumer)
        for ex in list(self._exchanges.values()):
            for queue, key in list(ex.bindings):
                if queue == name:
                    ex.unbind(queue, key)
            self._maybe_auto_delete_exchange(ex)
        return len(q.messages)

    def _maybe_auto_delete_exchange(self, ex: _Exchange) -> None:
        if ex.auto_delete and not ex.bindings and self._exchanges.get(ex.name) is ex:
            del self._exchanges[ex.name]

    def _remove_consumer(self, consumer: _Consumer) -> None:
        consumer.active = False
        q = consumer.queue
        if consumer in q.consumers:
            q.consumers.remove(consumer)
        if q.auto_delete and q.had_consumers and not q.consumers and q.name in self._queues:
            self._drop_queue(q.name)


class SimulatedConnection:
    """A client connection (pika: ``BlockingConnection``): channels, an inbox, a lock."""

    def __init__(self, broker: SimulatedBroker, name: str | None = None) -> None:
        self.broker = broker
        self.id = next(_conn_ids)
        self.name = name or f"connection-{self.id}"
        self._lock = broker._lock
        self._cond = threading.Condition(broker._lock)
        self._channels: list[SimulatedChannel] = []
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._threadsafe: deque[Callable[[], None]] = deque()
        self._closed: BaseException | None = None
        self._channel_numbers = itertools.count(1)

    def __repr__(self) -> str:
        return f"<SimulatedConnection {self.name!r} open={self.is_open}>"

    @property
    def is_open(self) -> bool:
        return self._closed is None

    @property
    def is_closed(self) -> bool:
        return self._closed is not None

    def channel(self) -> SimulatedChannel:
        with self._lock:
            self._raise_if_closed()
            channel = SimulatedChannel(self, next(self._channel_numbers))
            self._channels.append(channel)
            return channel

    def _raise_if_closed(self) -> None:
        if self._closed is not None:
            raise self._closed

    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in the thread that processes this connection's events."""
        with self._cond:
            self._raise_if_closed()
            self._threadsafe.append(callback)
            self._cond.notify_all()

    def process_data_events(self, time_limit: float | None = 0) -> None:
        """Run due callbacks; wait up to ``time_limit`` s (None: forever) for the first."""
        with self._cond:
            self._raise_if_closed()
            if not self._inbox and not self._threadsafe and time_limit != 0:
                self._cond.wait(time_limit)
                self._raise_if_closed()
            callbacks = list(self._threadsafe)
            self._threadsafe.clear()
            batch = list(self._inbox)
            self._inbox.clear()
        for callback in callbacks:
            callback()
        for position, item in enumerate(batch):
            try:
                self._dispatch(item)
            except BaseException:
                with self._cond:  # what was not dispatched yet stays in the inbox
                    self._inbox.extendleft(reversed(batch[position + 1 :]))
                raise

    def _dispatch(self, item: tuple[Any, ...]) -> None:
        kind, channel = item[0], item[1]
        if kind == "deliver":
            _, _, consumer, tag, msg, redelivered = item
            if not consumer.active or not channel.is_open:
                return
            method = Basic.Deliver(
                consumer_tag=consumer.tag,
                delivery_tag=tag,
                redelivered=redelivered,
                exchange=msg.exchange,
                routing_key=msg.routing_key,
            )
            consumer.callback(channel, method, _copy_properties(msg.properties), msg.body)
        elif kind == "return":
            _, _, method, properties, body = item
            for callback in list(channel._return_callbacks):
                callback(channel, method, properties, body)
        elif kind == "cancel":
            for callback in list(channel._cancel_callbacks):
                callback(Method(channel.channel_number, Basic.Cancel(consumer_tag=item[2])))

    def _post(self, item: tuple[Any, ...]) -> None:
        self._inbox.append(item)
        self._cond.notify_all()

    def close(self) -> None:
        """Close every channel (their unacked deliveries are requeued) and the connection."""
        with self._lock:
            if self._closed is not None:
                return
            self._shutdown(ConnectionLost("connection closed by the client"))

    def _lose(self, reason: BaseException) -> None:
        if self._closed is None:
            log.info("%s: %s", self.name, reason)
            self._shutdown(reason)

    def _shutdown(self, reason: BaseException) -> None:
        broker = self.broker
        self._closed = reason
        for channel in list(self._channels):
            channel._teardown(reason)
        self._inbox.clear()
        for name in [n for n, q in broker._queues.items() if q.exclusive is self]:
            broker._drop_queue(name)
        broker._connections.pop(self.id, None)
        self._cond.notify_all()


class SimulatedChannel(Channel):
    """A channel on the simulated broker, with pika ``BlockingChannel``'s methods."""

    kind = "simulated"

    def __init__(self, connection: SimulatedConnection, number: int) -> None:
        self._connection = connection
        self._broker = connection.broker
        self._lock = connection._lock
        self.channel_number = number
        self._owns_connection = False
        self._closed: BaseException | None = None
        self._confirm = False
        self._prefetch = 0
        self._global_prefetch = 0
        self._tags = itertools.count(1)
        self._ctags = itertools.count(1)
        # delivery tag -> (consumer or None for basic_get, queue, message), in tag order
        self._unacked: OrderedDict[int, tuple[_Consumer | None, _Queue, _Message]] = OrderedDict()
        self._consumers: dict[str, _Consumer] = {}
        self._return_callbacks: list[Callable[..., None]] = []
        self._cancel_callbacks: list[Callable[..., None]] = []

    def __repr__(self) -> str:
        return f"<SimulatedChannel {self.channel_number} of {self._connection.name!r}>"

    @property
    def connection(self) -> SimulatedConnection:
        return self._connection

    # -- state ------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._closed is None

    def _check(self) -> None:
        if self._closed is not None:
            raise self._closed

    def _fail(self, reply_code: int, reply_text: str) -> None:
        """A channel exception: the broker closes the channel, and the call raises."""
        error = ChannelError(reply_code, reply_text)
        log.warning("%r closed by the broker: %s", self, error)
        self._teardown(error)
        raise error

    def _teardown(self, reason: BaseException) -> None:
        """Close: cancel consumers, requeue every unacked delivery (lock held)."""
        if self._closed is not None:
            return
        self._closed = reason
        for consumer in list(self._consumers.values()):
            self._broker._remove_consumer(consumer)
        self._consumers.clear()
        unacked = [(q, msg) for (_, q, msg) in self._unacked.values()]
        self._unacked.clear()
        self._broker._requeue(unacked)
        if self in self._connection._channels:
            self._connection._channels.remove(self)

    def close(self) -> None:
        with self._lock:
            if self._closed is None:
                self._teardown(ChannelError(0, "channel closed by the client"))
            if self._owns_connection:
                self._connection.close()

    # -- topology ---------------------------------------------------------------------------
    def exchange_declare(
        self,
        exchange: str,
        exchange_type: str = "direct",
        passive: bool = False,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> Method:
        _require_name(exchange, "exchange")
        with self._lock:
            self._check()
            existing = self._broker._exchanges.get(exchange)
            if passive:
                if existing is None:
                    self._fail(404, f"NOT_FOUND - no exchange '{exchange}' in vhost '/'")
                return Method(self.channel_number, Exchange.DeclareOk())
            if exchange == "" or exchange.startswith("amq."):
                self._fail(
                    403,
                    f"ACCESS_REFUSED - exchange name '{exchange}' contains reserved prefix 'amq.*'",
                )
            if exchange_type not in EXCHANGE_TYPES:
                self._fail(503, f"COMMAND_INVALID - unknown exchange type '{exchange_type}'")
            args = dict(arguments or {})
            if existing is not None:
                for field, new, old in (
                    ("type", exchange_type, existing.type),
                    ("durable", durable, existing.durable),
                    ("auto_delete", auto_delete, existing.auto_delete),
                    ("internal", internal, existing.internal),
                    ("arguments", args, existing.arguments),
                ):
                    if new != old:
                        self._fail(
                            406,
                            f"PRECONDITION_FAILED - inequivalent arg '{field}' for exchange "
                            f"'{exchange}' in vhost '/': received {new!r} but current is {old!r}",
                        )
            else:
                self._broker._exchanges[exchange] = _Exchange(
                    exchange, exchange_type, durable, auto_delete, internal, args
                )
            return Method(self.channel_number, Exchange.DeclareOk())

    def exchange_delete(self, exchange: str, if_unused: bool = False) -> Method:
        with self._lock:
            self._check()
            if exchange == "" or exchange.startswith("amq."):
                self._fail(403, f"ACCESS_REFUSED - operation not permitted on '{exchange}'")
            ex = self._broker._exchanges.get(exchange)
            if ex is not None:
                if if_unused and ex.bindings:
                    self._fail(406, f"PRECONDITION_FAILED - exchange '{exchange}' in use")
                del self._broker._exchanges[exchange]
            return Method(self.channel_number, Exchange.DeleteOk())

    def queue_declare(
        self,
        queue: str,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> Method:
        _require_name(queue, "queue")
        with self._lock:
            self._check()
            broker = self._broker
            if passive:
                q = broker._queue(self, queue)
                return self._declare_ok(q)
            if queue.startswith("amq.") and queue not in broker._queues:
                self._fail(403, f"ACCESS_REFUSED - queue name '{queue}' contains reserved prefix")
            if not queue:
                queue = f"amq.gen-{self._connection.id}-{next(_conn_ids)}"
                exclusive = True
            args = dict(arguments or {})
            _check_queue_arguments(self, queue, args)
            q = broker._queues.get(queue)
            if q is not None:
                broker._queue(self, queue)  # 405 if another connection owns it
                for field, new, old in (
                    ("durable", durable, q.durable),
                    ("exclusive", exclusive, q.exclusive is not None),
                    ("auto_delete", auto_delete, q.auto_delete),
                    ("arguments", args, q.arguments),
                ):
                    if new != old:
                        self._fail(
                            406,
                            f"PRECONDITION_FAILED - inequivalent arg '{field}' for queue "
                            f"'{queue}' in vhost '/': received {new!r} but current is {old!r}",
                        )
            else:
                owner = self._connection if exclusive else None
                q = broker._queues[queue] = _Queue(queue, durable, owner, auto_delete, args)
            return self._declare_ok(q)

    def _declare_ok(self, q: _Queue) -> Method:
        return Method(
            self.channel_number,
            Queue.DeclareOk(
                queue=q.name, message_count=len(q.messages), consumer_count=len(q.consumers)
            ),
        )

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False) -> Method:
        with self._lock:
            self._check()
            q = self._broker._queues.get(queue)
            count = 0
            if q is not None:
                self._broker._queue(self, queue)
                if if_unused and q.consumers:
                    self._fail(406, f"PRECONDITION_FAILED - queue '{queue}' in use")
                if if_empty and q.messages:
                    self._fail(406, f"PRECONDITION_FAILED - queue '{queue}' not empty")
                count = self._broker._drop_queue(queue)
            return Method(self.channel_number, Queue.DeleteOk(message_count=count))

    def queue_purge(self, queue: str) -> Method:
        with self._lock:
            self._check()
            q = self._broker._queue(self, queue)
            count = len(q.messages)
            q.messages.clear()
            return Method(self.channel_number, Queue.PurgeOk(message_count=count))

    def queue_bind(
        self,
        queue: str,
        exchange: str,
        routing_key: str | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> Method:
        key = queue if routing_key is None else routing_key
        with self._lock:
            self._check()
            q = self._broker._queue(self, queue)
            ex = self._broker._exchange(self, exchange)
            if ex.name == "":
                self._fail(403, "ACCESS_REFUSED - operation not permitted on the default exchange")
            if ex.type == "topic":
                validate_pattern(key)
            ex.bind(q.name, key)
            return Method(self.channel_number, Queue.BindOk())

    def queue_unbind(
        self,
        queue: str,
        exchange: str,
        routing_key: str | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> Method:
        key = queue if routing_key is None else routing_key
        with self._lock:
            self._check()
            ex = self._broker._exchange(self, exchange)
            ex.unbind(queue, key)
            self._broker._maybe_auto_delete_exchange(ex)
            return Method(self.channel_number, Queue.UnbindOk())

    # -- publishing -------------------------------------------------------------------------
    def confirm_delivery(self) -> None:
        with self._lock:
            self._check()
            self._confirm = True

    def add_on_return_callback(self, callback: Callable[..., None]) -> None:
        """``callback(channel, method, properties, body)`` for each returned message."""
        self._return_callbacks.append(callback)

    def add_on_cancel_callback(self, callback: Callable[..., None]) -> None:
        """``callback(method_frame)`` when the broker cancels a consumer (queue deleted)."""
        self._cancel_callbacks.append(callback)

    def _route_one(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties | None,
        mandatory: bool,
    ) -> PublishError | None:
        """Publish one message; the error a confirm would report, or None."""
        body = _require_body(body)
        if not isinstance(routing_key, str):
            raise TypeError(f"routing_key must be a string, got {type(routing_key).__name__}")
        props = _copy_properties(properties)
        with self._lock:
            self._check()
            ex = self._broker._exchange(self, exchange)
            if ex.internal:
                self._fail(403, f"ACCESS_REFUSED - exchange '{exchange}' is internal")
            routed, nacked = self._broker._publish(ex, _Message(exchange, routing_key, body, props))
            if not routed:
                where = f"exchange '{exchange}'" if exchange else "the default exchange"
                text = f"NO_ROUTE - message with routing key '{routing_key}' matched no queue"
                if mandatory:
                    self._broker.stats["returned"] += 1
                    if not self._confirm:
                        method = Basic.Return(312, "NO_ROUTE", exchange, routing_key)
                        self._connection._post(("return", self, method, props, body))
                    log.warning("message returned by %s: %s", where, text)
                    return UnroutableError(f"(312) {text} in {where}", message_id=props.message_id)
                log.warning("unroutable message dropped by %s: %s", where, text)
            if nacked:
                return NackError(
                    f"message {props.message_id} refused by a full queue (x-overflow)",
                    message_id=props.message_id,
                )
            return None

    def basic_publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties | None = None,
        mandatory: bool = False,
    ) -> None:
        error = self._route_one(exchange, routing_key, body, properties, mandatory)
        if error is not None and self._confirm:
            raise error

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: BasicProperties | None = None,
        mandatory: bool = True,
    ) -> Confirmation:
        """Routed at once, so the Confirmation is already resolved. As with the real adapter,
        whose pipelined publishes use a channel of their own, a missing exchange fails the
        message (404) without closing this channel."""
        if mandatory:
            properties = with_message_id(properties)
        message_id = properties.message_id if properties is not None else None
        with self._lock:
            self._check()
            if exchange not in self._broker._exchanges:
                error = ChannelError(404, f"NOT_FOUND - no exchange '{exchange}' in vhost '/'")
                return Confirmation.resolved(message_id, error)
        error = self._route_one(exchange, routing_key, body, properties, mandatory)
        return Confirmation.resolved(message_id, error)

    def flush(self, timeout: float | None = None) -> bool:
        return True  # every publish here is confirmed (or failed) before it returns

    # -- consuming --------------------------------------------------------------------------
    def basic_qos(
        self, prefetch_size: int = 0, prefetch_count: int = 0, global_qos: bool = False
    ) -> None:
        if not isinstance(prefetch_count, int) or not 0 <= prefetch_count <= 65535:
            raise ValueError(f"prefetch_count must be 0..65535, got {prefetch_count!r}")
        with self._lock:
            self._check()
            if global_qos:
                self._global_prefetch = prefetch_count
            else:
                self._prefetch = prefetch_count

    def basic_consume(
        self,
        queue: str,
        on_message_callback: OnMessage,
        auto_ack: bool = False,
        exclusive: bool = False,
        consumer_tag: str | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> str:
        if not callable(on_message_callback):
            raise TypeError("on_message_callback must be callable")
        with self._lock:
            self._check()
            q = self._broker._queue(self, queue)
            tag = consumer_tag or f"ctag{self._connection.id}.{next(self._ctags)}"
            if tag in self._consumers:
                self._fail(530, f"NOT_ALLOWED - attempt to reuse consumer tag '{tag}'")
            if q.consumers and (exclusive or q.consumers[0].exclusive):
                self._fail(403, f"ACCESS_REFUSED - queue '{queue}' in exclusive use")
            consumer = _Consumer(tag, q, self, on_message_callback, auto_ack, self._prefetch)
            consumer.exclusive = exclusive
            self._consumers[tag] = consumer
            q.consumers.append(consumer)
            q.had_consumers = True
            self._broker._pump(q)
            return tag

    def basic_cancel(self, consumer_tag: str = "") -> list[Any]:
        """Stop a consumer. Deliveries not yet given to its callback are requeued."""
        with self._lock:
            consumer = self._consumers.pop(consumer_tag, None)
            if consumer is None:
                return []
            inbox = self._connection._inbox
            undelivered = [i for i in inbox if i[0] == "deliver" and i[2] is consumer]
            for item in undelivered:
                inbox.remove(item)
            back = []
            for item in undelivered:
                entry = self._unacked.pop(item[3], None)
                if entry is not None:
                    back.append((entry[1], entry[2]))
                    consumer.unacked -= 1
            self._broker._remove_consumer(consumer)
            self._broker._requeue(back)
            return []

    def _broker_cancel(self, consumer: _Consumer) -> None:
        """The broker cancels a consumer (its queue was deleted)."""
        self._consumers.pop(consumer.tag, None)
        consumer.active = False
        if self._cancel_callbacks:
            self._connection._post(("cancel", self, consumer.tag))

    def _deliver(self, consumer: _Consumer, msg: _Message) -> None:
        tag = next(self._tags)
        if consumer.auto_ack:
            self._broker.stats["acked"] += 1
        else:
            self._unacked[tag] = (consumer, consumer.queue, msg)
            consumer.unacked += 1
        stats = self._broker.stats
        stats["delivered"] += 1
        if msg.redelivered:
            stats["redelivered"] += 1
        self._connection._post(("deliver", self, consumer, tag, msg, msg.redelivered))

    def _settle(self, delivery_tag: int, multiple: bool) -> list[tuple[_Queue, _Message]]:
        """Remove unacked deliveries (406 for an unknown tag); returns their messages."""
        self._check()
        if multiple:
            tags = [t for t in self._unacked if delivery_tag == 0 or t <= delivery_tag]
            if delivery_tag and delivery_tag not in self._unacked and not tags:
                self._fail(406, f"PRECONDITION_FAILED - unknown delivery tag {delivery_tag}")
        else:
            if delivery_tag not in self._unacked:
                self._fail(406, f"PRECONDITION_FAILED - unknown delivery tag {delivery_tag}")
            tags = [delivery_tag]
        settled = []
        queues: dict[str, _Queue] = {}
        for tag in tags:
            consumer, q, msg = self._unacked.pop(tag)
            if consumer is not None:
                consumer.unacked -= 1
            settled.append((q, msg))
            queues[q.name] = q
        if self._global_prefetch:  # room on this channel: every consumed queue may go on
            for consumer in self._consumers.values():
                queues[consumer.queue.name] = consumer.queue
        for q in queues.values():
            if self._broker._queues.get(q.name) is q:
                self._broker._pump(q)
        return settled

    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None:
        with self._lock:
            settled = self._settle(delivery_tag, multiple)
            self._broker.stats["acked"] += len(settled)

    def basic_nack(
        self, delivery_tag: int = 0, multiple: bool = False, requeue: bool = True
    ) -> None:
        with self._lock:
            settled = self._settle(delivery_tag, multiple)
            if requeue:
                self._broker._requeue(settled)
            else:
                self._broker.stats["rejected"] += len(settled)
                for q, msg in settled:
                    self._broker._dead_letter(q, msg, "rejected")

    def basic_reject(self, delivery_tag: int = 0, requeue: bool = True) -> None:
        self.basic_nack(delivery_tag, multiple=False, requeue=requeue)

    def basic_get(self, queue: str, auto_ack: bool = False) -> tuple[Any, Any, Any]:
        with self._lock:
            self._check()
            q = self._broker._queue(self, queue)
            if not q.messages:
                return None, None, None
            msg = q.messages.popleft()
            tag = next(self._tags)
            if not auto_ack:
                self._unacked[tag] = (None, q, msg)
            method = Basic.GetOk(
                delivery_tag=tag,
                redelivered=msg.redelivered,
                exchange=msg.exchange,
                routing_key=msg.routing_key,
                message_count=len(q.messages),
            )
            return method, _copy_properties(msg.properties), msg.body

    @property
    def consumer_tags(self) -> list[str]:
        return list(self._consumers)

    def process_data_events(self, time_limit: float | None = 0) -> None:
        self._connection.process_data_events(time_limit)
        closed = self._closed
        if isinstance(closed, ChannelError) and closed.reply_code != 0:
            raise closed

    def start_consuming(self) -> None:
        """Dispatch deliveries until every consumer of this channel is cancelled."""
        while self._consumers:
            self.process_data_events(time_limit=None)

    def stop_consuming(self, consumer_tag: str | None = None) -> None:
        tags = [consumer_tag] if consumer_tag else list(self._consumers)
        for tag in tags:
            self.basic_cancel(tag)
        with self._connection._cond:  # wake start_consuming so that it sees no consumers
            self._connection._cond.notify_all()

    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        self._connection.add_callback_threadsafe(callback)


# -- helpers ---------------------------------------------------------------------------------
def _copy_properties(properties: BasicProperties | None) -> BasicProperties:
    """A private copy (headers included), so no two deliveries share mutable state."""
    if properties is None:
        return BasicProperties(headers={})
    props = copy.copy(properties)
    props.headers = dict(properties.headers) if properties.headers else {}
    return props


def _require_body(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()  # as pika does
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    raise TypeError(f"body must be bytes or str, got {type(body).__name__}")


def _require_name(name: Any, kind: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a string, got {type(name).__name__}")
    if len(name.encode()) > 255:
        raise ValueError(f"{kind} name is longer than 255 bytes: {name[:40]!r}...")


def _check_queue_arguments(channel: SimulatedChannel, queue: str, args: dict[str, Any]) -> None:
    max_length = args.get("x-max-length")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 0):
        channel._fail(406, f"PRECONDITION_FAILED - invalid arg 'x-max-length' for queue '{queue}'")
    overflow = args.get("x-overflow", "drop-head")
    if overflow not in ("drop-head", "reject-publish", "reject-publish-dlx"):
        channel._fail(406, f"PRECONDITION_FAILED - invalid arg 'x-overflow' for queue '{queue}'")
