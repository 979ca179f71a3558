"""The Event envelope and the one JSON-lines wire format."""

from __future__ import annotations

import multiprocessing
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.events import Event, InvalidEventError, dumps, loads, new_event


def test_fields_and_defaults() -> None:
    before = datetime.now(timezone.utc)
    event = Event("order.created", {"order_id": 777})
    after = datetime.now(timezone.utc)
    assert event.name == "order.created"
    assert event.data == {"order_id": 777}
    assert event.version == 1
    assert event.correlation_id is None
    assert (
        before - timedelta(milliseconds=1) <= event.timestamp <= after + timedelta(milliseconds=1)
    )
    assert event.timestamp.tzinfo is not None
    assert Event("a").data == {}


def test_fields_are_read_only() -> None:
    event = Event("a.b", {"x": 1})
    for field in ("name", "data", "id", "timestamp", "version", "correlation_id"):
        with pytest.raises(AttributeError):
            setattr(event, field, "changed")


def test_ids_are_unique_and_stable() -> None:
    events = [new_event("a", None) for _ in range(10_000)] + [Event("a") for _ in range(100)]
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)
    assert events[0].id == events[0].id  # formatted once, then the same


def _ids_in_child(queue: multiprocessing.Queue) -> None:
    queue.put([Event("a").id for _ in range(100)])


def test_ids_are_unique_across_forked_processes() -> None:
    # After a fork both processes continue from the same counter value: only the child's new
    # prefix keeps their ids apart.
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue = ctx.Queue()
    child = ctx.Process(target=_ids_in_child, args=(queue,))
    child.start()
    try:
        parent_ids = {Event("a").id for _ in range(100)}
        child_ids = set(queue.get(timeout=30))
    finally:
        child.join(timeout=30)
        queue.close()
        queue.join_thread()
    assert len(child_ids) == 100
    assert not parent_ids & child_ids


def test_wire_format_has_exactly_the_six_fields() -> None:
    event = Event("user.registered", {"email": "a@b.c"}, correlation_id="saga-1", version=2)
    obj = orjson.loads(event.to_json())
    assert list(obj) == ["id", "event", "data", "timestamp", "version", "correlation_id"]
    assert obj["event"] == "user.registered"
    assert obj["version"] == 2
    assert obj["correlation_id"] == "saga-1"
    assert obj["timestamp"].endswith("Z")
    assert "\n" not in event.to_json()


def test_json_round_trip_is_exact() -> None:
    event = Event("order.paid", {"order_id": 1, "amount": 12.5, "tags": ["a"]}, correlation_id="c")
    back = Event.from_json(event.to_json())
    assert back == event
    assert back.id == event.id
    assert back.timestamp == event.timestamp
    assert back.to_json() == event.to_json()
    assert Event.from_json(event.to_json_bytes()) == event


