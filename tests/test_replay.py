"""ReplayableEventBus: write-ahead log, replay, filters, bad lines, upcasting, threads.

Crash tests with real processes are in test_replay_crash.py; snapshots, the account and the
demos in test_replay_snapshots.py.
"""

from __future__ import annotations

import logging
import threading
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from common.events import Event, dumps, loads
from common.storage import AppendLog
from level_3_advanced.event_replay.eventbus_replay import (
    LogPosition,
    ReplayableEventBus,
    UpcastError,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def lines_of(path: Path) -> list[dict]:
    return [loads(line) for line in path.read_bytes().splitlines()]


def write_events(path: Path, events: list[Event]) -> None:
    with AppendLog(path) as log:
        log.append_many(e.to_json_bytes() for e in events)


def timed(name: str, seconds: int, **data: object) -> Event:
    return Event.create(name, dict(data), timestamp=T0 + timedelta(seconds=seconds))


class Recorder:
    """A listener that keeps what it got, and whether the bus said it was replaying."""

    def __init__(self, bus: ReplayableEventBus | None = None) -> None:
        self.bus = bus
        self.events: list[Event] = []
        self.flags: list[bool] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if self.bus is not None:
            self.flags.append(self.bus.replaying)


# -- write-ahead ------------------------------------------------------------------------------
@pytest.mark.parametrize("durability", ["flush", "fsync"])
def test_event_is_on_disk_before_its_listeners_run(tmp_path: Path, durability: str) -> None:
    log_path = tmp_path / "events.log"
    on_disk_when_called: list[list[dict]] = []
    with ReplayableEventBus(log_path, durability=durability) as bus:
        bus.subscribe("order.*", lambda event: on_disk_when_called.append(lines_of(log_path)))
        first = bus.emit("order.created", {"order_id": 1})
        second = bus.emit("order.paid", {"order_id": 1})
    assert [[r["id"] for r in seen] for seen in on_disk_when_called] == [
        [first.id],
        [first.id, second.id],
    ]


def test_unserialisable_event_is_refused_before_log_and_listeners(tmp_path: Path) -> None:
    log_path = tmp_path / "events.log"
    calls = Recorder()
    with ReplayableEventBus(log_path) as bus:
        bus.subscribe("#", calls)
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            bus.emit("order.created", {"when": object()})
        bus.emit("order.created", {"order_id": 2})
    assert [r["data"] for r in lines_of(log_path)] == [{"order_id": 2}]
    assert len(calls.events) == 1


def test_bad_durability_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="durability must be one of"):
        ReplayableEventBus(tmp_path / "x.log", durability="sometimes")


# -- replay basics ----------------------------------------------------------------------------
def test_replay_redispatches_in_order_without_logging_again(tmp_path: Path) -> None:
    log_path = tmp_path / "events.log"
    with ReplayableEventBus(log_path) as bus:
        emitted = [bus.emit("user.registered", {"n": i}) for i in range(5)]
        before = log_path.read_bytes()
        got = Recorder(bus)
        bus.subscribe("user.*", got)
        assert bus.replay_from_file() == 5
        assert log_path.read_bytes() == before  # nothing appended
        assert list(bus.event_log) == emitted  # the in-memory history is untouched too
        assert got.events == emitted  # same ids, data, timestamps, versions, same order
        assert got.flags == [True] * 5
        assert bus.replaying is False
        stats = bus.replay_stats
        assert stats is not None
        assert (stats.replayed, stats.lines, stats.corrupt, stats.torn_tail_bytes) == (5, 5, 0, 0)
        assert stats.position == LogPosition(len(before), 5)


def test_replay_of_another_file_and_to_a_bus_without_log(tmp_path: Path) -> None:
    source = tmp_path / "history.log"
    write_events(source, [timed("order.created", i, order_id=i) for i in range(3)])
    got = Recorder()
    with ReplayableEventBus(None) as reader:
        reader.subscribe("#", got)
        assert reader.replay_from_file(source) == 3
        with pytest.raises(ValueError, match="no log of its own"):
            reader.replay_from_file()
    assert [e.data["order_id"] for e in got.events] == [0, 1, 2]


