"""Saga benchmarks: how much a durable, recoverable saga costs, as ratios measured in one run.

1. Order sagas per second through the orchestrator (five steps, all succeeding; the services
   in memory so that the saga log's cost stands out), against the floor of calling the same
   five service operations directly and publishing their events — no orchestrator, no log:
   in memory, with the saga log flushed per record (survives a process crash), with step
   timeouts (a worker thread per call), and the choreography on the same services and bus.
2. The saga log fsync'd per record (survives a power cut) against its own floor: bare
   ``AppendLog`` fsync'd appends of lines of the same size. A ratio near 1.0 means a saga
   costs what its fsyncs cost, and nothing more.
3. Recovery: opening a log with N sagas in flight (each interrupted inside ``confirm_order``)
   and ``recover()``-ing them all, per saga, against running one saga from scratch.

    python -m benchmarks.bench_saga            # full run, about a minute
    python -m benchmarks.bench_saga --quick    # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.storage import AppendLog
from level_1_basic.eventbus import EventBus
from level_4_hard.saga_pattern.choreography import Choreography
from level_4_hard.saga_pattern.clock import SystemClock
from level_4_hard.saga_pattern.saga_orchestrator import build_order_saga, run_order
from level_4_hard.saga_pattern.shop import Shop, build_shop, make_order

PLENTY_STOCK = {"book": 10**12, "pen": 10**12}
PLENTY_MONEY = {"ann": 10**15}


class Crash(BaseException):
    """The process dying inside a step (not an Exception: the saga does not catch it)."""


def new_shop() -> Shop:
    return build_shop(clock=SystemClock(), stock=PLENTY_STOCK, balances=PLENTY_MONEY)


def orders(n: int, tag: str) -> list[dict[str, Any]]:
    return [make_order(f"{tag}{i}") for i in range(n)]


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Cases:
    """Each case runs ``n`` sagas on fresh services, a fresh bus and (if any) a fresh log."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.runs = 0

    def fresh_dir(self) -> Path:
        self.runs += 1
        path = self.work / f"run{self.runs}"
        path.mkdir()
        return path

    def direct(self, n: int) -> Callable[[], None]:
        def run() -> None:
            shop, bus = new_shop(), EventBus()
            for order in orders(n, "d"):
                sid = f"order-{order['order_id']}"
                for outcome in (
                    shop.orders.create(sid, order),
                    shop.inventory.reserve(sid, order),
                    shop.payments.reserve_funds(sid, order),
                    shop.orders.confirm(sid),
                    shop.deliveries.schedule(sid, order),
                ):
                    if outcome.new:
                        bus.publish(outcome.event)

        return run

    def orchestrated(
        self, n: int, durability: str | None, timeout: float | None = None
    ) -> Callable[[], None]:
        def run() -> None:
            shop = new_shop()
            log_dir = self.fresh_dir() if durability else None
            saga = build_order_saga(
                shop, log_dir=log_dir, durability=durability or "flush", timeout=timeout
            )
            with saga:
                for order in orders(n, "o"):
                    if not run_order(saga, order).ok:
                        raise AssertionError("a benchmark saga failed")

        return run

    def choreographed(self, n: int) -> Callable[[], None]:
        def run() -> None:
            shop = new_shop()
            with Choreography(shop, EventBus(), timeout=None) as choreography:
                for order in orders(n, "c"):
                    if not choreography.run(order).ok:
                        raise AssertionError("a benchmark saga failed")

        return run

    def fsync_floor(self, appends: int, line: bytes) -> Callable[[], None]:
        def run() -> None:
            with AppendLog(self.fresh_dir() / "floor.jsonl", durability="fsync") as log:
                for _ in range(appends):
                    log.append(line)

        return run