def test_from_json_accepts_offsets_and_ignores_unknown_fields() -> None:
    line = (
        '{"id":"x1","event":"a.b","data":{},"timestamp":"2026-01-02T03:04:05.000006+02:00",'
        '"offset":17,"key":"k"}'
    )
    event = Event.from_json(line)
    assert event.timestamp == datetime(2026, 1, 2, 1, 4, 5, 6, tzinfo=timezone.utc)
    assert event.version == 1 and event.correlation_id is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "malformed JSON"),
        ('{"id": "x", "event": "a"', "malformed JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        ('{"event": "a", "data": {}, "timestamp": "2026-01-01T00:00:00Z"}', "missing field(s): id"),
        ('{"id": "x", "event": "a"}', "missing field(s): data, timestamp"),
        ('{"id": "x", "event": 5, "data": {}, "timestamp": "2026-01-01T00:00:00Z"}', "'event'"),
        (
            '{"id": "x", "event": "a.*", "data": {}, "timestamp": "2026-01-01T00:00:00Z"}',
            "wildcard",
        ),
        ('{"id": "", "event": "a", "data": {}, "timestamp": "2026-01-01T00:00:00Z"}', "'id'"),
        ('{"id": "x", "event": "a", "data": [], "timestamp": "2026-01-01T00:00:00Z"}', "'data'"),
        ('{"id": "x", "event": "a", "data": {}, "timestamp": "yesterday"}', "not ISO-8601"),
        ('{"id": "x", "event": "a", "data": {}, "timestamp": 5}', "ISO-8601 string"),
        (
            '{"id": "x", "event": "a", "data": {}, "timestamp": "2026-01-01T00:00:00Z",'
            ' "version": 0}',
            "'version'",
        ),
        (
            '{"id": "x", "event": "a", "data": {}, "timestamp": "2026-01-01T00:00:00Z",'
            ' "correlation_id": 3}',
            "'correlation_id'",
        ),
    ],
)
def test_malformed_input_is_rejected_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(InvalidEventError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Event.from_json(text)


def test_invalid_event_error_is_a_value_error() -> None:
    assert issubclass(InvalidEventError, ValueError)


def test_unserialisable_data_is_a_clear_error() -> None:
    event = Event("a", {"when": object()})
    with pytest.raises(InvalidEventError, match="not JSON-serialisable"):
        event.to_json()
    with pytest.raises(InvalidEventError, match="not JSON-serialisable"):
        dumps({1: "non-string key"})


def test_create_validates_everything() -> None:
    with pytest.raises(ValueError, match="wildcard"):
        Event.create("a.*")
    with pytest.raises(InvalidEventError, match="'data'"):
        Event.create("a", ["x"])  # type: ignore[arg-type]
    with pytest.raises(InvalidEventError, match="'version'"):
        Event.create("a", {}, version=True)
    assert Event.create("a", {"k": 1}, version=3).version == 3


def test_replace_keeps_identity() -> None:
    event = Event("account.deposited", {"amount": 5}, version=1)
    upgraded = event.replace(data={"amount_cents": 500}, version=2)
    assert upgraded.id == event.id and upgraded.timestamp == event.timestamp
    assert upgraded.data == {"amount_cents": 500} and upgraded.version == 2
    assert event.data == {"amount": 5}


def test_loads_rejects_malformed_json() -> None:
    with pytest.raises(InvalidEventError, match="malformed JSON"):
        loads(b"{")
    assert loads(b'{"a": 1}') == {"a": 1}


def test_timestamps_without_zone_are_utc() -> None:
    event = Event("a", timestamp=datetime(2026, 5, 1, 12, 0))
    assert event.timestamp == datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert event.timestamp_iso == "2026-05-01T12:00:00.000000Z"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    data=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    version=st.integers(1, 1000),
    corr=st.none() | st.text(min_size=1, max_size=12),
)
def test_round_trip_property(data: dict, version: int, corr: str | None) -> None:
    event = Event.create("prop.test", data, version=version, correlation_id=corr)
    assert Event.from_json(event.to_json()) == event


def test_hash_and_equality() -> None:
    event = Event("a", {"x": 1})
    assert event == Event.from_json(event.to_json())
    assert event != Event("a", {"x": 1})  # another id
    assert len({event, Event.from_json(event.to_json())}) == 1
    assert event.__eq__("not an event") is NotImplemented
    assert "a" in repr(event) and event.id in repr(event)


wire_field = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 3),
    st.sampled_from(["", "x1", "a.b", "a..b", "a.*", "2026-01-01T00:00:00Z", "nope"]),
    st.just({}),
    st.just({"k": 1}),
    st.just([1]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "event", "data", "timestamp", "version", "correlation_id", "x"]),
        wire_field,
    )
)
def test_the_fast_and_the_thorough_validation_agree(obj: dict) -> None:
    """from_dict's fast path accepts exactly what the thorough path accepts."""

    def outcome(fn):  # type: ignore[no-untyped-def]
        try:
            return fn(obj).to_dict()
        except InvalidEventError:
            return "invalid"

    assert outcome(Event.from_dict) == outcome(Event._from_dict_checked)
