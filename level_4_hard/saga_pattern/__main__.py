"""Operate the order sagas of a data directory: status, retry, recover, diagram, run.

    python -m level_4_hard.saga_pattern --data-dir DIR status [SAGA_ID]
    python -m level_4_hard.saga_pattern --data-dir DIR retry SAGA_ID
    python -m level_4_hard.saga_pattern --data-dir DIR recover [--style choreography]
    python -m level_4_hard.saga_pattern --data-dir DIR diagram SAGA_ID [-o FILE]
    python -m level_4_hard.saga_pattern --data-dir DIR run [--scenario NAME] [--pause-after EVENT]

``DIR`` defaults to ``$EDA_DATA_DIR/saga_pattern/shop``; the demo prints the directory of each
of its scenarios. Exit status: 0 when every saga touched ended (completed or compensated),
1 when one is parked or still in flight, 2 for a usage error (unknown saga, wrong state, a log
owned by another live orchestrator).

``run --pause-after EVENT[:STEP]`` stops the process at a deterministic point — right after
the bus carried EVENT (for saga records, of STEP), which is after it was written to disk —
prints ``PAUSED <saga_id> <event>`` and blocks reading stdin. The crash test and the demo kill
it there with SIGKILL; closing stdin instead lets it carry on. Step timeouts are off while a
pause is armed, so the pause is not mistaken for a slow step.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import orjson

from common.config import Settings
from common.events import Event
from common.logger import configure_logging
from level_1_basic.eventbus import EventBus
from level_4_hard.saga_pattern.bootstrap import STYLES, SagaApp, bootstrap
from level_4_hard.saga_pattern.choreography import REACTIONS
from level_4_hard.saga_pattern.diagram import render_sequence, write_markdown
from level_4_hard.saga_pattern.errors import SagaError
from level_4_hard.saga_pattern.saga_log import SagaStatus
from level_4_hard.saga_pattern.saga_orchestrator import run_order
from level_4_hard.saga_pattern.scenarios import SCENARIOS, arm, scenario_order

CONSUMERS = {r.trigger: r.participant for r in REACTIONS}


def _pause_listener(step: str | None) -> Callable[[Event], None]:
    def pause(event: Event) -> None:
        if step is not None and event.data.get("step") != step:
            return
        print(f"PAUSED {event.correlation_id} {event.name}", flush=True)
        sys.stdin.readline()  # blocks until killed, or until the parent closes our stdin

    return pause


def _ended(status: SagaStatus) -> bool:
    return status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)


def cmd_run(app: SagaApp, args: argparse.Namespace) -> int:
    arm(app.shop, args.scenario)
    order = scenario_order(args.scenario, args.order_id)
    if app.orchestrator is not None:
        result = run_order(app.orchestrator, order, saga_id=args.saga_id)
        print(result.describe())
        return 0 if _ended(result.status) else 1
    assert app.choreography is not None
    outcome = app.choreography.run(order, saga_id=args.saga_id, timeout=args.wait)
    print(f"saga {outcome.saga_id}: {outcome.status.value} ({len(outcome.events)} events)")
    return 0 if _ended(outcome.status) else 1


def cmd_recover(app: SagaApp, args: argparse.Namespace) -> int:
    if app.orchestrator is not None:
        results = app.orchestrator.recover()
        for result in results:
            print(result.describe())
        if not results:
            print("no saga in flight")
        return 0 if all(_ended(r.status) for r in results) else 1
    assert app.choreography is not None
    touched = app.choreography.recover()
    status = 0
    for saga_id in touched:
        app.choreography.wait(saga_id, args.wait)
        current = app.choreography.status(saga_id)
        print(f"saga {saga_id}: {current.value}")
        status = status or (0 if _ended(current) else 1)
    if not touched:
        print("no saga in flight")
    return status


def cmd_retry(app: SagaApp, args: argparse.Namespace) -> int:
    assert app.orchestrator is not None
    result = app.orchestrator.retry(args.saga_id)
    print(result.describe())
    return 0 if _ended(result.status) else 1


def cmd_status(app: SagaApp, args: argparse.Namespace) -> int:
    if app.orchestrator is not None:
        states = [s.summary() for s in app.orchestrator.sagas()]
    else:
        assert app.choreography is not None
        ids = dict.fromkeys(e.correlation_id for e in app.shop.events() if e.correlation_id)
        states = [{"saga_id": i, "status": app.choreography.status(i).value} for i in ids]
    if args.saga_id is not None:
        states = [s for s in states if s["saga_id"] == args.saga_id]
        if not states:
            raise SagaError(f"no saga {args.saga_id!r} in {app.data_dir}")
    for state in states:
        print(orjson.dumps(state).decode())
    return 0 if all(s["status"] in ("completed", "compensated") for s in states) else 1


def cmd_diagram(app: SagaApp, args: argparse.Namespace) -> int:
    if app.orchestrator is not None:
        events = app.orchestrator.records(args.saga_id)
    else:
        events = app.shop.events(args.saga_id)
    if not events:
        raise SagaError(f"no saga {args.saga_id!r} in {app.data_dir}")
    title = f"{app.style}: saga {args.saga_id}"
    diagram = render_sequence(events, consumers=CONSUMERS, title=title)
    if args.output is None:
        print(diagram, end="")
    else:
        print(f"wrote {write_markdown(args.output, title, diagram, events)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m level_4_hard.saga_pattern", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data-dir", type=Path, help="default: $EDA_DATA_DIR/saga_pattern/shop")
    parser.add_argument("--style", choices=STYLES, default="orchestration")
    parser.add_argument("--durability", choices=("flush", "fsync"), default="fsync")
    commands = parser.add_subparsers(dest="command", required=True)

    status = commands.add_parser("status", help="print each saga's state as JSON")
    status.add_argument("saga_id", nargs="?")
    status.set_defaults(handler=cmd_status)

    retry = commands.add_parser("retry", help="resume a parked (failed) saga's compensations")
    retry.add_argument("saga_id")
    retry.set_defaults(handler=cmd_retry)

    recover = commands.add_parser("recover", help="finish or compensate every saga in flight")
    recover.add_argument("--wait", type=float, default=30.0, help="choreography: seconds")
    recover.set_defaults(handler=cmd_recover)

    diagram = commands.add_parser("diagram", help="a Mermaid sequence diagram of one saga")
    diagram.add_argument("saga_id")
    diagram.add_argument("-o", "--output", type=Path, help="write Markdown here")
    diagram.set_defaults(handler=cmd_diagram)

    run = commands.add_parser("run", help="run one order saga through a scenario")
    run.add_argument("--scenario", choices=sorted(SCENARIOS), default="success")
    run.add_argument("--order-id", default="1")
    run.add_argument("--saga-id", help="default: order-<order id>")
    run.add_argument("--timeout", type=float, default=2.0, help="per step, seconds")
    run.add_argument("--wait", type=float, default=30.0, help="choreography: seconds")
    run.add_argument("--pause-after", metavar="EVENT[:STEP]", help="stop there (see above)")
    run.set_defaults(handler=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "retry" and args.style != "orchestration":
        parser.error(
            "retry applies to orchestrated sagas; a choreographed one resumes with recover"
        )
    data_dir = args.data_dir or Settings.load().data_dir / "saga_pattern" / "shop"
    timeout = getattr(args, "timeout", 2.0)
    bus = None
    if getattr(args, "pause_after", None):
        timeout = None  # a paused step must not count as a slow one
        # The pause listener is subscribed first, so it runs before any reaction to EVENT.
        log_path = data_dir / "events.log" if args.style == "choreography" else None
        bus = EventBus(log_path, durability=args.durability)
        name, _, step = args.pause_after.partition(":")
        bus.subscribe(name, _pause_listener(step or None))
    try:
        with bootstrap(
            data_dir, style=args.style, durability=args.durability, timeout=timeout, bus=bus
        ) as app:
            return args.handler(app, args)
    except SagaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
