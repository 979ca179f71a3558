"""One contract, two brokers: the simulated broker and a real RabbitMQ behave the same.

``BrokerContract`` holds the tests; ``TestSimulatedBroker`` and ``TestRabbitMQ`` say how to
reach a broker and how to cut a worker's connection from the broker's side (the simulation's
``kill_connections``; ``rabbitmqctl close_connection`` on the real one, which is what a
worker whose process died or whose broker restarted sees: ``320 CONNECTION_FORCED``).
Every test uses its own exchange and queue names and deletes them afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.events import Event, dumps
from common.retry import Backoff
from common.waiting import wait_until
from level_3_advanced.rabbitmq_simulation.broker import Target, connect
from level_3_advanced.rabbitmq_simulation.channel import BasicProperties, Channel
from level_3_advanced.rabbitmq_simulation.consumer_analytics import (
    AnalyticsHandler,
    analytics_worker,
)
from level_3_advanced.rabbitmq_simulation.consumer_email import EmailHandler, email_worker
from level_3_advanced.rabbitmq_simulation.errors import (
    ChannelError,
    NackError,
    PublishFailed,
    UnroutableError,
)
from level_3_advanced.rabbitmq_simulation.producer import UserRegistrationService
from level_3_advanced.rabbitmq_simulation.simulated_rabbitmq import SimulatedBroker
from level_3_advanced.rabbitmq_simulation.topology import (
    ROUTING_KEY,
    dead_letter_queue,
    declare_worker_queue,
    delete_topology,
)
from level_3_advanced.rabbitmq_simulation.worker import REASON_HEADER, Worker

FAST = Backoff(base=0.05, factor=2.0, cap=0.5)
DEADLINE = 20.0


class Names:
    """Unique broker object names for one test, and the cleanup of everything declared."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.exchange = f"{prefix}.events"
        self.email = f"{prefix}.email"
        self.analytics = f"{prefix}.analytics"
        self.extra_queues: list[str] = []
        self.extra_exchanges: list[str] = []

    def queue(self, suffix: str) -> str:
        name = f"{self.prefix}.{suffix}"
        self.extra_queues.append(name)
        return name

    def exchange_(self, suffix: str) -> str:
        name = f"{self.prefix}.{suffix}"
        self.extra_exchanges.append(name)
        return name

    def cleanup(self, target: Target) -> None:
        with connect(target, name="test-cleanup") as channel:
            delete_topology(channel, self.exchange, [self.email, self.analytics])
            for queue in self.extra_queues:
                channel.queue_delete(queue)
            for exchange in self.extra_exchanges:
                channel.exchange_delete(exchange)


def drain(channel: Channel, queue: str) -> list[tuple[Any, Any, bytes]]:
    """Every ready message of a queue (acked), oldest first."""
    out = []
    while True:
        method, properties, body = channel.basic_get(queue)
        if method is None:
            return out
        channel.basic_ack(method.delivery_tag)
        out.append((method, properties, body))