def test_replay_sees_events_still_buffered_with_durability_none(tmp_path: Path) -> None:
    log_path = tmp_path / "events.log"
    with ReplayableEventBus(log_path, durability="none") as bus:
        for i in range(3):
            bus.emit("tick.happened", {"i": i})
        got = Recorder()
        bus.subscribe("#", got)
        assert bus.replay_from_file() == 3


def test_missing_file_is_a_clear_file_not_found_error(tmp_path: Path) -> None:
    with ReplayableEventBus(None) as bus, pytest.raises(FileNotFoundError, match=r"nope\.log"):
        bus.replay_from_file(tmp_path / "nope.log")
    assert bus.replay_stats is None


def test_replaying_flag_is_per_thread(tmp_path: Path) -> None:
    """A live emit from another thread during a replay must not look like history."""
    log_path = tmp_path / "events.log"
    live_flags: list[bool] = []
    with ReplayableEventBus(log_path) as bus:
        bus.emit("history.event", {})

        def on_history(event: Event) -> None:
            worker = threading.Thread(target=bus.emit, args=("live.event", {}))
            worker.start()
            worker.join(timeout=30)

        bus.subscribe("history.event", on_history)
        bus.subscribe("live.event", lambda event: live_flags.append(bus.replaying))
        bus.replay_from_file()
    assert live_flags == [False]


def test_listener_failures_during_replay_are_isolated_and_counted(tmp_path: Path) -> None:
    log_path = tmp_path / "events.log"
    with ReplayableEventBus(log_path) as bus:
        for i in range(4):
            bus.emit("job.done", {"i": i})

        def flaky(event: Event) -> None:
            if event.data["i"] % 2:
                raise RuntimeError("boom")

        got = Recorder()
        bus.subscribe("job.done", flaky)
        bus.subscribe("job.done", got)
        assert bus.replay_from_file() == 4
        assert len(got.events) == 4
        assert bus.replay_stats is not None and bus.replay_stats.listener_failures == 2
        assert [str(e.exception) for e in bus.errors] == ["boom", "boom"]


def test_events_emitted_by_listeners_during_replay_are_new_and_replay_ends(
    tmp_path: Path,
) -> None:
    log_path = tmp_path / "events.log"
    with ReplayableEventBus(log_path) as bus:
        bus.emit("order.created", {"id": 1})
        bus.emit("order.created", {"id": 2})
        # A (careless) listener that emits whether replaying or not: its events are new, so
        # they are logged; the replay still reads only the log as it stood when it began.
        bus.subscribe("order.created", lambda e: bus.emit("order.audited", {"id": e.data["id"]}))
        assert bus.replay_from_file() == 2
        names = [r["event"] for r in lines_of(log_path)]
        assert names == ["order.created"] * 2 + ["order.audited"] * 2
        assert bus.replay_from_file() == 4
        assert len(lines_of(log_path)) == 6  # hence listeners with side effects check replaying


def test_events_emitted_during_replay_run_right_after_their_cause(tmp_path: Path) -> None:
    """Breadth first, as for a live emit: a follow-up event is dispatched after the listeners
    of the replayed event that caused it, before the next replayed line."""
    log_path = tmp_path / "events.log"
    with ReplayableEventBus(log_path) as bus:
        for i in range(3):
            bus.emit("order.created", {"id": i})
        seen: list[str] = []

        def on_created(event: Event) -> None:
            seen.append(f"created {event.data['id']}")
            bus.emit("order.audited", {"id": event.data["id"]})
            seen.append(f"after emit {event.data['id']}")  # the follow-up has not run yet

        bus.subscribe("order.created", on_created)
        bus.subscribe("order.audited", lambda e: seen.append(f"audited {e.data['id']}"))
        assert bus.replay_from_file() == 3
    assert seen == [
        part for i in range(3) for part in (f"created {i}", f"after emit {i}", f"audited {i}")
    ]
    assert bus._busy == {}  # the replaying thread is no longer marked as dispatching


