"""Level 3 demo: a bank account rebuilt from its event log — replay, time travel, snapshots.

Run it either way (the repository is installed, no path tricks):

    python level_3_advanced/event_replay/demo_replay.py
    python -m level_3_advanced.event_replay.demo_replay --data-dir /tmp/eda --snapshot-every 2

The story: last year's app opened account acc-1 with 1000.00 and wrote version-1 events (the
field was called ``account``). Today's app (version 2: ``account_id``) rebuilds the account from
the log, upcasting the old lines, then deposits and withdraws until the balance is 2000.00; an
overdraft is refused and leaves no trace in the log. A brand-new account object that only
replays the log reaches exactly 2000.00; a replay up to an earlier moment shows the balance as
of then; and a rebuild from a snapshot replays only the lines after it.

What to look at: the balances after each step; the emails (a side-effect listener that skips
events while ``bus.replaying``: sent for live events only); and how many events each replay
dispatched and upcast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import Settings
from common.events import Event
from common.logger import configure_logging
from level_3_advanced.event_replay.account import (
    DEPOSITED,
    OPENED,
    BankAccount,
    OverdraftError,
    format_cents,
    register_upcasters,
)
from level_3_advanced.event_replay.eventbus_replay import ReplayableEventBus
from level_3_advanced.event_replay.snapshots import SnapshotStore, rebuild

ACCOUNT = "acc-1"
# What last year's app wrote: schema version 1, where the account field was called "account".
LEGACY_HISTORY = [
    (OPENED, {"account": ACCOUNT, "opening_balance_cents": 100_000}),
    (DEPOSITED, {"account": ACCOUNT, "amount_cents": 30_000}),
]
# Today's operations: (command, cents). The second one is an overdraft; after the third one
# the demo notes the time, for the time-travel replay.
OPERATIONS = [("withdraw", 20_000), ("withdraw", 500_000), ("deposit", 70_000)]
MORE_OPERATIONS = [("deposit", 45_000), ("withdraw", 25_000)]


class EmailNotifier:
    """A listener with a side effect: it must not send emails again for replayed history."""

    def __init__(self, bus: ReplayableEventBus) -> None:
        self.bus = bus
        self.outbox: list[str] = []
        self.skipped = 0

    def __call__(self, event: Event) -> None:
        if self.bus.replaying:
            self.skipped += 1
            return
        amount = event.data.get("amount_cents", event.data.get("opening_balance_cents", 0))
        self.outbox.append(f"{event.name} {format_cents(amount)}")


def write_legacy_history(log_path: Path) -> None:
    """What the old app did: emit version-1 events (nobody listening any more)."""
    with ReplayableEventBus(log_path) as old_app:
        for name, data in LEGACY_HISTORY:
            old_app.emit(name, data, version=1)


def run(
    data_dir: Path,
    *,
    snapshot_every: int = 4,
    durability: str = "flush",
    write: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The scenario, on a fresh log under ``data_dir``; returns the numbers it printed."""
    work = data_dir / "event_replay"
    log_path = work / "bank.log"
    store = SnapshotStore(work / "snapshots")
    log_path.unlink(missing_ok=True)  # each run tells the story from the start
    store.delete(ACCOUNT)
    summary: dict[str, Any] = {"log": str(log_path)}

    write(f"1. last year's app writes schema v1 events to {log_path}")
    write_legacy_history(log_path)
    for line in log_path.read_text().splitlines():
        write(f"    {line}")

    write("2. today's app (schema v2) starts: the account is rebuilt by replaying the log")
    with ReplayableEventBus(log_path, durability=durability) as bus:
        register_upcasters(bus)
        account = BankAccount(bus, ACCOUNT)
        emails = EmailNotifier(bus)
        bus.subscribe("account.*", emails)
        replayed = bus.replay_from_file()
        assert bus.replay_stats is not None
        write(
            f"    replayed {replayed} events ({bus.replay_stats.upcasted} upcast v1 -> v2: "
            f"'account' renamed 'account_id'), {emails.skipped} emails skipped while replaying"
            f" -> balance {account.balance}"
        )
        summary["upcasted"] = bus.replay_stats.upcasted

        write("3. live operations (each event is in the log before the account applies it)")
        moment = None
        for command, cents in OPERATIONS:
            try:
                event = getattr(account, command)(cents)
            except OverdraftError as exc:
                write(f"    {command} {format_cents(cents)} -> REJECTED: {exc}")
                summary["rejected"] = str(exc)
                continue
            write(f"    {command} {format_cents(cents)} -> balance {account.balance}")
            moment = event.timestamp
        summary["balance_at_moment"] = account.balance
        write(f"    (noted the time: {moment:%H:%M:%S.%f} UTC, balance {account.balance})")
        for command, cents in MORE_OPERATIONS:
            getattr(account, command)(cents)
            write(f"    {command} {format_cents(cents)} -> balance {account.balance}")
        summary["balance"] = account.balance
        summary["emails"] = len(emails.outbox)
        summary["listener_errors"] = len(bus.errors)
        write(f"    emails sent for the live events only: {'; '.join(emails.outbox)}")
    summary["log_lines"] = len(log_path.read_bytes().splitlines())
    write(f"    {summary['log_lines']} events in the log; the refused overdraft is not one of them")

    write("4. a brand-new account object, rebuilt only by replaying the log")
    with ReplayableEventBus(None) as reader:  # a reader: it never writes the log
        register_upcasters(reader)
        fresh = BankAccount(reader, ACCOUNT)
        replayed = reader.replay_from_file(log_path)
        same = "the same" if fresh.balance == summary["balance"] else "NOT the same"
        write(f"    replayed {replayed} events -> balance {fresh.balance} ({same} as live)")
        summary["rebuilt_balance"] = fresh.balance

        write(f"5. time travel: replay only the events up to {moment:%H:%M:%S.%f} UTC")
        fresh.close()
        then = BankAccount(reader, ACCOUNT)
        replayed = reader.replay_from_file(log_path, until=moment)
        write(f"    replayed {replayed} events -> balance as of then: {then.balance}")
        summary["time_travel_balance"] = then.balance
        then.close()

        if snapshot_every:
            write(f"6. snapshots every {snapshot_every} events (stored in {store.directory})")
            for attempt in (1, 2):
                account = BankAccount(reader, ACCOUNT)
                result = rebuild(
                    reader,
                    account,
                    store=store,
                    key=ACCOUNT,
                    path=log_path,
                    snapshot_every=snapshot_every,
                )
                account.close()
                start = (
                    f"from the snapshot at line {result.snapshot.position.line} "
                    f"(balance {format_cents(result.snapshot.state['balance_cents'])})"
                    if result.snapshot
                    else "with no snapshot"
                )
                stored = ", ".join(f"line {s.position.line}" for s in result.saved) or "none"
                write(
                    f"    rebuild {attempt}: {start}, replayed {result.replayed} events "
                    f"-> balance {account.balance}; snapshots stored: {stored}"
                )
                summary[f"rebuild_{attempt}"] = {
                    "snapshot_line": result.snapshot.position.line if result.snapshot else None,
                    "replayed": result.replayed,
                    "balance": account.balance,
                }
        summary["listener_errors"] += len(reader.errors)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where bank.log and the snapshots go (default: EDA_DATA_DIR, else data/)",
    )
    parser.add_argument(
        "--snapshot-every",
        type=int,
        default=4,
        metavar="N",
        help="store a snapshot every N replayed events; 0 turns snapshots off (default: 4)",
    )
    parser.add_argument(
        "--durability", choices=("none", "flush", "fsync"), default="flush", help="of the log"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.snapshot_every <= 1_000:
        parser.error("--snapshot-every must be between 0 and 1000")
    configure_logging()
    data_dir = args.data_dir if args.data_dir is not None else Settings.load().data_dir

    summary = run(data_dir, snapshot_every=args.snapshot_every, durability=args.durability)
    print(
        f"summary: live balance {summary['balance']}, rebuilt by replay "
        f"{summary['rebuilt_balance']}, as of the noted time {summary['time_travel_balance']}, "
        f"{summary['log_lines']} events in {summary['log']}"
    )
    ok = summary["rebuilt_balance"] == summary["balance"] and not summary["listener_errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
