"""Level 3 against a real RabbitMQ: the producer and the workers, each against bare pika.

Every floor is written with bare pika in this file and measured in the same run, interleaved
with our code, best of ``--repeat`` runs; results are ratios to the floor:

* producer, persistent messages to a durable queue: one blocking confirm per message
  (``BlockingChannel``), a window of 1,000 asynchronous confirms (``SelectConnection``, the
  window refilled once per pass of the I/O loop, or in every ack callback: the faster of the
  two in the run is the floor), no confirms; ours: ``UserRegistrationService.register``
  (validation, the Event and its JSON, pipelined confirms that still fail every nacked or
  returned message). Target >= 0.8x.
* workers, draining a pre-filled queue: bare pika with prefetch 1 / prefetch 100 (the floor)
  acking each message / prefetch 100 acking multiple every 50; ours: ``email_worker`` and
  ``analytics_worker`` (parse, dedup by id, handle, ack after handling). Target >= 0.8x.
* end-to-end latency of one message at a time, p50/p99: bare pika publish -> consume, and
  ours (register -> the worker's handler).

Needs RabbitMQ (``RABBITMQ_URL``); queues and exchanges are unique per run and deleted after.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pika

from common.config import Settings
from common.events import Event
from level_3_advanced.rabbitmq_simulation.broker import connect, probe, redact
from level_3_advanced.rabbitmq_simulation.consumer_analytics import AnalyticsHandler
from level_3_advanced.rabbitmq_simulation.consumer_email import EmailHandler
from level_3_advanced.rabbitmq_simulation.pika_channel import connection_parameters
from level_3_advanced.rabbitmq_simulation.producer import (
    UserRegistrationService,
    registration_event,
)
from level_3_advanced.rabbitmq_simulation.topology import (
    ROUTING_KEY,
    declare_worker_queue,
    delete_topology,
)
from level_3_advanced.rabbitmq_simulation.worker import Worker

WINDOW = 1000
PROPS = pika.BasicProperties(content_type="application/json", delivery_mode=2)


def _body(i: int) -> bytes:
    return registration_event(f"user{i}@example.com", f"User {i}").to_json_bytes()


def _props(event_id: str) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/json", delivery_mode=2, message_id=event_id
    )


class Bench:
    """The broker objects of one run: one exchange, one durable queue bound to it."""

    def __init__(self, url: str) -> None:
        self.url = url
        tag = uuid.uuid4().hex[:8]
        self.exchange = f"bench.{tag}"
        self.queue = f"bench.{tag}.q"
        self.params = connection_parameters(url, name="bench")
        with connect(url, name="bench-setup") as channel:
            declare_worker_queue(channel, self.queue, exchange=self.exchange)

    def purge(self) -> None:
        with connect(self.url, name="bench-purge") as channel:
            channel.queue_purge(self.queue)

    def count(self) -> int:
        with connect(self.url, name="bench-count") as channel:
            return channel.queue_declare(self.queue, passive=True).method.message_count

    def close(self) -> None:
        with connect(self.url, name="bench-cleanup") as channel:
            delete_topology(channel, self.exchange, [self.queue])

    def fill(self, n: int) -> None:
        """Put ``n`` distinct events in the queue (windowed confirms), then check the count."""
        self.purge()
        bodies = [(e.id, e.to_json_bytes()) for e in (_event(i) for i in range(n))]
        _window_publish(self.params, self.exchange, bodies)
        deadline = time.monotonic() + 30
        while self.count() < n:
            if time.monotonic() > deadline:
                raise RuntimeError("the queue did not fill")


def _event(i: int) -> Event:
    return registration_event(f"user{i}@example.com", f"User {i}")


# -- producer floors (bare pika) --------------------------------------------------------------
def bare_blocking_confirms(bench: Bench, n: int) -> float:
    body = _body(0)
    connection = pika.BlockingConnection(bench.params)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        start = time.perf_counter()
        for _ in range(n):
            channel.basic_publish(bench.exchange, ROUTING_KEY, body, PROPS, mandatory=True)
        return n / (time.perf_counter() - start)
    finally:
        connection.close()


def bare_no_confirms(bench: Bench, n: int) -> float:
    body = _body(0)
    connection = pika.BlockingConnection(bench.params)
    try:
        channel = connection.channel()
        start = time.perf_counter()
        for _ in range(n):
            channel.basic_publish(bench.exchange, ROUTING_KEY, body, PROPS, mandatory=True)
        channel.queue_declare(bench.queue, passive=True)  # one round trip: all were sent
        return n / (time.perf_counter() - start)
    finally:
        connection.close()


def _window_publish(
    params: pika.ConnectionParameters,
    exchange: str,
    bodies: list[tuple[str, bytes]],
    window: int = WINDOW,
    *,
    coalesce: bool = True,
) -> float:
    """Bare pika SelectConnection, ``window`` confirms outstanding; returns msg/s.

    ``coalesce``: refill the window once per pass of the I/O loop, the fastest bare variant
    measured here (the floor); otherwise refill in every ack callback (the obvious way:
    more, smaller socket writes).
    """
    n = len(bodies)
    state: dict[str, Any] = {"sent": 0, "acked": 0, "nacked": 0, "start": 0.0, "end": 0.0}
    state["scheduled"] = False
    outstanding: OrderedDict[int, None] = OrderedDict()
    holder: dict[str, Any] = {}

    def publish_more() -> None:
        state["scheduled"] = False
        channel = holder["channel"]
        while state["sent"] < n and len(outstanding) < window:
            message_id, body = bodies[state["sent"]]
            channel.basic_publish(exchange, ROUTING_KEY, body, _props(message_id), True)
            state["sent"] += 1
            outstanding[state["sent"]] = None

    def on_confirm(frame: Any) -> None:
        method = frame.method
        if method.multiple:
            while outstanding and next(iter(outstanding)) <= method.delivery_tag:
                outstanding.popitem(last=False)
                state["acked"] += 1
        elif outstanding.pop(method.delivery_tag, 0) is None:
            state["acked"] += 1
        if isinstance(method, pika.spec.Basic.Nack):
            state["nacked"] += 1
        if state["acked"] == n:
            state["end"] = time.perf_counter()
            holder["connection"].close()
        elif not coalesce:
            publish_more()
        elif not state["scheduled"]:
            state["scheduled"] = True
            holder["connection"].ioloop.add_callback_threadsafe(publish_more)

    def on_channel(channel: Any) -> None:
        holder["channel"] = channel

        def start(_frame: Any) -> None:
            state["start"] = time.perf_counter()
            publish_more()

        channel.confirm_delivery(on_confirm, callback=start)

    connection = pika.SelectConnection(
        params,
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_open_error_callback=lambda c, e: c.ioloop.stop(),
        on_close_callback=lambda c, r: c.ioloop.stop(),
    )
    holder["connection"] = connection
    connection.ioloop.start()
    connection.ioloop.close()
    if state["acked"] != n or state["nacked"]:
        raise RuntimeError(f"window publisher: {state}")
    return n / (state["end"] - state["start"])


def bare_window_confirms(bench: Bench, n: int) -> float:
    body = _body(0)
    return _window_publish(bench.params, bench.exchange, [(str(i), body) for i in range(n)])


def bare_window_confirms_per_ack(bench: Bench, n: int) -> float:
    body = _body(0)
    bodies = [(str(i), body) for i in range(n)]
    return _window_publish(bench.params, bench.exchange, bodies, coalesce=False)


def ours_producer(bench: Bench, n: int) -> float:
    service = UserRegistrationService.connect(bench.url, exchange=bench.exchange, window=WINDOW)
    try:
        start = time.perf_counter()
        for i in range(n):
            service.register(f"user{i}@example.com", f"User {i}")
        service.flush(60)
        rate = n / (time.perf_counter() - start)
        if service.confirmed != n:
            raise RuntimeError(f"only {service.confirmed} of {n} confirmed")
        return rate
    finally:
        service.close()


# -- worker floors (bare pika) and ours -------------------------------------------------------
def bare_consume(bench: Bench, n: int, prefetch: int, ack_every: int) -> float:
    bench.fill(n)
    connection = pika.BlockingConnection(bench.params)
    times: list[float] = []
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=prefetch)

        def on_message(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
            times.append(time.perf_counter())
            count = len(times)
            if ack_every == 1:
                ch.basic_ack(method.delivery_tag)
            elif count % ack_every == 0 or count == n:
                ch.basic_ack(method.delivery_tag, multiple=True)
            if count == n:
                ch.stop_consuming()

        channel.basic_consume(bench.queue, on_message)
        channel.start_consuming()
    finally:
        connection.close()
    return (n - 1) / (times[-1] - times[0])


def ours_consume(bench: Bench, n: int, handler: Callable[[Event], Any], **options: Any) -> float:
    bench.fill(n)
    times: list[float] = []

    def timed(event: Event) -> Any:
        times.append(time.perf_counter())
        return handler(event)

    worker = Worker(
        "bench-worker",
        timed,
        target=bench.url,
        exchange=bench.exchange,
        queue=bench.queue,
        prefetch=100,
        **options,
    )
    thread = worker.start()
    try:
        deadline = time.monotonic() + 120
        while worker.stats.handled < n:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"worker handled {worker.stats.handled} of {n}")
            time.sleep(0.01)
    finally:
        worker.stop()
        thread.join(10)
        worker.close()
    return (n - 1) / (times[-1] - times[0])


# -- latency ----------------------------------------------------------------------------------
def _percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
    return p50 * 1000, p99 * 1000


def bare_latency(bench: Bench, n: int) -> tuple[float, float]:
    bench.purge()
    received = threading.Event()
    stamp: list[float] = []
    ready = threading.Event()
    stop = threading.Event()

    def consume() -> None:
        connection = pika.BlockingConnection(bench.params)
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=100)

            def on_message(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
                stamp.append(time.perf_counter())
                ch.basic_ack(method.delivery_tag)
                received.set()

            channel.basic_consume(bench.queue, on_message)
            ready.set()
            while not stop.is_set():
                connection.process_data_events(time_limit=0.05)
        finally:
            connection.close()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    ready.wait(10)
    connection = pika.BlockingConnection(bench.params)
    samples = []
    try:
        channel = connection.channel()
        for i in range(n):
            body = _body(i)
            received.clear()
            start = time.perf_counter()
            channel.basic_publish(bench.exchange, ROUTING_KEY, body, PROPS)
            if not received.wait(10):
                raise RuntimeError("bare latency: a message did not arrive")
            samples.append(stamp[-1] - start)
    finally:
        connection.close()
        stop.set()
        thread.join(10)
    return _percentiles(samples)


def ours_latency(bench: Bench, n: int) -> tuple[float, float]:
    bench.purge()
    received = threading.Event()
    stamp: list[float] = []

    def handler(_event: Event) -> None:
        stamp.append(time.perf_counter())
        received.set()

    worker = Worker(
        "bench-latency", handler, target=bench.url, exchange=bench.exchange, queue=bench.queue
    )
    thread = worker.start()
    service = UserRegistrationService.connect(bench.url, exchange=bench.exchange)
    samples = []
    try:
        if not worker.ready.wait(10):
            raise RuntimeError("the worker did not start")
        for i in range(n):
            received.clear()
            start = time.perf_counter()
            service.register(f"user{i}@example.com", f"User {i}")
            if not received.wait(10):
                raise RuntimeError("our latency: a message did not arrive")
            samples.append(stamp[-1] - start)
    finally:
        service.close()
        worker.stop()
        thread.join(10)
        worker.close()
    return _percentiles(samples)


# -- the run ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    settings = Settings.load()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=settings.rabbitmq_url)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--repeat", type=int, help="runs per measurement (best is kept)")
    args = parser.parse_args(argv)
    reason = probe(args.url, timeout=2.0)
    if reason is not None:
        print(f"RabbitMQ at {redact(args.url)} does not answer ({reason}): skipped")
        return 0
    if args.quick:
        n_pub, n_blocking, n_work, n_slow, n_lat, repeat = 2000, 200, 2000, 500, 100, 1
    else:
        n_pub, n_blocking, n_work, n_slow, n_lat, repeat = 20000, 2000, 20000, 4000, 1000, 5
    repeat = args.repeat or repeat

    bench = Bench(args.url)
    best: dict[str, float] = {}
    runs: dict[str, list[float]] = {}
    lat: dict[str, tuple[float, float]] = {}

    def keep(name: str, value: float) -> None:
        best[name] = max(best.get(name, 0.0), value)
        runs.setdefault(name, []).append(value)

    try:
        for _ in range(repeat):
            keep("blocking", bare_blocking_confirms(bench, n_blocking))
            bench.purge()
            keep("window", bare_window_confirms(bench, n_pub))
            bench.purge()
            keep("window_per_ack", bare_window_confirms_per_ack(bench, n_pub))
            bench.purge()
            keep("ours_pub", ours_producer(bench, n_pub))
            bench.purge()
            keep("noconfirm", bare_no_confirms(bench, n_pub))
            bench.purge()
            keep("p1", bare_consume(bench, n_slow, 1, 1))
            keep("p100", bare_consume(bench, n_work, 100, 1))
            keep("email", ours_consume(bench, n_work, EmailHandler()))
            keep("p100m", bare_consume(bench, n_work, 100, 50))
            keep("analytics", ours_consume(bench, n_work, AnalyticsHandler()))
            keep("email_each", ours_consume(bench, n_work, EmailHandler(), ack_every=1))
            for name, fn in (("bare", bare_latency), ("ours", ours_latency)):
                p50, p99 = fn(bench, n_lat)
                old = lat.get(name)
                lat[name] = (p50, p99) if old is None or p50 < old[0] else old
    finally:
        bench.close()

    # The producer's floor: the faster of the two bare windowed publishers in this run.
    window, p100 = max(best["window"], best["window_per_ack"]), best["p100"]
    floor_mark = {True: " (**floor**)", False: ""}

    def row(what: str, value: float, floor: float, target: str = "") -> None:
        print(f"| {what} | {value:,.0f} msg/s | {value / floor:.2f}x | {target} |")

    print(f"RabbitMQ at {redact(args.url)}; best of {repeat}; persistent messages, durable queue")
    print()
    print("| measurement | result | ratio to its floor | target |")
    print("|---|---:|---:|---|")
    row("producer: bare pika, one blocking confirm per message", best["blocking"], window)
    row(
        "producer: bare pika, window of 1,000 async confirms, refilled once per I/O pass"
        + floor_mark[best["window"] >= best["window_per_ack"]],
        best["window"],
        window,
    )
    row(
        "producer: bare pika, window of 1,000 async confirms, refilled in every ack callback"
        + floor_mark[best["window"] < best["window_per_ack"]],
        best["window_per_ack"],
        window,
    )
    row("producer: bare pika, no confirms", best["noconfirm"], window)
    ours_target = "≥ 0.8x: " + ("met" if best["ours_pub"] >= 0.8 * window else "**missed**")
    row("producer: `UserRegistrationService.register`", best["ours_pub"], window, ours_target)
    row("worker: bare pika, prefetch 1, ack each", best["p1"], p100)
    row("worker: bare pika, prefetch 100, ack each (**floor**)", p100, p100)
    row("worker: bare pika, prefetch 100, ack multiple every 50", best["p100m"], p100)
    for name, label in (
        ("email", "worker: `email_worker` (prefetch 100, ack multiple every 50)"),
        ("analytics", "worker: `analytics_worker` (prefetch 100, ack multiple every 50)"),
        ("email_each", "worker: `email_worker` with `ack_every=1`"),
    ):
        met = "met" if best[name] >= 0.8 * p100 else "**missed**"
        row(label, best[name], p100, f"≥ 0.8x: {met}" if name != "email_each" else "")
    (b50, b99), (o50, o99) = lat["bare"], lat["ours"]
    print(
        f"| latency p50 / p99: bare pika publish -> consume | {b50:.2f} / {b99:.2f} ms | 1.00x | |"
    )
    print(
        f"| latency p50 / p99: `register` -> worker handler | {o50:.2f} / {o99:.2f} ms "
        f"| {o50 / b50:.2f}x / {o99 / b99:.2f}x | |"
    )
    floors = [max(a, b) for a, b in zip(runs["window"], runs["window_per_ack"], strict=True)]
    pairs = [o / f for o, f in zip(runs["ours_pub"], floors, strict=True)]
    print()
    print(
        "producer / floor, run by run (each pair back to back): "
        + ", ".join(f"{r:.2f}" for r in pairs)
        + f"; median {statistics.median(pairs):.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