def test_a_variant_delivery_hook_receives_every_replayed_event(tmp_path: Path) -> None:
    log_path = tmp_path / "events.log"
    delivered: list[int] = []

    class Recording(ReplayableEventBus):
        def _deliver(self, event: Event, subscriptions: tuple) -> None:
            delivered.append(event.data["n"])
            super()._deliver(event, subscriptions)

    with Recording(log_path) as bus:
        for n in range(5):
            bus.emit("tick.done", {"n": n})
        delivered.clear()
        got: list[int] = []
        bus.subscribe("tick.*", lambda e: got.append(e.data["n"]))
        assert bus.replay_from_file() == 5
    assert delivered == got == list(range(5))


def test_an_interrupted_replay_leaves_the_bus_usable(tmp_path: Path) -> None:
    log_path = tmp_path / "events.log"
    with ReplayableEventBus(log_path) as bus:
        bus.emit("a.b", {})
        bus.emit("a.b", {})

        def interrupt(event: Event) -> None:
            if bus.replaying:
                raise KeyboardInterrupt

        bus.subscribe("a.b", interrupt)
        with pytest.raises(KeyboardInterrupt):
            bus.replay_from_file()
        assert bus._busy == {} and not bus.replaying
        assert bus.replay_stats is not None and bus.replay_stats.replayed == 1
        bus.emit("a.b", {})  # dispatches normally again
        assert len(bus.event_log) == 3


def test_replay_inside_a_listener_is_refused(tmp_path: Path) -> None:
    log_path = tmp_path / "events.log"
    with ReplayableEventBus(log_path) as bus:
        bus.subscribe("go.now", lambda event: bus.replay_from_file())
        bus.emit("go.now", {})
    assert len(bus.errors) == 1
    assert isinstance(bus.errors[0].exception, RuntimeError)
    assert "inside a listener" in str(bus.errors[0].exception)


# -- filters ----------------------------------------------------------------------------------
@pytest.fixture
def mixed_log(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.log"
    write_events(
        path,
        [
            timed("user.registered", 0, n=0),
            timed("order.created", 10, n=1),
            timed("user.profile.updated", 20, n=2),
            timed("order.paid", 30, n=3),
            timed("user.deleted", 40, n=4),
        ],
    )
    return path


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, [0, 1, 2, 3, 4]),
        ({"pattern": "order.*"}, [1, 3]),
        ({"pattern": "user.*"}, [0, 4]),
        ({"pattern": "user.#"}, [0, 2, 4]),
        ({"since": T0 + timedelta(seconds=10)}, [1, 2, 3, 4]),  # since is inclusive
        ({"until": T0 + timedelta(seconds=30)}, [0, 1, 2, 3]),  # until is inclusive
        ({"since": T0 + timedelta(seconds=5), "until": T0 + timedelta(seconds=35)}, [1, 2, 3]),
        ({"pattern": "user.#", "since": T0 + timedelta(seconds=1)}, [2, 4]),
        ({"until": T0 - timedelta(days=1)}, []),
    ],
)
def test_pattern_since_until_filters(mixed_log: Path, kwargs: dict, expected: list[int]) -> None:
    got = Recorder()
    with ReplayableEventBus(None) as bus:
        bus.subscribe("#", got)
        assert bus.replay_from_file(mixed_log, **kwargs) == len(expected)
        assert [e.data["n"] for e in got.events] == expected
        assert bus.replay_stats is not None and bus.replay_stats.filtered == 5 - len(expected)


def test_filters_reject_bad_arguments(mixed_log: Path) -> None:
    with ReplayableEventBus(None) as bus:
        with pytest.raises(ValueError, match="timezone-aware"):
            bus.replay_from_file(mixed_log, since=datetime(2024, 5, 1))
        with pytest.raises(TypeError, match="must be a datetime"):
            bus.replay_from_file(mixed_log, until="2024-05-01T00:00:00Z")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="later than until"):
            bus.replay_from_file(mixed_log, since=T0, until=T0 - timedelta(seconds=1))
        with pytest.raises(ValueError, match="wildcard inside segment"):
            bus.replay_from_file(mixed_log, pattern="us*r")