class BrokerContract:
    """The tests; subclasses provide the ``target`` fixture and :meth:`sever`."""

    @pytest.fixture
    def target(self) -> Target:
        raise NotImplementedError

    def sever(self, target: Target, connection_name: str) -> None:
        """Close a client's connection from the broker's side."""
        raise NotImplementedError

    @pytest.fixture
    def names(self, target: Target, unique_name: str) -> Iterator[Names]:
        names = Names(unique_name)
        yield names
        names.cleanup(target)

    @pytest.fixture
    def run(self) -> Iterator[Callable[[Worker], Worker]]:
        """Start workers in threads; stop, join and close them after the test."""
        started: list[tuple[Worker, threading.Thread]] = []

        def start(worker: Worker) -> Worker:
            started.append((worker, worker.start()))
            return worker

        yield start
        for worker, _ in started:
            worker.stop()
        for worker, thread in started:
            thread.join(DEADLINE)
            worker.close()
            assert not thread.is_alive(), f"{worker.name} did not stop"

    # -- routing ----------------------------------------------------------------------------
    def test_fanout_direct_and_topic_exchanges_route_like_amqp(
        self, target: Target, names: Names
    ) -> None:
        fanout, direct, topic = (names.exchange_(t) for t in ("fanout", "direct", "topic"))
        q1, q2, q3 = (names.queue(f"q{i}") for i in (1, 2, 3))
        with connect(target) as ch:
            ch.confirm_delivery()
            ch.exchange_declare(fanout, "fanout")
            ch.exchange_declare(direct, "direct")
            ch.exchange_declare(topic, "topic")
            for q in (q1, q2, q3):
                ch.queue_declare(q)
            ch.queue_bind(q1, fanout)
            ch.queue_bind(q2, fanout)
            ch.queue_bind(q1, direct, "a")
            ch.queue_bind(q2, direct, "b")
            ch.queue_bind(q1, topic, "user.*")
            ch.queue_bind(q2, topic, "*.created")
            ch.queue_bind(q3, topic, "order.#")
            ch.queue_bind(q3, topic, "#.created")  # two bindings match: still one copy
            for exchange, key in (
                (fanout, "ignored"),
                (direct, "a"),
                (direct, "b"),
                (topic, "user.registered"),
                (topic, "order.created"),
                (topic, "order"),  # '#' matches zero words
            ):
                ch.basic_publish(exchange, key, f"{exchange[-6:]}:{key}".encode(), mandatory=True)
            for exchange, key in ((direct, "c"), (topic, "user.profile.updated")):
                with pytest.raises(UnroutableError):
                    ch.basic_publish(exchange, key, b"lost?", mandatory=True)
            got = {q: [body.decode() for _, _, body in drain(ch, q)] for q in (q1, q2, q3)}
        assert got[q1] == ["fanout:ignored", "direct:a", ".topic:user.registered"]
        assert got[q2] == ["fanout:ignored", "direct:b", ".topic:order.created"]
        assert got[q3] == [".topic:order.created", ".topic:order"]

    def test_both_workers_receive_every_event(
        self, target: Target, names: Names, run: Callable[[Worker], Worker]
    ) -> None:
        email = run(email_worker(target, name=names.email, exchange=names.exchange, backoff=FAST))
        analytics = run(
            analytics_worker(target, name=names.analytics, exchange=names.exchange, backoff=FAST)
        )
        for worker in (email, analytics):
            assert worker.ready.wait(DEADLINE)
        with UserRegistrationService.connect(target, exchange=names.exchange) as service:
            regs = [service.register(f"u{i}@d{i % 3}.test", f"U {i}") for i in range(30)]
        assert service.confirmed == 30
        wait_until(
            lambda: all(w.has_handled(r.event.id) for w in (email, analytics) for r in regs),
            DEADLINE,
            message="both workers to handle all 30",
        )
        assert isinstance(email.handler, EmailHandler)
        assert email.handler.sent == 30
        assert isinstance(analytics.handler, AnalyticsHandler)
        assert analytics.handler.by_domain == {"d0.test": 10, "d1.test": 10, "d2.test": 10}
        for worker in (email, analytics):
            assert (worker.stats.duplicates, worker.stats.dead_lettered) == (0, 0)

    # -- acks and redelivery ----------------------------------------------------------------
    def test_prefetch_bounds_unacked_and_unacked_messages_come_back_redelivered(
        self, target: Target, names: Names
    ) -> None:
        queue = names.queue("acks")
        with connect(target) as ch:
            ch.confirm_delivery()
            ch.queue_declare(queue, durable=True)
            for i in range(3):
                ch.basic_publish("", queue, f"m{i}".encode(), BasicProperties(delivery_mode=2))
        got: list[tuple[int, bool, bytes]] = []
        consumer = connect(target)
        try:
            consumer.basic_qos(prefetch_count=2)
            consumer.basic_consume(
                queue, lambda ch, m, p, b: got.append((m.delivery_tag, m.redelivered, b))
            )

            def pump(n: int) -> Callable[[], bool]:
                def ready() -> bool:
                    consumer.process_data_events(time_limit=0.05)
                    return len(got) >= n

                return ready

            wait_until(pump(2), DEADLINE, message="two deliveries")
            consumer.process_data_events(time_limit=0.3)
            assert [b for _, _, b in got] == [b"m0", b"m1"]  # prefetch 2: the third waits
            consumer.basic_ack(got[0][0])
            wait_until(pump(3), DEADLINE, message="the third after one ack")
            assert [b for _, r, b in got] == [b"m0", b"m1", b"m2"]
            assert not any(r for _, r, _ in got)
        finally:
            consumer.close()  # m1 and m2 were never acked
        with connect(target) as ch:
            back = drain(ch, queue)
        assert [(m.redelivered, b) for m, _, b in back] == [(True, b"m1"), (True, b"m2")]

    def test_a_worker_cut_while_handling_reconnects_and_handles_each_event_once(
        self, target: Target, names: Names, run: Callable[[Worker], Worker]
    ) -> None:
        calls: Counter[str] = Counter()
        entered, gate = threading.Event(), threading.Event()

        def handler(event: Event) -> dict[str, Any]:
            calls[event.id] += 1
            if len(calls) == 1:  # the first event: hold it until the connection is cut
                entered.set()
                gate.wait(DEADLINE)
            return {"ok": True}

        with UserRegistrationService.connect(target, exchange=names.exchange) as service:
            with connect(target) as ch:
                declare_worker_queue(ch, names.email, exchange=names.exchange)
            regs = [service.register(f"u{i}@example.com", f"U {i}") for i in range(10)]
        worker = run(
            Worker(
                names.email,
                handler,
                target=target,
                exchange=names.exchange,
                prefetch=5,
                backoff=FAST,
            )
        )
        assert entered.wait(DEADLINE)
        self.sever(target, worker.name)
        gate.set()  # the handler finishes; its ack cannot reach the broker any more
        wait_until(
            lambda: all(worker.has_handled(r.event.id) for r in regs),
            DEADLINE,
            message="all 10 handled after the reconnect",
        )
        assert worker.stats.reconnects >= 1
        assert worker.stats.redelivered >= 1
        assert worker.stats.duplicates >= 1  # the held event came back and was skipped
        assert set(calls) == {r.event.id for r in regs}
        assert set(calls.values()) == {1}  # nothing handled twice

    def test_an_event_handled_before_a_crash_is_acked_not_handled_again(
        self, target: Target, names: Names, run: Callable[[Worker], Worker], tmp_path: Path
    ) -> None:
        journal = tmp_path / "email.jsonl"
        done_before = Event.create("user.registered", {"email": "old@example.com", "name": "O"})
        journal.write_bytes(dumps({"id": done_before.id, "result": {}}) + b"\n")
        fresh = Event.create("user.registered", {"email": "new@example.com", "name": "N"})
        calls: list[str] = []

        def handler(event: Event) -> None:
            calls.append(event.id)

        with connect(target) as ch:
            ch.confirm_delivery()
            declare_worker_queue(ch, names.email, exchange=names.exchange)
            for event in (done_before, fresh, fresh):  # a redelivery and a republish
                ch.basic_publish(names.exchange, ROUTING_KEY, event.to_json_bytes(), mandatory=True)
        worker = run(
            Worker(
                names.email,
                handler,
                target=target,
                exchange=names.exchange,
                journal=journal,
                backoff=FAST,
            )
        )
        wait_until(lambda: worker.stats.duplicates == 2, DEADLINE, message="two duplicates")
        assert calls == [fresh.id]
        assert [line["id"] for line in worker.processor.journal.records()] == [  # type: ignore[union-attr]
            done_before.id,
            fresh.id,
        ]
        worker.stop()
        wait_until(lambda: not worker.ready.is_set(), DEADLINE, message="the worker to stop")
        with connect(target) as ch:
            assert ch.queue_declare(names.email, passive=True).method.message_count == 0

    # -- poison messages --------------------------------------------------------------------
    def test_poison_messages_go_to_the_dead_letter_queue_with_the_reason(
        self, target: Target, names: Names, run: Callable[[Worker], Worker]
    ) -> None:
        no_email = Event.create("user.registered", {"name": "nobody"})
        with connect(target) as ch:
            ch.confirm_delivery()
            declare_worker_queue(ch, names.email, exchange=names.exchange)
            ch.basic_publish(
                names.exchange, ROUTING_KEY, b"{not json", BasicProperties(message_id="bad-1")
            )
            ch.basic_publish(
                names.exchange,
                ROUTING_KEY,
                no_email.to_json_bytes(),
                BasicProperties(message_id=no_email.id),
            )
        worker = run(
            email_worker(target, name=names.email, exchange=names.exchange, max_attempts=2)
        )
        with UserRegistrationService.connect(target, exchange=names.exchange) as service:
            good = [service.register(f"u{i}@example.com", f"U {i}") for i in range(3)]
        wait_until(
            lambda: worker.stats.handled == 3 and worker.stats.dead_lettered == 2,
            DEADLINE,
            message=lambda: f"3 handled and 2 dead-lettered, got {worker.stats}",
        )
        assert all(worker.has_handled(r.event.id) for r in good)
        assert worker.stats.retried == 1  # the failing handler got a second attempt
        with connect(target) as ch:
            dead = {
                p.message_id: p.headers for _, p, _ in drain(ch, dead_letter_queue(names.email))
            }
        assert set(dead) == {"bad-1", no_email.id}
        assert dead["bad-1"][REASON_HEADER].startswith("invalid event: malformed JSON")
        assert dead["bad-1"]["x-attempts"] == 1
        assert dead[no_email.id][REASON_HEADER].startswith("handler failed 2 time(s): ValueError")
        assert dead[no_email.id]["x-original-routing-key"] == ROUTING_KEY

    # -- publishing -------------------------------------------------------------------------
    def test_pipelined_publishes_are_all_confirmed(self, target: Target, names: Names) -> None:
        queue = names.queue("confirms")
        with connect(target) as ch:
            ch.queue_declare(queue, durable=True)
            confirmations = [
                ch.publish("", queue, b"%d" % i, BasicProperties(delivery_mode=2))
                for i in range(300)
            ]
            assert ch.flush(DEADLINE)
            assert all(c.confirmed for c in confirmations)
            assert len({c.message_id for c in confirmations}) == 300  # ids were assigned
            assert ch.queue_declare(queue, passive=True).method.message_count == 300

    def test_an_unroutable_or_nacked_publish_is_an_error_never_silence(
        self, target: Target, names: Names
    ) -> None:
        full = names.queue("full")
        with connect(target) as ch:
            ch.exchange_declare(names.exchange, "topic", durable=True)  # no queue bound
            returned = ch.publish(names.exchange, ROUTING_KEY, b"{}")
            with pytest.raises(UnroutableError):
                returned.result(DEADLINE)
            ch.queue_declare(full, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
            assert ch.publish("", full, b"first").exception(DEADLINE) is None
            with pytest.raises(NackError):
                ch.publish("", full, b"second").result(DEADLINE)
            missing = ch.publish(f"{names.prefix}.missing", ROUTING_KEY, b"{}")
            with pytest.raises(ChannelError) as info:
                missing.result(DEADLINE)
            assert info.value.reply_code == 404
            assert ch.queue_declare(full, passive=True).method.message_count == 1  # still open
        service = UserRegistrationService.connect(target, exchange=names.exchange)
        service.register("ann@example.com", "Ann")
        with pytest.raises(PublishFailed) as failed:
            service.close()
        assert isinstance(failed.value.failures[0][1], UnroutableError)

    def test_bad_registrations_are_refused_before_anything_is_published(
        self, target: Target, names: Names
    ) -> None:
        with connect(target) as ch:
            declare_worker_queue(ch, names.email, exchange=names.exchange)
        with UserRegistrationService.connect(target, exchange=names.exchange) as service:
            for email, name in (("not-an-email", "X"), ("a@b", "X"), ("a@b.c", "  ")):
                with pytest.raises(ValueError):
                    service.register(email, name)
            with pytest.raises(TypeError):
                service.register(None, "X")  # type: ignore[arg-type]
        assert service.published == 0
        with connect(target) as ch:
            assert ch.queue_declare(names.email, passive=True).method.message_count == 0

    # -- fatal errors -----------------------------------------------------------------------
    def test_a_channel_error_is_fatal_for_a_worker_not_retried(
        self, target: Target, names: Names
    ) -> None:
        with connect(target) as ch:  # the queue exists with other arguments: 406
            ch.queue_declare(names.email, durable=True)
        worker = Worker(names.email, lambda e: None, target=target, exchange=names.exchange)
        try:
            with pytest.raises(ChannelError) as info:
                worker.run()
        finally:
            worker.close()
        assert info.value.reply_code == 406
        assert worker.stats.reconnects == 0


class TestSimulatedBroker(BrokerContract):
    @pytest.fixture
    def target(self) -> SimulatedBroker:
        return SimulatedBroker("contract")

    def sever(self, target: Target, connection_name: str) -> None:
        assert isinstance(target, SimulatedBroker)
        assert target.kill_connections(connection_name) == 1


@pytest.mark.rabbitmq
class TestRabbitMQ(BrokerContract):
    @pytest.fixture
    def target(self, rabbitmq_url: str) -> str:
        return rabbitmq_url

    def sever(self, target: Target, connection_name: str) -> None:
        if shutil.which("rabbitmqctl") is None:
            pytest.skip("rabbitmqctl is not installed: no way to cut a connection broker-side")
        listing = subprocess.run(
            [
                "rabbitmqctl",
                "-q",
                "list_connections",
                "--no-table-headers",
                "pid",
                "client_properties",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        pids = [
            line.split("\t", 1)[0]
            for line in listing.splitlines()
            if f'{{"connection_name","{connection_name}"}}' in line
        ]
        assert len(pids) == 1, f"connections named {connection_name}: {pids}"
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pids[0], "test: cut"],
            capture_output=True,
            timeout=30,
            check=True,
        )
