"""The C accelerator (common/_speedups.c) against the Python reference it replaces.

Both implementations must give the same results: the Python versions are kept in the modules
(``events._py_new_event``, ``events._py_from_dict``, ``base_eventbus._py_emit`` ...), and the
whole core suite also runs once with ``EDA_PURE_PYTHON=1`` (the last test), so the fallback a
machine without a C compiler gets is tested too.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import base_eventbus, events
from common.base_eventbus import BaseEventBus
from common.events import Event, InvalidEventError
from common.speedups import ENABLED
from level_1_basic.eventbus import EventBus

ROOT = Path(__file__).resolve().parents[1]
needs_c = pytest.mark.skipif(not ENABLED, reason="common._speedups is not built (pure Python)")


def test_the_extension_is_built_where_ci_runs() -> None:
    """CI builds it (gcc is there): a silent fallback to pure Python would hide a slowdown."""
    if not ENABLED and os.environ.get("EDA_PURE_PYTHON", "") in ("", "0"):
        if os.environ.get("EDA_REQUIRE_SERVICES") == "1":
            pytest.fail("common._speedups did not build: `pip install -e .` shows why")
        pytest.skip("common._speedups is not built here (no C compiler?)")


# -- Event construction -------------------------------------------------------------------------
@needs_c
def test_new_event_matches_the_python_version() -> None:
    data = {"k": 1}
    before = time.time_ns()
    c_event = events.new_event("a.b", data)
    py_event = events._py_new_event("a.b", data)
    after = time.time_ns()
    assert type(c_event) is Event
    for event in (c_event, py_event):
        assert event.name == "a.b" and event.data is data
        assert event.version == 1 and event.correlation_id is None
        assert before <= event.timestamp_ns <= after
    # one counter for both: ids never collide, whichever path made the event
    assert int(py_event.id.rsplit("-", 1)[1], 16) == int(c_event.id.rsplit("-", 1)[1], 16) + 1
    assert events.new_event("a.b", None).data == {}
    assert Event.from_json(c_event.to_json()) == c_event


@needs_c
def test_from_dict_of_the_canonical_form_is_the_same_event() -> None:
    event = Event("a.b", {"x": [1, 2]}, version=3, correlation_id="c-1")
    wire = event.to_dict()
    c_made = Event.from_dict(wire)
    py_made = events._py_from_dict(Event, wire)
    assert c_made == py_made == event
    assert c_made.timestamp_iso == wire["timestamp"]
    assert c_made.timestamp_ns == event.timestamp_ns // 1000 * 1000


timestamps = st.one_of(
    st.builds(
        "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}.{:06d}Z".format,
        st.integers(0, 10_000),
        st.integers(0, 13),
        st.integers(0, 32),
        st.integers(0, 25),
        st.integers(0, 60),
        st.integers(0, 61),
        st.integers(0, 999_999),
    ),
    st.sampled_from(
        [
            "2024-02-29T00:00:00.000000Z",  # leap year
            "2023-02-29T00:00:00.000000Z",  # not one
            "1900-02-29T00:00:00.000000Z",  # centuries are not...
            "2000-02-29T00:00:00.000000Z",  # ...unless divisible by 400
            "2026-11-22T03:58:00Z",
            "2026-11-22T03:58:00.123+01:00",
            "2026-11-22 03:58:00.000000Z",
            "2026-11-22T03:58:00.00000xZ",
            "2026-11-22T03:58:00.000000\u00e9",
            "",
        ]
    ),
)
field = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 3),
    st.just(2**70),
    st.sampled_from(["", "x1", "a.b", "a..b", "a.*", "nope", "never.seen.before.name"]),
    st.just({}),
    st.just({"k": 1}),
    st.just([1]),
    timestamps,
)


@needs_c
@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "event", "data", "timestamp", "version", "correlation_id", "x"]),
        field,
    ),
    timestamps,
)
def test_from_dict_agrees_with_the_python_paths(obj: dict, stamp: str) -> None:
    """C, Python fast path and Python thorough path: the same event, or the same error."""
    if "timestamp" in obj and obj["timestamp"] is None:
        obj["timestamp"] = stamp

    def outcome(fn):  # type: ignore[no-untyped-def]
        try:
            return fn(obj).to_dict()
        except InvalidEventError as exc:
            return f"invalid: {exc}"

    c_result = outcome(Event.from_dict)
    assert c_result == outcome(lambda o: events._py_from_dict(Event, o))
    assert c_result == outcome(Event._from_dict_checked)


@needs_c
def test_from_dict_keeps_subclasses() -> None:
    class Special(Event):
        __slots__ = ()

    made = Special.from_dict(Event("a.b").to_dict())
    assert type(made) is Special


@needs_c
def test_no_reference_is_leaked() -> None:
    """Every object the C code touches is back to its reference count after 10,000 uses."""
    bus = EventBus(history_limit=0)
    data, name = {"k": 1}, "leak.check"

    def listener(event: Event) -> None:
        if event.data.get("fail"):
            raise ValueError("boom")

    sub = bus.subscribe(name, listener)
    once_name = "leak.once"
    failing = {"fail": True}
    wire = Event(name, data).to_dict()

    def round_trip() -> None:
        bus.emit(name, data)
        bus.emit(name, failing)  # the failure path: the error is recorded, then dropped
        bus.subscribe(once_name, listener, once=True)
        bus.emit(once_name)  # the once path: claimed through _remove
        Event.from_dict(wire)

    watched = (bus, data, failing, name, sub, listener, wire, wire["timestamp"], wire["id"])
    logging.disable(logging.ERROR)  # captured log records would keep the failed events alive
    try:
        round_trip()  # the first round fills the caches
        bus.errors.clear()
        gc.collect()
        before = [sys.getrefcount(obj) for obj in watched]
        for _ in range(10_000):
            round_trip()
        bus.errors.clear()
        gc.collect()
        after = [sys.getrefcount(obj) for obj in watched]
    finally:
        logging.disable(logging.NOTSET)
    assert after == before


# -- the bus ----------------------------------------------------------------------------------
@needs_c
def test_the_bus_methods_are_the_c_ones_with_python_references() -> None:
    assert BaseEventBus.emit is not base_eventbus._py_emit
    assert BaseEventBus._deliver is not base_eventbus._py_deliver
    assert BaseEventBus._dispatch is not base_eventbus._py_dispatch


def test_a_listener_failure_keeps_its_traceback_and_the_others_run() -> None:
    bus = EventBus()
    calls: list[str] = []

    def bad(event: Event) -> None:
        raise KeyError("missing")

    bus.subscribe("a.b", bad)
    bus.subscribe("a.b", lambda e: calls.append("second"))
    bus.emit("a.b")
    assert calls == ["second"]
    (error,) = bus.errors
    assert isinstance(error.exception, KeyError)
    assert error.exception.__traceback__ is not None


def test_keyboard_interrupt_propagates_and_the_thread_can_emit_again() -> None:
    bus = EventBus()
    calls: list[str] = []

    def interrupt(event: Event) -> None:
        calls.append(event.name)
        if event.name == "a.stop":
            bus.emit("a.queued")  # queued behind this event, then dropped by the interrupt
            raise KeyboardInterrupt

    bus.subscribe("a.*", interrupt)
    with pytest.raises(KeyboardInterrupt):
        bus.emit("a.stop")
    assert bus._busy == {}  # the finally ran: the thread is not left "dispatching"
    bus.emit("a.after")
    assert calls == ["a.stop", "a.after"]


def test_the_emit_fast_path_respects_a_variant_deliver_hook() -> None:
    seen: list[tuple[str, int]] = []

    class Recording(EventBus):
        def _deliver(self, event: Event, subscriptions: tuple) -> None:
            seen.append((event.name, len(subscriptions)))
            super()._deliver(event, subscriptions)

    bus = Recording()
    got: list[str] = []
    bus.subscribe("a.b", lambda e: got.append(e.name))
    bus.emit("a.b")
    bus.emit("a.b", {"x": 1})  # the second emit of a name takes the fast path
    assert seen == [("a.b", 1), ("a.b", 1)] and got == ["a.b", "a.b"]


def test_unusual_emits_take_the_python_path_with_its_checks() -> None:
    bus = EventBus()
    bus.subscribe("a.b", lambda e: None)
    event = bus.emit("a.b", {"x": 1}, version=2, correlation_id="c")
    assert (event.version, event.correlation_id) == (2, "c")
    with pytest.raises(InvalidEventError, match="'data' must be a JSON object"):
        bus.emit("a.b", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty segment"):
        bus.emit("a..b")
    with pytest.raises(TypeError):
        bus.emit("a.b", {}, unknown=1)
    assert [e.version for e in bus.event_log] == [2]


# -- the fallback ---------------------------------------------------------------------------
def test_the_core_suite_passes_in_pure_python() -> None:
    """What a machine without a C compiler runs: the reference Python versions."""
    env = {**os.environ, "EDA_PURE_PYTHON": "1"}
    check = (
        "import common.speedups as s, common.base_eventbus as b; "
        "assert not s.ENABLED and b.BaseEventBus.emit is b._py_emit"
    )
    subprocess.run([sys.executable, "-c", check], env=env, check=True, cwd=ROOT, timeout=60)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/test_events.py", "tests/test_eventbus.py", "tests/test_speedups.py",
         "tests/test_bus_contract.py", "tests/test_replay.py", "-k", "not pure_python"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