def test_replay_from_a_position(mixed_log: Path) -> None:
    got = Recorder()
    with ReplayableEventBus(None) as bus:
        bus.subscribe("#", got)
        lines = mixed_log.read_bytes().splitlines(keepends=True)
        position = LogPosition(len(lines[0]) + len(lines[1]), 2)
        assert bus.replay_from_file(mixed_log, start=position) == 3
        assert [e.data["n"] for e in got.events] == [2, 3, 4]
        assert bus.replay_stats is not None
        assert bus.replay_stats.position == LogPosition(mixed_log.stat().st_size, 5)
        with pytest.raises(ValueError, match="not at a line boundary"):
            bus.replay_from_file(mixed_log, start=LogPosition(5, 0))
        with pytest.raises(ValueError, match="past the end"):
            bus.replay_from_file(mixed_log, start=LogPosition(10**9, 3))


# -- bad lines --------------------------------------------------------------------------------
def test_corrupt_middle_lines_are_skipped_counted_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.log"
    good = [timed("order.created", i, n=i).to_json_bytes() for i in range(4)]
    bad_event = timed("order.created", 9, n=9).to_dict()
    raw = [
        good[0],
        b"{this is not json",  # line 2
        good[1],
        dumps({"id": "x", "event": "order.created"}),  # line 4: fields missing
        dumps([1, 2, 3]),  # line 5: not an object
        dumps({**bad_event, "event": "bad name"}),  # line 6: invalid name
        dumps({**bad_event, "timestamp": "yesterday"}),  # line 7: bad timestamp
        dumps({**bad_event, "version": 0}),  # line 8: bad version
        good[2],
        b"",  # line 10: an empty line
        good[3],
    ]
    path.write_bytes(b"\n".join(raw) + b"\n")
    got = Recorder()
    with caplog.at_level(logging.WARNING), ReplayableEventBus(None) as bus:
        bus.subscribe("#", got)
        assert bus.replay_from_file(path) == 4
        stats = bus.replay_stats
    assert [e.data["n"] for e in got.events] == [0, 1, 2, 3]
    assert stats is not None
    assert stats.corrupt == 7
    assert stats.corrupt_lines == [2, 4, 5, 6, 7, 8, 10]
    assert stats.lines == 11
    messages = [r.getMessage() for r in caplog.records]
    for number in stats.corrupt_lines:
        assert any(f"line {number}: skipped a corrupt event" in m for m in messages)
    assert any("missing field(s): data, timestamp" in m for m in messages)


def test_many_corrupt_lines_are_summarised_not_flooded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.log"
    path.write_bytes(b"garbage\n" * 250 + timed("a.b", 0).to_json_bytes() + b"\n")
    with caplog.at_level(logging.WARNING), ReplayableEventBus(None) as bus:
        assert bus.replay_from_file(path) == 1
    assert bus.replay_stats is not None and bus.replay_stats.corrupt == 250
    assert len(bus.replay_stats.corrupt_lines) == 100
    assert len(caplog.records) == 101
    assert "250 corrupt lines skipped in all" in caplog.records[-1].getMessage()


def test_torn_tail_written_in_process_is_reported_by_a_reader(tmp_path: Path) -> None:
    """The crash version (a real kill -9) is in test_replay_crash.py."""
    path = tmp_path / "events.log"
    complete = b"".join(timed("a.b", i, n=i).to_json_bytes() + b"\n" for i in range(3))
    path.write_bytes(complete + b'{"id":"half')
    with ReplayableEventBus(None) as bus:
        assert bus.replay_from_file(path) == 3
    assert bus.replay_stats is not None
    assert bus.replay_stats.torn_tail_bytes == len(b'{"id":"half')
    assert bus.replay_stats.position == LogPosition(len(complete), 3)


# -- concurrency ------------------------------------------------------------------------------
def test_threads_appending_never_interleave(tmp_path: Path) -> None:
    log_path = tmp_path / "events.log"
    threads, per_thread = 4, 2_500
    with ReplayableEventBus(log_path, history_limit=0) as bus:

        def work(tag: int) -> None:
            for seq in range(per_thread):
                bus.emit("load.tick", {"thread": tag, "seq": seq, "pad": "x" * 300})

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        got: dict[int, list[int]] = {t: [] for t in range(threads)}
        bus.subscribe("load.tick", lambda e: got[e.data["thread"]].append(e.data["seq"]))
        assert bus.replay_from_file() == threads * per_thread
        assert bus.replay_stats is not None and bus.replay_stats.corrupt == 0
    assert all(seqs == list(range(per_thread)) for seqs in got.values())


