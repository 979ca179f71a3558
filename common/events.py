"""The Event envelope and its one wire format.

Every level speaks the same format: one JSON object per line,
``{"id", "event", "data", "timestamp", "version", "correlation_id"}``. The codec lives here
and only here (orjson: about ten times faster than the standard library, which would otherwise
cap every log, replay and file-Kafka path).

Creating an Event is on the hot path of every ``emit``, so the class is a ``__slots__`` object
that keeps a process-wide counter and an integer clock and formats the id and the ISO-8601
time only when somebody asks for them.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from common.patterns import validate_name, validated_names
from common.speedups import speedups as _speedups

__all__ = ["Event", "InvalidEventError", "dumps", "loads", "new_event"]

WIRE_FIELDS = ("id", "event", "data", "timestamp", "version", "correlation_id")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
_Z_NATIVE = sys.version_info >= (3, 11)  # fromisoformat() accepts a trailing "Z" since 3.11


class InvalidEventError(ValueError):
    """Raised for input that is not a valid event; the message says what is wrong."""


# Ids: a per-process random prefix plus a counter. Unique across processes and restarts
# (48 random bits per process), and about 100x cheaper than uuid4 on the hot path.
def _new_prefix() -> str:
    return os.urandom(6).hex()


_prefix = _new_prefix()
_counter = itertools.count(1)


def _reset_after_fork() -> None:
    # A forked child must not repeat its parent's ids: a new prefix is enough (the counter,
    # bound into the hot path, carries on).
    global _prefix
    _prefix = _new_prefix()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


_second_cache: tuple[int, str] = (-1, "")  # (epoch second, its ISO text): one global, swapped whole


def _format_ts(ns: int) -> str:
    # Events come in bursts within the same second: format the date and time once per second
    # and add the microseconds (datetime.isoformat was ~40% of serialising an event).
    global _second_cache
    second, micros = divmod(ns // 1000, 1_000_000)
    cached_second, text = _second_cache
    if second != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_cache = (second, text)
    return f"{text}.{micros:06d}Z"


def _parse_iso(value: Any) -> datetime:
    if not isinstance(value, str):
        raise InvalidEventError(
            f"'timestamp' must be an ISO-8601 string, got {type(value).__name__}"
        )
    try:
        dt = datetime.fromisoformat(value if _Z_NATIVE else value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidEventError(f"'timestamp' is not ISO-8601: {value!r}") from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def _to_ns(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return ((dt - _EPOCH) // _US) * 1000


def _parse_ts(value: Any) -> int:
    return _to_ns(_parse_iso(value))


def dumps(obj: Any) -> bytes:
    """Serialise with the repository's codec; unserialisable values raise InvalidEventError."""
    try:
        return orjson.dumps(obj)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise InvalidEventError(f"not JSON-serialisable: {exc}") from None


