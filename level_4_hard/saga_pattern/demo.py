"""Level 4 demo: the order saga, orchestrated and choreographed, down every path.

Run it either way (the repository is installed, no path tricks):

    python level_4_hard/saga_pattern/demo.py
    python -m level_4_hard.saga_pattern.demo --scenario crash-recover --data-dir /tmp/saga

Scenarios (default: all of them): success, payment-declined, delivery-fails,
delivery-timeout, refund-fails and crash-recover. Each runs in both styles on fresh services
(under ``<data-dir>/<scenario>/<style>/``), prints the sequence of what happened, checks that
both styles reached the same final state, and writes one Mermaid diagram per style to
``<data-dir>/diagrams/``. The crash scenario really kills a subprocess with SIGKILL between two
steps and recovers the saga in this process.

What to look at: the compensations run in reverse order; a timed-out delivery that landed late
is cancelled; a refund that keeps failing parks the saga until ``retry``; after the kill,
``recover()`` calls the step that was in flight again and every effect still happens once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import Settings
from common.events import Event
from common.logger import configure_logging
from common.retry import Backoff
from level_4_hard.saga_pattern import saga_log as records
from level_4_hard.saga_pattern.bootstrap import STYLES, SagaApp, bootstrap
from level_4_hard.saga_pattern.choreography import REACTIONS
from level_4_hard.saga_pattern.crash import kill9, start_paused
from level_4_hard.saga_pattern.diagram import (
    load_events,
    render_sequence,
    sequence_lines,
    write_markdown,
)
from level_4_hard.saga_pattern.saga_log import SagaStatus
from level_4_hard.saga_pattern.saga_orchestrator import Retry, run_order
from level_4_hard.saga_pattern.scenarios import SCENARIOS, arm, scenario_order

CRASH = "crash-recover"
ALL_SCENARIOS = (*SCENARIOS, CRASH)
CONSUMERS = {r.trigger: r.participant for r in REACTIONS}
# Small delays so that every scenario, real clock and all, finishes in a few seconds.
STEP_TIMEOUT = 0.4
SLOW_DELIVERY = 0.8
RETRY = Retry(attempts=3, backoff=Backoff(base=0.02, factor=2.0, cap=0.2))
COMPENSATION_RETRY = Retry(
    attempts=3, backoff=Backoff(base=0.02, factor=2.0, cap=0.2), retry_on=(Exception,)
)
SAGA_ID = "order-1"


@dataclass
class StyleRun:
    """What one style did in one scenario."""

    style: str
    status: SagaStatus
    lines: list[str]
    state: dict[str, Any]
    effects: dict[str, int]
    diagram: Path


def _open(folder: Path, style: str) -> SagaApp:
    return bootstrap(
        folder,
        style=style,
        durability="flush",
        timeout=STEP_TIMEOUT,
        retry=RETRY,
        compensation_retry=COMPENSATION_RETRY,
    )


def narrate(event: Event, seen: set[str] | None = None) -> str | None:
    """One line for an event of the sequence, or None for the bookkeeping records.

    ``seen`` collects event ids: an event published again (by a recovery) is marked so.
    """
    name, data = event.name, event.data
    if not name.startswith("saga."):
        again = seen is not None and event.id in seen
        if seen is not None:
            seen.add(event.id)
        return sequence_lines([event])[0] + ("   (published again by recover)" if again else "")
    if name in (records.STEP_RETRYING, records.COMPENSATION_RETRYING):
        what = "undo " if name == records.COMPENSATION_RETRYING else ""
        return f"  retry {what}{data['step']} in {data['delay']:g}s after: {data['error']}"
    if name == records.STEP_FAILED:
        plan = ", ".join(data["compensate"]) or "nothing"
        return f"  {data['step']} FAILED ({data['kind']}): {data['error']} -> undo {plan}"
    if name == records.FAILED:
        return f"  PARKED: {data['reason']}"
    if name == records.RESUMED:
        died = "the process died here; " if data["by"] == "recover" else ""
        return f"  {died}resumed by {data['by']} in pid {data['pid']}"
    if name in (records.COMPLETED, records.COMPENSATED):
        return f"  => saga {name.split('.')[1]}"
    return None


def _story(app: SagaApp) -> list[Event]:
    """What happened to the saga, from disk: saga records and ledger events by time."""
    if app.orchestrator is not None:
        merged = app.orchestrator.records(SAGA_ID) + app.shop.events(SAGA_ID)
        merged.sort(key=lambda e: e.timestamp_ns)
        return merged
    assert app.events_log is not None
    return load_events(app.events_log, SAGA_ID)


def _finish(app: SagaApp, scenario: str, root: Path) -> StyleRun:
    story = _story(app)
    title = f"{scenario} ({app.style}): saga {SAGA_ID}"
    diagram = render_sequence(story, consumers=CONSUMERS, title=title)
    path = write_markdown(root / "diagrams" / f"{scenario}-{app.style}.md", title, diagram, story)
    if app.orchestrator is not None:
        status = app.orchestrator.get(SAGA_ID).status
    else:
        assert app.choreography is not None
        status = app.choreography.status(SAGA_ID)
    seen: set[str] = set()
    lines = [line for line in (narrate(e, seen) for e in story) if line is not None]
    return StyleRun(app.style, status, lines, app.shop.snapshot(), app.shop.effects(SAGA_ID), path)


def run_style(scenario: str, style: str, root: Path, write: Callable[[str], None]) -> StyleRun:
    """One scenario in one style, on fresh services under ``root/scenario/style``."""
    folder = root / scenario / style
    shutil.rmtree(folder, ignore_errors=True)
    if scenario == CRASH:
        return _crash_and_recover(style, folder, root, write)
    order = scenario_order(scenario, "1")
    with _open(folder, style) as app:
        arm(app.shop, scenario, slow_seconds=SLOW_DELIVERY)
        if app.orchestrator is not None:
            result = run_order(app.orchestrator, order, saga_id=SAGA_ID)
            parked = result.status is SagaStatus.FAILED
        else:
            assert app.choreography is not None
            outcome = app.choreography.run(order, saga_id=SAGA_ID)
            parked = outcome.status.in_flight
            if parked:
                write(f"  {style}: a compensation kept failing; the saga is stalled in flight")
                write(
                    "    (no coordinator parks it); recover() publishes its unanswered fact again"
                )
                app.choreography.recover()
        if not parked or app.orchestrator is None:
            return _finish(app, scenario, root)
    # Parked orchestration: resume it the way an operator would, with the CLI, in a new process.
    command = ["--data-dir", str(folder), "--durability", "flush", "retry", SAGA_ID]
    write(f"  {style}: parked; resuming: python -m level_4_hard.saga_pattern {' '.join(command)}")
    done = subprocess.run(
        [sys.executable, "-m", "level_4_hard.saga_pattern", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    write(f"    {done.stdout.strip() or done.stderr.strip()} (exit {done.returncode})")
    with _open(folder, style) as app:
        return _finish(app, scenario, root)


def _crash_and_recover(
    style: str, folder: Path, root: Path, write: Callable[[str], None]
) -> StyleRun:
    # Orchestration: stop right after reserve_funds is in the saga log, between two steps.
    # Choreography: stop right after payment.funds_reserved is recorded, before Order reacts.
    pause = (
        "saga.step_completed:reserve_funds"
        if style == "orchestration"
        else "payment.funds_reserved"
    )
    with start_paused(folder, pause, "--order-id", "1", style=style) as run:
        write(f"  {style}: pid {run.pid} paused after {pause}")
        kill9(run.proc)
        write(f"  {style}: kill -9 {run.pid}")
    with _open(folder, style) as app:
        if app.orchestrator is not None:
            before = app.orchestrator.get(SAGA_ID)
            write(
                f"  {style}: on disk: {before.status.value}, completed "
                f"{', '.join(before.completed)}; recover() in pid {os.getpid()}:"
            )
            for result in app.orchestrator.recover():
                write(f"    {result.describe()}")
        else:
            assert app.choreography is not None
            pending = app.choreography.pending()
            facts = [e.name for e in pending.get(SAGA_ID, [])]
            write(f"  {style}: unanswered facts on disk: {facts}; recover() in pid {os.getpid()}")
            app.choreography.recover()
        return _finish(app, CRASH, root)


def format_state(state: dict[str, Any]) -> str:
    """The final state on one line: stock, balances, holds, orders, deliveries."""

    def money(cents: int) -> str:
        return f"{cents / 100:.2f}"

    parts = [
        "stock " + " ".join(f"{k}={v}" for k, v in state["stock"].items()),
        "balances " + " ".join(f"{k}={money(v)}" for k, v in state["balances"].items()),
        "held " + (" ".join(f"{k}={money(v)}" for k, v in state["held"].items()) or "-"),
        "orders " + (" ".join(f"{k}={v}" for k, v in state["orders"].items()) or "-"),
        "deliveries " + (" ".join(f"{k}={v}" for k, v in state["deliveries"].items()) or "-"),
    ]
    return " | ".join(parts)


def run_scenario(
    scenario: str, root: Path, write: Callable[[str], None] = print
) -> dict[str, StyleRun]:
    """Both styles of one scenario; prints them and returns what each did."""
    summary = (
        SCENARIOS[scenario].summary
        if scenario in SCENARIOS
        else (
            "the orchestrator process is killed with SIGKILL between two steps; a new process "
            "recovers the saga"
        )
    )
    write(f"\n=== {scenario}: {summary}")
    runs = {}
    for style in STYLES:
        run = run_style(scenario, style, root, write)
        runs[style] = run
        write(f"  {style}: saga {SAGA_ID} {run.status.value}")
        for number, line in enumerate(run.lines, 1):
            write(f"    {number:2}. {line}")
    same = runs["orchestration"].state == runs["choreography"].state
    once = all(n == 1 for r in runs.values() for n in r.effects.values())
    write(f"  final state: {format_state(runs['orchestration'].state)}")
    verdict = {True: "yes", False: "NO"}
    write(f"  same final state in both styles: {verdict[same]}; each effect once: {verdict[once]}")
    write("  diagrams: " + ", ".join(str(r.diagram) for r in runs.values()))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario",
        choices=[*ALL_SCENARIOS, "all"],
        default="all",
        help="which scenario to run (default: all)",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="where to write (default: $EDA_DATA_DIR/saga_pattern)"
    )
    args = parser.parse_args(argv)
    # The demo prints the story; below ERROR the log would only repeat it.
    configure_logging(os.environ.get("EDA_LOG_LEVEL", "ERROR"))
    root = args.data_dir or Settings.load().data_dir / "saga_pattern"
    scenarios = ALL_SCENARIOS if args.scenario == "all" else (args.scenario,)
    failures = []
    for scenario in scenarios:
        runs = run_scenario(scenario, root)
        same = runs["orchestration"].state == runs["choreography"].state
        ended = all(
            not r.status.in_flight and r.status is not SagaStatus.FAILED for r in runs.values()
        )
        if not (same and ended):
            failures.append(scenario)
    print(f"\nsaga logs, ledgers and diagrams under {root}")
    if failures:
        print(f"unexpected outcome in: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