def records_per_saga(work: Path) -> tuple[int, bytes]:
    """How many records a successful order saga writes, and a typical record's line."""
    folder = work / "probe"
    with build_order_saga(new_shop(), log_dir=folder, durability="flush", timeout=None) as saga:
        run_order(saga, make_order("probe"))
    lines = (folder / "order.jsonl").read_bytes().splitlines()
    typical = sorted(lines, key=len)[len(lines) // 2]
    return len(lines), typical


def prepare_in_flight(folder: Path, n: int) -> Shop:
    """``n`` sagas interrupted inside confirm_order (its effect recorded, not logged done)."""
    shop = new_shop()
    confirm = shop.orders.confirm

    def dying(saga_id: str) -> Any:
        confirm(saga_id)
        raise Crash

    shop.orders.confirm = dying  # type: ignore[method-assign]
    with build_order_saga(shop, log_dir=folder, durability="flush", timeout=None) as saga:
        for order in orders(n, "r"):
            with contextlib.suppress(Crash):
                run_order(saga, order)
    shop.orders.confirm = confirm  # type: ignore[method-assign]
    return shop


def bench_recovery(work: Path, n: int, repeats: int, fresh_saga_seconds: float) -> list[str]:
    best_open = best_total = float("inf")
    for attempt in range(repeats):
        folder = work / f"recovery{attempt}"
        shop = prepare_in_flight(folder, n)
        gc.collect()
        start = time.perf_counter()
        saga = build_order_saga(shop, log_dir=folder, durability="flush", timeout=None)
        opened = time.perf_counter()
        results = saga.recover()
        done = time.perf_counter()
        saga.close()
        if len(results) != n or not all(r.ok for r in results):
            raise AssertionError("recovery did not complete every saga")
        if any(shop.effects(r.saga_id)["order.confirmed"] != 1 for r in results):
            raise AssertionError("a step took effect twice")
        best_open = min(best_open, opened - start)
        best_total = min(best_total, done - start)
    per_saga = best_total / n
    return [
        f"Recovery of {n:,} sagas in flight (log flushed), best of {repeats}:",
        "",
        "| what | per in-flight saga | ratio to running one saga (flush) |",
        "|---|---:|---:|",
        f"| open the log (read + fold every record) | {best_open / n * 1e6:,.1f} us | "
        f"{best_open / n / fresh_saga_seconds:.2f}x |",
        f"| open + recover() (re-call the step in flight, finish) | {per_saga * 1e6:,.1f} us | "
        f"{per_saga / fresh_saga_seconds:.2f}x |",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--sagas", type=int, help="sagas per in-memory/flush case")
    parser.add_argument("--fsync-sagas", type=int, help="sagas in the fsync case")
    parser.add_argument("--repeats", type=int, help="rounds per case (default 3; quick 2)")
    parser.add_argument("--dir", type=Path, help="where to write the logs (default: a temp dir)")
    args = parser.parse_args(argv)
    n = args.sagas or (300 if args.quick else 3_000)
    n_fsync = args.fsync_sagas or (20 if args.quick else 200)
    repeats = args.repeats or (2 if args.quick else 3)
    if n < 10 or n_fsync < 1 or not 1 <= repeats <= 10:
        parser.error("--sagas must be >= 10, --fsync-sagas >= 1, --repeats between 1 and 10")

    print(
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs; {n:,} sagas per case ({n_fsync:,} with fsync), "
        f"{repeats} rounds, interleaved\n"
    )
    with tempfile.TemporaryDirectory(prefix="bench-saga-", dir=args.dir) as tmp:
        work = Path(tmp)
        per_saga, line = records_per_saga(work)
        cases = Cases(work)
        plan: dict[str, tuple[int, Callable[[], None]]] = {
            "floor: the 5 service calls + events, no orchestrator": (n, cases.direct(n)),
            "orchestrator, no saga log (memory)": (n, cases.orchestrated(n, None)),
            "orchestrator, saga log flushed per record": (n, cases.orchestrated(n, "flush")),
            "orchestrator, flushed log + step timeouts (thread per call)": (
                n,
                cases.orchestrated(n, "flush", timeout=5.0),
            ),
            "choreography, same services and bus (memory)": (n, cases.choreographed(n)),
            "orchestrator, saga log fsync'd per record": (
                n_fsync,
                cases.orchestrated(n_fsync, "fsync"),
            ),
            "floor: bare fsync'd appends, same count and size": (
                n_fsync,
                cases.fsync_floor(n_fsync * per_saga, line),
            ),
        }
        best = dict.fromkeys(plan, float("inf"))
        for _ in range(repeats):
            for name, (_count, fn) in plan.items():
                best[name] = min(best[name], timed(fn))
        rates = {name: plan[name][0] / best[name] for name in plan}
        memory_floor = rates["floor: the 5 service calls + events, no orchestrator"]
        fsync_floor = rates["floor: bare fsync'd appends, same count and size"]

        print(f"Order sagas (5 steps, {per_saga} saga-log records each), best of {repeats}:\n")
        print("| case | sagas/s | us per saga | ratio to its floor |")
        print("|---|---:|---:|---:|")
        for name, rate in rates.items():
            floor = fsync_floor if "fsync" in name else memory_floor
            print(f"| {name} | {rate:,.0f} | {1e6 / rate:,.1f} | {rate / floor:.2f}x |")
        flush = rates["orchestrator, saga log flushed per record"]
        fsync = rates["orchestrator, saga log fsync'd per record"]
        print(
            f"\nfsync per record costs {flush / fsync:,.0f}x the flushed log "
            f"({1e6 / fsync / per_saga:,.0f} us per record against "
            f"{1e6 / flush / per_saga:,.1f} us)\n"
        )
        for text in bench_recovery(work, n, repeats, 1 / flush):
            print(text)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
