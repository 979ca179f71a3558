"""The webhook receiver under load: POST /webhook/order, durability on, against a bare route.

Each durability mode gets its own server process (waitress, loopback, a free port) running the
real app — signatures verified, events fsync'd, workers handling them — plus a bare route on
the same server that reads the body and returns 200: the ceiling of the HTTP stack itself.
A standard-library load generator (threads, one keep-alive ``http.client`` connection each, a
fixed number of requests and a time cap) measures requests/s and p50/p99 latency. Routes and
modes are interleaved; each repeat runs the bare route and the webhook back to back on the
same server, and the ratio reported is the median of those pairs (the machine is shared and
noisy: a pair sees the same noise). Between runs the server finishes its background work, so
one run does not slow the next.

Modes: ``group`` (the default: one fsync covers every request that arrived meanwhile),
``each`` (an fsync per request, serialised: the naive way) and ``none`` (written, not
fsync'd: survives the process dying, not a power cut).

    python -m benchmarks.bench_webhook            # full run, about a minute
    python -m benchmarks.bench_webhook --quick    # smoke run
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.events import dumps, loads
from common.waiting import wait_until
from level_3_advanced.webhook.standard_webhooks import new_secret, signed_headers

MODES = ("group", "each", "none")
MODE_LABEL = {
    "group": "group commit (one fsync per batch)",
    "each": "an fsync per request",
    "none": "no fsync (write only)",
}
Request = tuple[bytes, dict[str, str]]


@dataclass
class Run:
    requests: int
    seconds: float
    latencies: list[float]
    statuses: Counter[int]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def load(port: int, path: str, requests: list[Request], connections: int, limit: float) -> Run:
    """Send ``requests`` over ``connections`` keep-alive connections, stopping at ``limit`` s."""
    counter = itertools.count()
    start = threading.Barrier(connections + 1)
    latencies: list[list[float]] = [[] for _ in range(connections)]
    statuses: list[Counter[int]] = [Counter() for _ in range(connections)]
    deadline = [0.0]

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        mine, seen = latencies[k], statuses[k]
        clock = time.perf_counter
        try:
            start.wait()
            while True:
                i = next(counter)
                if i >= len(requests) or clock() > deadline[0]:
                    return
                body, headers = requests[i]
                t0 = clock()
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                response.read()
                mine.append(clock() - t0)
                seen[response.status] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + limit
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    merged = [x for part in latencies for x in part]
    total: Counter[int] = Counter()
    for part in statuses:
        total.update(part)
    return Run(len(merged), seconds, merged, total)


class BenchServer:
    """This module in ``--serve`` mode: the real app plus ``/bare``, on waitress."""

    def __init__(self, work: Path, mode: str, secret: str, threads: int, workers: int = 2) -> None:
        self.mode = mode
        self.port_file = work / f"port-{mode}"
        env = {**os.environ, "EDA_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_webhook",
                "--serve",
                "--sync",
                mode,
                "--secret",
                secret,
                "--threads",
                str(threads),
                "--workers",
                str(workers),
                "--data-dir",
                str(work / f"data-{mode}"),
                "--port-file",
                str(self.port_file),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: self.port_file.exists() or self.proc.poll() is not None,
            30.0,
            message=f"the {mode} server to listen",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"the {mode} server exited with {self.proc.returncode}")
        self.port = int(self.port_file.read_text())

    def get(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            return loads(conn.getresponse().read())
        finally:
            conn.close()

    def wait_idle(self) -> None:
        wait_until(
            lambda: self.get("/health")["unhandled"] == 0,
            120.0,
            message=f"the {self.mode} server to handle its backlog",
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def fsync_cost(directory: Path, n: int = 200) -> float:
    """Milliseconds per append+fsync of a 200-byte line in ``directory``."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, b"x" * 199 + b"\n")
            os.fsync(fd)
        return (time.perf_counter() - t0) / n * 1000
    finally:
        os.close(fd)
        path.unlink()


def webhook_requests(secret: str, tag: str, n: int) -> list[Request]:
    """``n`` distinct signed deliveries (signed up front: the client's cost stays out)."""
    out = []
    for i in range(n):
        body = dumps({"order_id": i + 1, "status": "created" if i % 2 else "paid"})
        headers = signed_headers(secret, f"msg_{tag}_{i}", body).as_dict()
        headers["Content-Type"] = "application/json"
        out.append((body, headers))
    return out


