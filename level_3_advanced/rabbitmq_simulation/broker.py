"""``connect()``: one entry point for both brokers, and the ``auto`` choice between them.

* ``connect(None)`` or ``connect("memory://")`` — a channel on this process's default
  simulated broker (created on first use, never at import);
* ``connect(broker)`` — a channel on that :class:`SimulatedBroker` (tests and demos make
  their own, so that nothing is shared by accident);
* ``connect("amqp://user:pass@host:5672/vhost")`` — a channel on a real RabbitMQ, through pika.

Each call opens its own connection: close the channel to close it.
"""

from __future__ import annotations

import threading
import time
from typing import Union
from urllib.parse import urlsplit, urlunsplit

import pika

from common.logger import get_logger
from level_3_advanced.rabbitmq_simulation.channel import Channel
from level_3_advanced.rabbitmq_simulation.errors import BrokerError
from level_3_advanced.rabbitmq_simulation.pika_channel import (
    PikaChannel,
    connection_parameters,
    translate,
)
from level_3_advanced.rabbitmq_simulation.simulated_rabbitmq import SimulatedBroker

__all__ = [
    "BROKER_MODES",
    "Target",
    "choose_broker",
    "connect",
    "default_broker",
    "probe",
    "redact",
]

log = get_logger(__name__)

BROKER_MODES = ("auto", "simulated", "rabbitmq")
# What connect() accepts: a URL, a simulated broker, or None (the default simulated broker).
Target = Union[str, SimulatedBroker, None]  # noqa: UP007 (a runtime alias, py3.10-safe)

_default: SimulatedBroker | None = None
_default_lock = threading.Lock()


def default_broker() -> SimulatedBroker:
    """This process's shared simulated broker, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = SimulatedBroker("default")
        return _default


def connect(
    target: Target = None,
    *,
    name: str | None = None,
    timeout: float = 5.0,
    window: int = 1000,
    publish_timeout: float = 30.0,
) -> Channel:
    """A channel on the simulated broker or on RabbitMQ (see the module docstring).

    ``name`` shows in RabbitMQ's management UI (connection name); ``timeout`` bounds the
    socket connect and the AMQP handshake; ``window`` is the number of pipelined publisher
    confirms (:meth:`Channel.publish`); ``publish_timeout`` how long one may stay unconfirmed.
    Raises :class:`~.errors.ConnectionLost` (retryable) or :class:`~.errors.AccessRefused`.
    """
    if isinstance(target, SimulatedBroker):
        return target.channel(name)
    if target is None or target == "memory://":
        return default_broker().channel(name)
    if isinstance(target, str) and target.startswith(("amqp://", "amqps://")):
        return PikaChannel(
            target, name=name, timeout=timeout, window=window, publish_timeout=publish_timeout
        )
    raise ValueError(
        f"not a broker: {redact(target) if isinstance(target, str) else target!r} "
        "(expected an amqp:// or amqps:// URL, 'memory://', None or a SimulatedBroker)"
    )


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def probe(url: str, timeout: float = 1.0) -> str | None:
    """None if a RabbitMQ answers at ``url`` within ``timeout`` seconds, else why not."""
    try:
        params = connection_parameters(url, name="eda-probe", timeout=timeout)
    except ValueError as exc:
        return f"bad URL: {exc}"
    try:
        connection = pika.BlockingConnection(params)
    except Exception as exc:  # anything at all means "not usable": say what it was
        error = translate(exc) if not isinstance(exc, OSError) else exc
        return str(error) or type(error).__name__
    try:
        connection.close()
    except Exception as exc:
        log.debug("probe: close failed: %r", exc)
    return None


def choose_broker(
    mode: str, url: str, *, timeout: float = 1.0
) -> tuple[str, str | SimulatedBroker]:
    """Resolve ``--broker auto|simulated|rabbitmq`` to ``(kind, target)`` for :func:`connect`.

    ``auto`` uses RabbitMQ when it answers within ``timeout`` seconds and the simulation
    otherwise; either way it says which in one log line. ``rabbitmq`` insists (raising
    :class:`~.errors.BrokerError` when it does not answer), ``simulated`` never tries.
    """
    if mode not in BROKER_MODES:
        raise ValueError(f"broker must be one of {BROKER_MODES}, got {mode!r}")
    if mode == "simulated":
        log.info("broker: the in-process simulation (--broker simulated)")
        return "simulated", SimulatedBroker("demo")
    start = time.perf_counter()
    reason = probe(url, timeout)
    elapsed_ms = (time.perf_counter() - start) * 1000
    if reason is None:
        log.info("broker: RabbitMQ at %s (answered in %.0f ms)", redact(url), elapsed_ms)
        return "rabbitmq", url
    if mode == "rabbitmq":
        raise BrokerError(f"RabbitMQ at {redact(url)} does not answer: {reason}")
    log.info(
        "broker: the in-process simulation (RabbitMQ at %s did not answer within %.1fs: %s)",
        redact(url),
        timeout,
        reason,
    )
    return "simulated", SimulatedBroker("demo")
