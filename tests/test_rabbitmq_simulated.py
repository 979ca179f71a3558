"""The simulated broker's AMQP model in detail, the demo, and the pieces that need no server.

The behaviour both brokers share is in ``test_rabbitmq_contract.py``; here is what only the
simulation can show cheaply (a broker restart with durability rules, many threads at once)
and the demo's ``main()`` as a learner runs it.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.waiting import wait_until
from level_3_advanced.rabbitmq_simulation import main as demo
from level_3_advanced.rabbitmq_simulation import producer
from level_3_advanced.rabbitmq_simulation.broker import (
    choose_broker,
    connect,
    default_broker,
    redact,
)
from level_3_advanced.rabbitmq_simulation.channel import BasicProperties, Confirmation
from level_3_advanced.rabbitmq_simulation.errors import (
    BrokerError,
    ChannelError,
    ConnectionLost,
    PublishError,
    PublishTimeout,
    UnroutableError,
)
from level_3_advanced.rabbitmq_simulation.pika_channel import AsyncPublisher, connection_parameters
from level_3_advanced.rabbitmq_simulation.simulated_rabbitmq import SimulatedBroker
from level_3_advanced.rabbitmq_simulation.worker import EventProcessor

PERSISTENT = BasicProperties(delivery_mode=2)


@pytest.fixture
def broker() -> SimulatedBroker:
    return SimulatedBroker("test")


@pytest.fixture
def eda_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog on the ``eda`` logger itself (a demo's configure_logging stops propagation)."""
    logger = logging.getLogger("eda")
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # once, not twice through the root logger (restored after)
    yield caplog
    logger.removeHandler(caplog.handler)


def bodies(channel: Any, queue: str) -> list[bytes]:
    out = []
    while True:
        method, _, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append(body)