def serve_main(args: argparse.Namespace) -> int:
    """``--serve``: the app with its bare route, until SIGTERM."""
    from flask import Response, request

    from common.logger import configure_logging
    from level_3_advanced.webhook.webhook_server import create_app, run_server

    configure_logging()
    app = create_app(
        {
            "WEBHOOK_DATA_DIR": str(args.data_dir),
            "WEBHOOK_SECRET": args.secret,
            "WEBHOOK_SYNC": args.sync,
            "WEBHOOK_WORKERS": args.workers,
        }
    )

    @app.post("/bare")
    def bare() -> Response:
        request.get_data()
        return Response(b'{"ok":true}', 200, mimetype="application/json")

    return run_server(app, host="127.0.0.1", port=0, threads=args.threads, port_file=args.port_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--requests", type=int, help="requests per run (default 2500; quick 400)")
    parser.add_argument("--repeats", type=int, help="paired runs per mode (default 5; quick 1)")
    parser.add_argument("--connections", type=int, default=32, help="client connections")
    parser.add_argument("--threads", type=int, default=16, help="waitress request threads")
    parser.add_argument("--workers", type=int, default=2, help="the webhook bus's workers")
    parser.add_argument("--limit", type=float, default=15.0, help="time cap per run, seconds")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated sync modes")
    parser.add_argument("--work-dir", type=Path, help="where the servers keep their records")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sync", default="group", help=argparse.SUPPRESS)
    parser.add_argument("--secret", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_main(args)

    n = args.requests or (400 if args.quick else 2500)
    repeats = args.repeats or (1 if args.quick else 5)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or not set(modes) <= set(MODES):
        parser.error(f"--modes must be taken from {','.join(MODES)}")
    if not 1 <= args.connections <= 256 or not 1 <= n <= 1_000_000 or not 1 <= repeats <= 50:
        parser.error("--connections must be 1..256, --requests 1..1000000, --repeats 1..50")

    work = Path(tempfile.mkdtemp(prefix="bench-webhook-", dir=args.work_dir))
    secret = new_secret()
    servers: dict[str, BenchServer] = {}
    best: dict[tuple[str, str], Run] = {}
    ratios: dict[str, list[float]] = {mode: [] for mode in modes}
    commits: dict[str, Any] = {}
    try:
        fsync_ms = fsync_cost(work)
        for mode in modes:
            servers[mode] = BenchServer(work, mode, secret, args.threads, args.workers)
            warm = webhook_requests(secret, f"warm{mode}", 200)
            load(servers[mode].port, "/webhook/order", warm, 4, 10.0)
            load(servers[mode].port, "/bare", warm, 4, 10.0)
            servers[mode].wait_idle()
        for repeat in range(repeats):
            for mode in modes:
                server = servers[mode]
                routes = [("bare", "/bare"), ("webhook", "/webhook/order")]
                if repeat % 2:
                    routes.reverse()  # neither route always runs first
                pair: dict[str, Run] = {}
                for route, path in routes:
                    requests = webhook_requests(secret, f"{route[0]}{mode}{repeat}", n)
                    run = load(server.port, path, requests, args.connections, args.limit)
                    bad = {s: c for s, c in run.statuses.items() if s not in (200, 202)}
                    if bad:
                        print(f"{mode} {route}: unexpected answers {bad}", file=sys.stderr)
                        return 1
                    pair[route] = run
                    if (mode, route) not in best or run.rps > best[(mode, route)].rps:
                        best[(mode, route)] = run
                    server.wait_idle()  # the workers' backlog does not slow the next run
                ratios[mode].append(pair["webhook"].rps / pair["bare"].rps)
            print(f"repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
        for mode in modes:
            commits[mode] = servers[mode].get("/metrics").get("group_commit", {})
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"waitress ({args.threads} threads) on loopback, {args.connections} keep-alive "
        f"connections, {n} requests per run, {repeats} paired run(s) per mode; signatures "
        f"verified; {args.workers} bus workers handle every event; one append+fsync here "
        f"costs {fsync_ms:.2f} ms\n"
    )
    print(
        "| server's durability | bare route req/s | POST /webhook/order req/s "
        "| webhook p50 / p99 ms | webhook / bare |"
    )
    print("|---|---:|---:|---:|---:|")
    for mode in modes:
        run, bare = best[(mode, "webhook")], best[(mode, "bare")]
        label = MODE_LABEL[mode]
        per_commit = commits[mode].get("events_per_commit")
        if mode == "group" and per_commit:
            label += f", {per_commit} events per fsync"
        print(
            f"| {label} | {bare.rps:,.0f} | {run.rps:,.0f} "
            f"| {run.percentile(0.5):.1f} / {run.percentile(0.99):.1f} "
            f"| {statistics.median(ratios[mode]):.2f}x |"
        )
    print(
        "\nreq/s: the best run of each route. webhook / bare: the median, over the repeats, of "
        "the webhook run divided by the bare-route run next to it on the same server process "
        "(the bare route reads the body and answers 200: the ceiling of the HTTP stack). "
        "Target: group commit >= 0.5x."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