def loads(text: str | bytes | bytearray | memoryview) -> Any:
    """Parse JSON with the repository's codec; malformed input raises InvalidEventError."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidEventError(f"malformed JSON: {exc}") from None


class Event:
    """An immutable event: what happened (``name``), its facts (``data``), and its envelope.

    ``id`` is unique across processes; ``timestamp`` is an aware UTC datetime (ISO-8601 with a
    ``Z`` on the wire); ``version`` is the schema version of ``data`` (see upcasting in Level 3);
    ``correlation_id`` ties together the events of one business process.

    The fields are read-only. ``data`` is a plain dict shared by every listener: treat it as
    read-only too (copying it on every emit would double the cost of an emit).
    """

    __slots__ = ("_corr", "_data", "_id", "_iso", "_name", "_ns", "_seq", "_version")

    def __init__(
        self,
        name: str,
        data: dict[str, Any] | None = None,
        *,
        version: int = 1,
        correlation_id: str | None = None,
        id: str | None = None,
        timestamp: datetime | str | None = None,
    ) -> None:
        # Validation of name/data is the caller's job on the hot path (the bus validates each
        # name once); Event.create() and from_dict() validate fully.
        self._name = name
        self._data = {} if data is None else data
        self._version = version
        self._corr = correlation_id
        self._id = id
        self._iso = None
        if timestamp is None:
            self._seq = next(_counter)
            self._ns = time.time_ns()
        else:
            self._seq = 0
            if isinstance(timestamp, datetime):
                self._ns = _to_ns(timestamp)
            else:
                self._ns = _parse_ts(timestamp)
                self._iso = timestamp

    @classmethod
    def create(cls, name: str, data: dict[str, Any] | None = None, **meta: Any) -> Event:
        """Build an event after validating every field (for callers outside the bus)."""
        validate_name(name)
        _check_fields(data, meta.get("version", 1), meta.get("correlation_id"))
        return cls(name, data, **meta)

    # -- read-only fields -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def data(self) -> dict[str, Any]:
        return self._data

    @property
    def version(self) -> int:
        return self._version

    @property
    def correlation_id(self) -> str | None:
        return self._corr

    @property
    def id(self) -> str:
        if self._id is None:
            self._id = f"{_prefix}-{self._seq:08x}"
        return self._id

    @property
    def timestamp(self) -> datetime:
        return _EPOCH + timedelta(microseconds=self.timestamp_ns // 1000)

    @property
    def timestamp_iso(self) -> str:
        if self._iso is None:
            self._iso = _format_ts(self.timestamp_ns)
        return self._iso

    @property
    def timestamp_ns(self) -> int:
        """Nanoseconds since the epoch (microsecond precision once parsed from the wire)."""
        ns = self._ns
        if ns is None:  # read from the wire: converted on first use (replay rarely needs it)
            ns = self._ns = _parse_ts(self._iso)
        return ns

    # -- value semantics --------------------------------------------------------------------
    def _key(self) -> tuple[Any, ...]:
        return (
            self.id,
            self._name,
            self._data,
            self.timestamp_ns // 1000,
            self._version,
            self._corr,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"Event(name={self._name!r}, data={self._data!r}, id={self.id!r})"

    def replace(self, **changes: Any) -> Event:
        """A copy with some fields changed (upcasters use it); id and timestamp are kept."""
        fields = {
            "name": self._name,
            "data": self._data,
            "version": self._version,
            "correlation_id": self._corr,
            "id": self.id,
            "timestamp": self.timestamp_iso,
        }
        fields.update(changes)
        return Event(fields.pop("name"), fields.pop("data"), **fields)

    # -- wire format ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event": self._name,
            "data": self._data,
            "timestamp": self.timestamp_iso,
            "version": self._version,
            "correlation_id": self._corr,
        }

    def to_json_bytes(self) -> bytes:
        """The wire form without a newline; raises InvalidEventError for unserialisable data."""
        return dumps(self.to_dict())

    def to_json(self) -> str:
        return self.to_json_bytes().decode()

    @classmethod
    def from_dict(  # replaced by the C version when it is built (end of module)
        cls,
        obj: Any,
        _known: Any = validated_names,
        _fromiso: Any = datetime.fromisoformat,
        _dict: Any = dict,
        _str: Any = str,
        _int: Any = int,
    ) -> Event:
        """Validate a decoded wire object. Unknown extra keys are ignored (forward compatible).

        On the replay hot path, so in two steps: one cheap test of the usual shape (exact
        types, a name already validated once, a timestamp ``fromisoformat`` accepts); anything
        else takes the thorough path, which says precisely what is wrong. The timestamp is
        converted to nanoseconds only when somebody asks for it.
        """
        try:
            name = obj["event"]
            event_id = obj["id"]
            data = obj["data"]
            timestamp = obj["timestamp"]
            version = obj.get("version", 1)
            corr = obj.get("correlation_id")
        except (KeyError, TypeError, AttributeError):
            return cls._from_dict_checked(obj)
        if not (
            obj.__class__ is _dict
            and name.__class__ is _str
            and name in _known
            and event_id.__class__ is _str
            and event_id
            and data.__class__ is _dict
            and version.__class__ is _int
            and version >= 1
            and (corr is None or corr.__class__ is _str)
            and timestamp.__class__ is _str
        ):
            return cls._from_dict_checked(obj)
        try:
            _fromiso(timestamp if _Z_NATIVE else timestamp.replace("Z", "+00:00"))
        except ValueError:
            return cls._from_dict_checked(obj)
        return cls._restore(name, data, version, corr, event_id, timestamp)

    @classmethod
    def _from_dict_checked(cls, obj: Any) -> Event:
        # The thorough path: every check, each with its own message.
        if not isinstance(obj, dict):
            raise InvalidEventError(f"an event must be a JSON object, got {type(obj).__name__}")
        missing = [f for f in ("id", "event", "data", "timestamp") if f not in obj]
        if missing:
            raise InvalidEventError(f"event is missing field(s): {', '.join(missing)}")
        name = obj["event"]
        if not isinstance(name, str):
            raise InvalidEventError(f"'event' must be a string, got {type(name).__name__}")
        try:
            validate_name(name)
        except ValueError as exc:
            raise InvalidEventError(f"'event': {exc}") from None
        event_id = obj["id"]
        if not isinstance(event_id, str) or not event_id:
            raise InvalidEventError("'id' must be a non-empty string")
        version = obj.get("version", 1)
        corr = obj.get("correlation_id")
        _check_fields(obj["data"], version, corr)
        _parse_iso(obj["timestamp"])
        return cls._restore(name, obj["data"], version, corr, event_id, obj["timestamp"])

    @classmethod
    def _restore(
        cls, name: str, data: Any, version: int, corr: Any, event_id: str, timestamp: str
    ) -> Event:
        # A validated event from the wire, built without __init__'s keyword parsing.
        event = _new(cls)
        event._name = name
        event._data = {} if data is None else data
        event._version = version
        event._corr = corr
        event._id = event_id
        event._seq = 0
        event._ns = None  # converted from _iso on first use (timestamp_ns)
        event._iso = timestamp
        return event

    @classmethod
    def from_json(  # replaced by the C version when it is built (end of module)
        cls, text: str | bytes | bytearray | memoryview
    ) -> Event:
        """Parse one wire line; raises InvalidEventError naming what is wrong."""
        return cls.from_dict(loads(text))


_new = object.__new__


def new_event(  # replaced by the C version when it is built (end of module)
    name: str,
    data: dict[str, Any] | None,
    _new: Any = object.__new__,
    _next: Any = next,
    _counter: Any = _counter,
    _now: Any = time.time_ns,
) -> Event:
    """The hot-path constructor used by the buses: a fresh event, no keyword parsing.

    About 40% cheaper than ``Event(name, data)``; the caller has validated ``name``.
    """
    event = _new(Event)  # skips __init__'s keyword parsing
    event._name = name
    event._data = {} if data is None else data
    event._version = 1
    event._corr = None
    event._id = None
    event._iso = None
    event._seq = _next(_counter)
    event._ns = _now()
    return event


def _check_fields(data: Any, version: Any, corr: Any) -> None:
    if data is not None and not isinstance(data, dict):
        raise InvalidEventError(f"'data' must be a JSON object, got {type(data).__name__}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidEventError(f"'version' must be a positive integer, got {version!r}")
    if corr is not None and not isinstance(corr, str):
        raise InvalidEventError(f"'correlation_id' must be a string or null, got {corr!r}")


# The C versions of the hot constructors (common/_speedups.c), when the extension was
# built and EDA_PURE_PYTHON is not set (common/speedups.py). The Python versions above stay
# the reference, kept as ``_py_new_event``, ``_py_from_dict`` and ``_py_from_json``; tests
# hold both equal.
_py_new_event = new_event
_py_from_dict = Event.__dict__["from_dict"].__func__
_py_from_json = Event.__dict__["from_json"].__func__
if _speedups is not None:
    _speedups.setup(Event, _counter, validated_names, orjson.loads, _py_from_json)
    new_event = _speedups.new_event
    Event.from_dict = classmethod(_speedups.from_dict)  # type: ignore[method-assign,assignment]
    Event.from_json = classmethod(_speedups.from_json)  # type: ignore[method-assign,assignment]