# -- the demo ------------------------------------------------------------------------------
def test_demo_main_runs_both_workers_on_the_simulation(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--broker", "simulated", "--count", "12"]) == 0
    out = capsys.readouterr().out
    assert "12 confirmed by the broker" in out
    assert "email_worker:      handled 12, duplicates skipped 0" in out
    assert "analytics_worker:  handled 12, duplicates skipped 0" in out
    assert "dead-lettered 1 -> email_worker.dlq" in out
    assert "invalid event: malformed JSON" in out
    assert "analytics: 12 registrations by domain: example.com=4, example.org=4, mail.test=4" in out


def test_demo_survives_a_worker_cut_mid_way_without_loss_or_double_handling(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = demo.run(
        "simulated",
        SimulatedBroker("demo"),
        count=300,
        timeout=30,
        kill_worker=True,
        write=print,
    )
    email = result["workers"]["email_worker"]
    assert email.handled == 300  # each event handled exactly once ...
    assert email.reconnects == 1
    assert email.redelivered > 0  # ... although some were delivered twice
    assert "cut the email worker's connection" in capsys.readouterr().out


def test_auto_falls_back_to_the_simulation_and_says_so_in_one_line(
    eda_logs: pytest.LogCaptureFixture,
) -> None:
    kind, target = choose_broker("auto", "amqp://guest:secret@127.0.0.1:1/", timeout=1.0)
    assert kind == "simulated"
    assert isinstance(target, SimulatedBroker)
    lines = [r.getMessage() for r in eda_logs.records if r.getMessage().startswith("broker:")]
    assert len(lines) == 1
    assert "in-process simulation" in lines[0]
    assert "guest:***@127.0.0.1:1" in lines[0]
    assert "secret" not in lines[0]
    with pytest.raises(BrokerError, match="does not answer"):
        choose_broker("rabbitmq", "amqp://guest:guest@127.0.0.1:1/", timeout=1.0)
    with pytest.raises(ValueError):
        choose_broker("kafka", "amqp://x/")


def test_demo_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--count", "0"], ["--broker", "nope"], ["--prefetch", "0"]):
        with pytest.raises(SystemExit) as info:
            demo.main(["--broker", "simulated", *argv] if argv[0] != "--broker" else argv)
        assert info.value.code == 2
    capsys.readouterr()


@pytest.mark.slow
def test_demo_runs_as_a_script_and_as_a_module(python: str, tmp_path: Path) -> None:
    root = Path(demo.__file__).resolve().parents[2]
    for command in (
        [python, str(Path(demo.__file__)), "--broker", "simulated", "--count", "3"],
        [python, "-m", "level_3_advanced.rabbitmq_simulation.main", "--broker", "simulated"],
    ):
        proc = subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stderr
        assert "reached both workers" in proc.stdout
    assert root.is_dir()


def test_the_producer_cli_fails_loudly_when_nothing_is_bound(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # memory:// is this process's default simulated broker: no worker, so no queue.
    assert producer.main(["--url", "memory://", "--count", "3", "--exchange", "cli.test"]) == 1
    err = capsys.readouterr().err
    assert "stopped after 1 of 3 registrations (0 confirmed, 1 failed)" in err
    assert "matched no queue" in err


# -- connect() -------------------------------------------------------------------------------
def test_connect_accepts_a_broker_none_or_a_url_and_refuses_anything_else(
    broker: SimulatedBroker,
) -> None:
    with connect(broker) as a, connect(None) as b, connect("memory://") as c:
        assert a.kind == b.kind == c.kind == "simulated"
        b.queue_declare("shared-by-default")
        assert c.queue_declare("shared-by-default", passive=True).method.queue
    assert "shared-by-default" in default_broker().queues()
    assert "shared-by-default" not in broker.queues()
    with connect(None) as channel:
        channel.queue_delete("shared-by-default")
    for bad in ("http://localhost/", "localhost:5672", 42):
        with pytest.raises(ValueError):
            connect(bad)  # type: ignore[arg-type]
    assert redact("amqp://guest:s3cret@h:5672/v") == "amqp://guest:***@h:5672/v"
    assert redact("amqp://h/") == "amqp://h/"


# -- the AMQP model --------------------------------------------------------------------------
def test_a_restart_keeps_durable_queues_and_persistent_messages_only(
    broker: SimulatedBroker,
) -> None:
    with broker.channel() as ch:
        ch.exchange_declare("durable-ex", "topic", durable=True)
        ch.exchange_declare("transient-ex", "topic")
        ch.queue_declare("durable-q", durable=True)
        ch.queue_declare("transient-q")
        ch.queue_bind("durable-q", "durable-ex", "a.#")
        ch.basic_publish("durable-ex", "a.b", b"persistent", PERSISTENT)
        ch.basic_publish("durable-ex", "a.b", b"transient")
        ch.basic_publish("", "transient-q", b"gone", PERSISTENT)
    consumer = broker.channel("consumer")
    consumer.basic_consume("durable-q", lambda *a: None)
    consumer.process_data_events()  # both delivered, none acked
    broker.restart()
    with pytest.raises(ConnectionLost, match="320"):
        consumer.process_data_events()
    assert broker.queues() == ["durable-q"]
    assert broker.exchanges() == ["amq.direct", "amq.fanout", "amq.topic", "durable-ex"]
    assert broker.bindings("durable-ex") == [("durable-q", "a.#")]
    with broker.channel() as ch:
        assert bodies(ch, "durable-q") == [b"persistent"]
    assert broker.stats["lost_in_restart"] == 1


def test_redeclaring_with_other_settings_is_a_406_that_closes_the_channel(
    broker: SimulatedBroker,
) -> None:
    ch = broker.channel()
    ch.queue_declare("q", durable=True)
    with pytest.raises(ChannelError) as info:
        ch.queue_declare("q", durable=False)
    assert info.value.reply_code == 406
    assert "inequivalent arg 'durable'" in info.value.reply_text
    assert not ch.is_open
    with pytest.raises(ChannelError):
        ch.queue_declare("other")  # a closed channel stays closed
    ch.close()
    with broker.channel() as setup:
        setup.exchange_declare("x", "topic")
    for args, code in (
        (("x", "fanout"), 406),  # a different type
        (("amq.mine", "topic"), 403),  # a reserved name
        (("h", "headers"), 503),  # not simulated
    ):
        with broker.channel() as ch2, pytest.raises(ChannelError) as info:
            ch2.exchange_declare(*args)
        assert info.value.reply_code == code
    with broker.channel() as ch3, pytest.raises(ChannelError) as info:
        ch3.basic_publish("no-such-exchange", "k", b"x")
    assert info.value.reply_code == 404


def test_acking_an_unknown_delivery_tag_is_a_406(broker: SimulatedBroker) -> None:
    with broker.channel() as ch:
        ch.queue_declare("q")
        ch.basic_publish("", "q", b"x")
        method, _, _ = ch.basic_get("q")
        ch.basic_ack(method.delivery_tag)
        with pytest.raises(ChannelError, match="unknown delivery tag"):
            ch.basic_ack(method.delivery_tag)  # the classic double ack


def test_rejected_and_overflowing_messages_are_dead_lettered_with_x_death(
    broker: SimulatedBroker,
) -> None:
    with broker.channel() as ch:
        ch.exchange_declare("dlx", "fanout")
        ch.queue_declare("dead")
        ch.queue_bind("dead", "dlx")
        ch.queue_declare("work", arguments={"x-dead-letter-exchange": "dlx", "x-max-length": 2})
        for i in range(3):  # the third pushes the oldest out: dead-lettered as "maxlen"
            ch.basic_publish("", "work", b"m%d" % i)
        method, _, _ = ch.basic_get("work")
        ch.basic_nack(method.delivery_tag, requeue=False)  # m1: "rejected"
        dead = []
        while True:
            method, props, body = ch.basic_get("dead", auto_ack=True)
            if method is None:
                break
            dead.append((body, props.headers["x-death"][0], props.headers["x-first-death-reason"]))
    assert [(b, d["reason"], d["queue"], d["count"], first) for b, d, first in dead] == [
        (b"m0", "maxlen", "work", 1, "maxlen"),
        (b"m1", "rejected", "work", 1, "rejected"),
    ]


def test_unroutable_messages_are_reported_or_caught_by_an_alternate_exchange(
    broker: SimulatedBroker, eda_logs: pytest.LogCaptureFixture
) -> None:
    returned: list[tuple[int, bytes]] = []
    ch = broker.channel()
    ch.add_on_return_callback(lambda c, m, p, b: returned.append((m.reply_code, b)))
    ch.exchange_declare("lost-and-found", "fanout")
    ch.queue_declare("unrouted")
    ch.queue_bind("unrouted", "lost-and-found")
    ch.exchange_declare("plain", "direct")
    ch.exchange_declare("guarded", "direct", arguments={"alternate-exchange": "lost-and-found"})
    ch.basic_publish("plain", "nobody", b"mandatory", mandatory=True)
    ch.basic_publish("plain", "nobody", b"dropped")
    ch.basic_publish("guarded", "nobody", b"caught", mandatory=True)
    ch.process_data_events()  # return callbacks run in the consuming thread, as in pika
    assert returned == [(312, b"mandatory")]
    assert bodies(ch, "unrouted") == [b"caught"]
    assert broker.stats["unroutable"] == 2
    assert any("unroutable message dropped" in r.getMessage() for r in eda_logs.records)
    ch.confirm_delivery()
    with pytest.raises(UnroutableError):
        ch.basic_publish("plain", "nobody", b"confirmed", mandatory=True)
    ch.close()


def test_cancel_requeues_what_the_callback_has_not_seen_and_close_requeues_the_rest(
    broker: SimulatedBroker,
) -> None:
    with broker.channel() as ch:
        ch.queue_declare("q")
        for i in range(4):
            ch.basic_publish("", "q", b"m%d" % i)
    seen: list[bytes] = []
    consumer = broker.channel()
    consumer.basic_qos(prefetch_count=3)
    tag = consumer.basic_consume("q", lambda c, m, p, b: seen.append(b))
    assert broker.queue_info("q") == {"ready": 1, "unacked": 3, "consumers": 1}
    consumer.basic_cancel(tag)  # not one delivery reached the callback yet
    assert consumer.consumer_tags == []
    assert broker.queue_info("q") == {"ready": 4, "unacked": 0, "consumers": 0}
    consumer.basic_consume("q", lambda c, m, p, b: seen.append(b))
    consumer.process_data_events()
    assert seen == [b"m0", b"m1", b"m2"]
    consumer.close()  # unacked: back to the queue, flagged redelivered
    with broker.channel() as ch:
        redelivered = []
        while True:
            method, _, body = ch.basic_get("q", auto_ack=True)
            if method is None:
                break
            redelivered.append((body, method.redelivered))
    assert redelivered == [(b"m0", True), (b"m1", True), (b"m2", True), (b"m3", False)]


def test_exclusive_and_auto_delete_queues_go_away_with_their_owner(
    broker: SimulatedBroker,
) -> None:
    owner = broker.channel()
    name = owner.queue_declare("", exclusive=True).method.queue
    assert name.startswith("amq.gen-")
    with broker.channel() as other, pytest.raises(ChannelError) as info:
        other.queue_declare(name, passive=True)
    assert info.value.reply_code == 405
    owner.queue_declare("temp", auto_delete=True)
    tag = owner.basic_consume("temp", lambda *a: None)
    owner.basic_cancel(tag)
    assert "temp" not in broker.queues()  # its last consumer left
    owner.close()
    assert name not in broker.queues()


def test_bad_arguments_are_clear_errors(broker: SimulatedBroker) -> None:
    with broker.channel() as ch:
        ch.queue_declare("q")
        with pytest.raises(TypeError, match="body must be bytes"):
            ch.basic_publish("", "q", 42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="routing_key"):
            ch.basic_publish("", None, b"x")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="prefetch_count"):
            ch.basic_qos(prefetch_count=-1)
        with pytest.raises(TypeError, match="callable"):
            ch.basic_consume("q", "not a function")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty segment"):
            ch.exchange_declare("t", "topic")
            ch.queue_bind("q", "t", "user..created")
    pending = Confirmation("m-1", threading.Condition())
    with pytest.raises(TimeoutError, match="m-1"):
        pending.result(0.01)


def test_publishers_and_competing_consumers_on_many_threads_lose_nothing(
    broker: SimulatedBroker,
) -> None:
    with broker.channel() as ch:
        ch.exchange_declare("ex", "topic", durable=True)
        ch.queue_declare("work", durable=True)
        ch.queue_bind("work", "ex", "job.#")
    received: list[bytes] = []
    lock = threading.Lock()
    stop = threading.Event()

    def consume(n: int) -> None:
        with broker.channel(f"consumer-{n}") as ch:
            ch.basic_qos(prefetch_count=10)

            def on_message(c: Any, m: Any, p: Any, body: bytes) -> None:
                with lock:
                    received.append(body)
                c.basic_ack(m.delivery_tag)

            ch.basic_consume("work", on_message)
            while not stop.is_set():
                ch.process_data_events(time_limit=0.05)

    def publish(n: int) -> None:
        with broker.channel(f"publisher-{n}") as ch:
            ch.confirm_delivery()
            for i in range(500):
                ch.basic_publish("ex", f"job.{n}", b"%d-%d" % (n, i), mandatory=True)

    consumers = [threading.Thread(target=consume, args=(n,)) for n in range(3)]
    publishers = [threading.Thread(target=publish, args=(n,)) for n in range(4)]
    for t in consumers + publishers:
        t.start()
    for t in publishers:
        t.join(30)
    wait_until(lambda: len(received) >= 2000, 30, message="2000 deliveries")
    stop.set()
    for t in consumers:
        t.join(30)
    assert sorted(received) == sorted(b"%d-%d" % (n, i) for n in range(4) for i in range(500))
    assert broker.queue_info("work") == {"ready": 0, "unacked": 0, "consumers": 0}


def test_a_publisher_that_cannot_reach_its_broker_times_out_each_message_then_closes() -> None:
    params = connection_parameters("amqp://guest:guest@127.0.0.1:1/", timeout=1.0)
    publisher = AsyncPublisher(params, window=2, publish_timeout=0.5, name="unreachable")
    try:
        first = publisher.publish("ex", "k", b"one", BasicProperties(message_id="m-1"))
        second = publisher.publish("ex", "k", b"two")  # an id is assigned: it is mandatory
        assert second.message_id is not None and second.message_id.startswith("pub-")
        with pytest.raises(PublishTimeout, match="m-1"):
            first.result(10)
        with pytest.raises(PublishTimeout):
            second.result(10)
        assert publisher.flush(10)
        assert publisher.outstanding == 0
        assert publisher.reconnects >= 1  # it kept trying, with backoff
    finally:
        publisher.close()
    with pytest.raises(PublishError, match="closed"):
        publisher.publish("ex", "k", b"late")
    with pytest.raises(ValueError):
        AsyncPublisher(params, window=10, buffer=5)


def test_the_journal_survives_a_torn_tail_and_seeds_dedup(tmp_path: Path) -> None:
    from common.events import Event

    journal = tmp_path / "w.jsonl"
    event = Event.create("user.registered", {"email": "a@b.c"})
    processor = EventProcessor("w", lambda e: {"done": e.id}, journal=journal)
    assert processor.process(event.to_json_bytes())[0] == "handled"
    processor.close()
    with journal.open("ab") as fh:
        fh.write(b'{"id": "torn')  # a writer killed mid-line
    again = EventProcessor("w", lambda e: pytest.fail("handled twice"), journal=journal)
    assert again.process(event.to_json_bytes())[0] == "duplicate"
    again.close()
    assert journal.read_bytes().count(b"\n") == 1
