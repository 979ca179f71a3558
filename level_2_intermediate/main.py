"""Level 2 demo: a mini online shop whose every event goes through a bus of your choice.

Run it either way (the repository is installed, no path tricks):

    python level_2_intermediate/main.py --orders 20 --seed 7
    python -m level_2_intermediate.main --bus process --workers 4 --fail-rate 0.3 --json

What to look at: the emails and SMS as the notification service sends them; the WARNING lines
where the flaky loyalty listener fails and is retried (only it: the other listeners already
ran); and the summary, whose counts must equal the ground truth whatever the bus, the number of
workers or the failure rate. The same ``--seed`` gives the same orders and the same failures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any

from common.logger import configure_logging
from level_2_intermediate.simulation import BUSES, SimulationConfig, run_simulation


def _bounded(kind: type, low: float, high: float) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=_bounded(int, 1, 100_000), default=20)
    parser.add_argument(
        "--pay-ratio", type=_bounded(float, 0, 1), default=0.7, help="share of orders paid"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="reproduce a run (default: a random seed)"
    )
    parser.add_argument("--bus", choices=BUSES, default="thread")
    parser.add_argument(
        "--workers", type=_bounded(int, 1, 64), default=2, help="worker threads/processes/tasks"
    )
    parser.add_argument(
        "--fail-rate",
        type=_bounded(float, 0, 1),
        default=0.2,
        help="chance that one attempt of the flaky loyalty listener fails",
    )
    parser.add_argument("--max-retries", type=_bounded(int, 0, 10), default=3)
    parser.add_argument(
        "--json", action="store_true", help="print only the summary, as one JSON object"
    )
    parser.add_argument("--quiet", action="store_true", help="do not print each notification")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    config = SimulationConfig(
        orders=args.orders,
        pay_ratio=args.pay_ratio,
        seed=seed,
        bus=args.bus,
        workers=args.workers,
        fail_rate=args.fail_rate,
        max_retries=args.max_retries,
        console=not (args.json or args.quiet),
    )
    if not args.json:
        workers = "" if args.bus == "sync" else f" ({args.workers} workers)"
        print(
            f"shop: {args.orders} orders, pay ratio {args.pay_ratio:.2f}, seed {seed}, "
            f"bus {args.bus}{workers}, flaky loyalty listener failing {args.fail_rate:.0%} "
            f"of attempts (max {args.max_retries} retries)",
            flush=True,
        )
    summary = run_simulation(config)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        _print_summary(summary)
    return 0 if summary["consistent"] else 1


def _print_summary(s: dict[str, Any]) -> None:
    truth, analytics = s["ground_truth"], s["analytics"]
    sent, loyalty = s["notifications"], s["loyalty"]
    if s["bus"] == "sync":
        gave_up = f"{s['listener_errors']} listener errors (the sync bus does not retry)"
    else:
        gave_up = f"{s['dead_letters']} dead letters"
    verdict = "yes" if s["consistent"] else f"NO: {', '.join(s['failed_checks'])}"
    print("summary")
    print(
        f"  orders created {truth['orders']}, paid {truth['payments']}, "
        f"revenue {truth['revenue']}  (ground truth: the order service)"
    )
    print(
        f"  analytics: {analytics['orders']} orders, {analytics['payments']} payments, "
        f"revenue {analytics['revenue']}, conversion {analytics['conversion_rate']:.1%}"
    )
    print(
        f"  notifications: {sent['emails']} emails, {sent['sms']} sms "
        f"({sent['duplicates_skipped']} duplicate deliveries skipped)"
    )
    print(
        f"  loyalty (flaky): {loyalty['awarded']} awarded in {loyalty['attempts']} attempts, "
        f"{loyalty['failures']} failed attempts, {gave_up}"
    )
    print(f"  {s['events']} events in {s['seconds']:.2f}s; matches the ground truth: {verdict}")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