# -- upcasting --------------------------------------------------------------------------------
def test_upcasters_upgrade_old_events_step_by_step(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    write_events(
        path,
        [
            Event.create("user.registered", {"mail": "a@x.io"}, version=1, id="e1"),
            Event.create("user.registered", {"email": "b@x.io"}, version=2, id="e2"),
            Event.create("user.registered", {"email": "c@x.io", "name": "C"}, version=3),
            Event.create("user.registered", {"email": "d@x.io", "vip": 1}, version=4),
            Event.create("user.deleted", {"id": 5}, version=1),
        ],
    )
    got = Recorder()
    with ReplayableEventBus(None) as bus:
        bus.register_upcaster("user.registered", 1, lambda d: {"email": d.pop("mail"), **d})
        bus.register_upcaster("user.registered", 2, lambda d: {**d, "name": d["email"][0]})
        assert bus.schema_version("user.registered") == 3
        assert bus.schema_version("user.deleted") == 1
        bus.subscribe("#", got)
        assert bus.replay_from_file(path) == 5
        assert bus.replay_stats is not None and bus.replay_stats.upcasted == 2
    registered = [(e.version, e.data) for e in got.events if e.name == "user.registered"]
    assert registered == [
        (3, {"email": "a@x.io", "name": "a"}),
        (3, {"email": "b@x.io", "name": "b"}),
        (3, {"email": "c@x.io", "name": "C"}),
        (4, {"email": "d@x.io", "vip": 1}),  # newer than the code: passed on as it is
    ]
    assert got.events[0].id == "e1"  # id and timestamp survive the upgrade
    assert lines_of(path)[0]["data"] == {"mail": "a@x.io"}  # the log is never rewritten


def test_missing_or_failing_upcaster_stops_the_replay_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    write_events(
        path,
        [
            Event.create("user.registered", {"email": "a@x.io"}, version=2),
            Event.create("user.registered", {"mail": "b@x.io"}, version=1),
        ],
    )
    got = Recorder()
    with ReplayableEventBus(None) as bus:
        bus.subscribe("#", got)
        bus.register_upcaster("user.registered", 2, lambda d: {**d, "name": d["email"][0]})
        with pytest.raises(UpcastError, match=r"line 2: .*no upcaster registered from v1"):
            bus.replay_from_file(path)
        assert len(got.events) == 1  # the state is as of the line before
        assert bus.replay_stats is not None
        assert bus.replay_stats.position.line == 1

    with ReplayableEventBus(None) as bus:
        bus.register_upcaster("user.registered", 1, lambda d: {"email": d["email"]})
        with pytest.raises(UpcastError, match=r"line 2: upcaster .*v1->v2 failed.*KeyError"):
            bus.replay_from_file(path)
    with ReplayableEventBus(None) as bus:
        bus.register_upcaster("user.registered", 1, lambda d: None)  # type: ignore[arg-type, return-value]
        with pytest.raises(UpcastError, match="returned NoneType, not a dict"):
            bus.replay_from_file(path)


def test_register_upcaster_validates(tmp_path: Path) -> None:
    with ReplayableEventBus(None) as bus:
        bus.register_upcaster("a.b", 1, dict)
        with pytest.raises(ValueError, match="already registered"):
            bus.register_upcaster("a.b", 1, dict)
        with pytest.raises(ValueError, match="positive integer"):
            bus.register_upcaster("a.b", 0, dict)
        with pytest.raises(TypeError, match="callable"):
            bus.register_upcaster("a.b", 2, "nope")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="wildcard"):
            bus.register_upcaster("a.*", 1, dict)


# -- streaming --------------------------------------------------------------------------------
def test_replay_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    pad = "p" * 2_000
    with AppendLog(path, durability="none") as log:
        log.append_many(timed("big.event", i, n=i, pad=pad).to_json_bytes() for i in range(6_000))
    size = path.stat().st_size
    count = 0

    def listener(event: Event) -> None:
        nonlocal count
        count += 1

    with ReplayableEventBus(None) as bus:
        bus.subscribe("#", listener)
        tracemalloc.start()
        try:
            bus.replay_from_file(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert count == 6_000
    assert size > 12_000_000
    assert peak < 3_000_000, f"peak {peak} bytes for a {size}-byte log"
