"""Level 2's exception tree: catch :class:`Level2Error` for anything this level raises.

Buses raise :class:`BusError` subclasses to the producer (a full queue, a closed bus); a
listener's own exception never reaches the producer, it ends in ``bus.errors`` and
``bus.dead_letters``. The shop raises :class:`ShopError` subclasses for bad commands.
"""

from __future__ import annotations

__all__ = [
    "BusClosedError",
    "BusError",
    "InvalidOrderError",
    "Level2Error",
    "ListenerNotPicklableError",
    "OrderAlreadyPaidError",
    "QueueFullError",
    "RemoteListenerError",
    "RemoteTraceback",
    "ShopError",
    "UnknownOrderError",
    "WorkerDiedError",
]


class Level2Error(Exception):
    """Base class of every error raised by ``level_2_intermediate``."""


class BusError(Level2Error, RuntimeError):
    """A queue-backed bus could not accept an event."""


class QueueFullError(BusError):
    """The queue stayed full for ``put_timeout`` seconds: backpressure, the event was refused.

    The producer decides what to do (retry later, answer HTTP 503, slow down); the bus never
    drops an event silently.
    """


class BusClosedError(BusError):
    """``emit``/``publish``/``start`` on a bus that is closing or closed."""


class WorkerDiedError(BusError):
    """Recorded in a dead letter when a worker died while delivering the event."""


class RemoteListenerError(Level2Error):
    """Stands for a worker process's exception that could not be pickled back to the parent.

    ``type_name`` is the original exception's class name; the original traceback is in
    ``__cause__`` (a :class:`RemoteTraceback`).
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.type_name, self.message))


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a worker process (set as ``__cause__``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class ListenerNotPicklableError(Level2Error, TypeError):
    """A ProcessEventBus listener must be importable (or picklable) to reach a worker process."""


class ShopError(Level2Error):
    """A shop command was refused; nothing was stored and nothing was emitted."""


class InvalidOrderError(ShopError, ValueError):
    """The customer or the items of an order are not valid."""


class UnknownOrderError(ShopError, LookupError):
    """No order has this id."""


class OrderAlreadyPaidError(ShopError):
    """The order was paid already (or a payment for it is in progress)."""
