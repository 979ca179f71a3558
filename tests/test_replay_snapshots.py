"""The bank account, snapshots, and the Level 3 replay demo."""

from __future__ import annotations

import logging
import random
import subprocess
from pathlib import Path

import pytest

from common.events import Event
from level_3_advanced.event_replay import demo_replay
from level_3_advanced.event_replay.account import (
    AccountError,
    BankAccount,
    OverdraftError,
    format_cents,
    register_upcasters,
)
from level_3_advanced.event_replay.eventbus_replay import LogPosition, ReplayableEventBus
from level_3_advanced.event_replay.snapshots import SnapshotStore, rebuild

REPO = Path(__file__).resolve().parents[1]


# -- the account ------------------------------------------------------------------------------
def test_overdraft_is_rejected_clearly_and_not_logged(tmp_path: Path) -> None:
    log_path = tmp_path / "bank.log"
    with ReplayableEventBus(log_path) as bus:
        account = BankAccount(bus, "acc-1")
        account.open(100_000)
        account.withdraw(40_000)
        before = log_path.read_bytes()
        with pytest.raises(
            OverdraftError, match=r"5000\.00 from acc-1 rejected: the balance is 600\.00"
        ):
            account.withdraw(500_000)
        assert log_path.read_bytes() == before
        assert account.balance == "600.00"
        account.withdraw(60_000)  # exactly to zero is allowed
        assert account.balance == "0.00"


@pytest.mark.parametrize(
    ("command", "amount", "message"),
    [
        ("deposit", 0, "deposit must be positive"),
        ("deposit", -5, "deposit must be positive"),
        ("deposit", 10.5, "whole number of cents"),
        ("withdraw", True, "whole number of cents"),
        ("withdraw", "100", "whole number of cents"),
    ],
)
def test_bad_amounts_are_refused_and_nothing_is_logged(
    tmp_path: Path, command: str, amount: object, message: str
) -> None:
    log_path = tmp_path / "bank.log"
    with ReplayableEventBus(log_path) as bus:
        account = BankAccount(bus, "acc-1")
        account.open(1_000)
        with pytest.raises(AccountError, match=message):
            getattr(account, command)(amount)
    assert len(log_path.read_bytes().splitlines()) == 1


def test_commands_need_an_open_account_and_accounts_share_a_log(tmp_path: Path) -> None:
    with ReplayableEventBus(tmp_path / "bank.log") as bus:
        ann, bob = BankAccount(bus, "ann"), BankAccount(bus, "bob")
        with pytest.raises(AccountError, match="not open"):
            ann.deposit(100)
        ann.open(1_000)
        bob.open(5_000)
        with pytest.raises(AccountError, match="already open"):
            ann.open(1)
        ann.deposit(250)
        bob.withdraw(1_000)
        assert (ann.balance, bob.balance) == ("12.50", "40.00")
    with ReplayableEventBus(None) as reader:
        ann2 = BankAccount(reader, "ann")
        reader.replay_from_file(tmp_path / "bank.log")
        assert ann2.balance == "12.50"


def test_v1_events_without_upcasters_are_a_loud_listener_error(tmp_path: Path) -> None:
    log_path = tmp_path / "bank.log"
    with ReplayableEventBus(log_path) as old_app:
        old_app.emit("account.opened", {"account": "acc-1", "opening_balance_cents": 5}, version=1)
    with ReplayableEventBus(None) as bus:
        account = BankAccount(bus, "acc-1")
        bus.replay_from_file(log_path)
        assert account.balance == "0.00"
        assert "call register_upcasters(bus)" in str(bus.errors[0].exception)
    with ReplayableEventBus(None) as bus:
        register_upcasters(bus)
        account = BankAccount(bus, "acc-1")
        bus.replay_from_file(log_path)
        assert account.balance == "0.05"


def test_format_cents() -> None:
    assert [format_cents(c) for c in (0, 5, 100, 123_456, -250)] == [
        "0.00",
        "0.05",
        "1.00",
        "1234.56",
        "-2.50",
    ]


# -- snapshots --------------------------------------------------------------------------------
def random_history(log_path: Path, operations: int, seed: int = 7) -> dict[str, str]:
    """Two accounts and ``operations`` random deposits/withdrawals; returns the balances."""
    rng = random.Random(seed)
    with ReplayableEventBus(log_path, durability="none") as bus:
        accounts = [BankAccount(bus, "acc-1"), BankAccount(bus, "acc-2")]
        for account in accounts:
            account.open(rng.randrange(0, 10_000))
        for _ in range(operations):
            account = rng.choice(accounts)
            cents = rng.randrange(1, 5_000)
            if rng.random() < 0.45 and cents <= account.balance_cents:
                account.withdraw(cents)
            else:
                account.deposit(cents)
        return {a.account_id: a.balance for a in accounts}


def full_replay(log_path: Path, account_id: str) -> BankAccount:
    bus = ReplayableEventBus(None)
    account = BankAccount(bus, account_id)
    bus.replay_from_file(log_path)
    return account


def test_snapshots_give_the_same_state_as_a_full_replay(tmp_path: Path) -> None:
    log_path = tmp_path / "bank.log"
    random_history(log_path, 1_000)
    store = SnapshotStore(tmp_path / "snapshots", fsync=False)
    reader = ReplayableEventBus(None)

    first = BankAccount(reader, "acc-1")
    result = rebuild(reader, first, store=store, key="acc-1", path=log_path, snapshot_every=100)
    first.close()
    assert result.snapshot is None and result.replayed == 1_002
    assert [s.position.line for s in result.saved] == [100 * i for i in range(1, 11)]
    assert first.snapshot_state() == full_replay(log_path, "acc-1").snapshot_state()

    # More history after the latest snapshot (line 1000 of 1002): the rebuild restores the
    # snapshot and replays only the lines that follow it.
    with ReplayableEventBus(log_path) as bus:
        more = BankAccount(bus, "acc-1")
        bus.replay_from_file()
        for cents in (111, 222, 333):
            more.deposit(cents)
    second = BankAccount(reader, "acc-1")
    result = rebuild(reader, second, store=store, key="acc-1", path=log_path)
    assert result.snapshot is not None
    assert result.snapshot.position.line == 1_000
    assert result.replayed == 5
    assert result.position.line == 1_005
    expected = full_replay(log_path, "acc-1")
    assert second.snapshot_state() == expected.snapshot_state()
    assert second.balance == more.balance


def test_snapshot_position_is_exact_even_with_a_pattern(tmp_path: Path) -> None:
    log_path = tmp_path / "bank.log"
    random_history(log_path, 50)
    store = SnapshotStore(tmp_path / "snapshots", fsync=False)
    reader = ReplayableEventBus(None)
    account = BankAccount(reader, "acc-2")
    result = rebuild(
        reader,
        account,
        store=store,
        key="acc-2",
        path=log_path,
        pattern="account.deposited",
        snapshot_every=7,
    )
    snapshot = store.load("acc-2")
    assert snapshot is not None and result.saved[-1] == snapshot
    line = log_path.read_bytes()[: snapshot.position.offset].splitlines()[-1]
    assert Event.from_json(line).id == snapshot.event_id
    assert len(log_path.read_bytes()[: snapshot.position.offset].splitlines()) == (
        snapshot.position.line
    )


def test_a_snapshot_that_cannot_be_trusted_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log_path = tmp_path / "bank.log"
    random_history(log_path, 30)
    store = SnapshotStore(tmp_path / "snapshots", fsync=False)
    reader = ReplayableEventBus(None)
    acc = BankAccount(reader, "acc-1")
    rebuild(reader, acc, store=store, key="acc-1", path=log_path, snapshot_every=10)
    acc.close()
    expected = full_replay(log_path, "acc-1").snapshot_state()

    def rebuilt() -> tuple[bool, dict]:
        account = BankAccount(reader, "acc-1")
        result = rebuild(reader, account, store=store, key="acc-1", path=log_path)
        account.close()
        return result.snapshot is not None, account.snapshot_state()

    assert rebuilt() == (True, expected)
    with caplog.at_level(logging.WARNING):
        # 1. the log was replaced by another history: the recorded event is not there
        saved = log_path.read_bytes()
        log_path.unlink()
        other = random_history(log_path, 30, seed=99)
        used, state = rebuilt()
        assert not used and format_cents(state["balance_cents"]) == other["acc-1"]
        assert "no longer holds event" in caplog.text
        # 2. the log was truncated before the snapshot's position
        log_path.write_bytes(saved[:100])
        assert rebuilt()[0] is False
        log_path.write_bytes(saved)
        assert rebuilt() == (True, expected)
        # 3. the state changed shape since (snapshot_version)
        BankAccount.snapshot_version = 2
        try:
            assert rebuilt() == (False, expected)
        finally:
            BankAccount.snapshot_version = 1
        assert "written for state version 1, the projection is at 2" in caplog.text
        # 4. the snapshot file itself is damaged
        store.path_for("acc-1").write_bytes(b'{"format": 1, "state": ')
        assert rebuilt() == (False, expected)
        assert "ignoring unreadable snapshot" in caplog.text


def test_snapshot_store_validates_keys_and_arguments(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, fsync=False)
    for bad in ("", "../etc", ".hidden", "a/b", "x" * 200):
        with pytest.raises(ValueError, match="snapshot key"):
            store.path_for(bad)
    assert store.load("absent") is None
    assert store.delete("absent") is False
    saved = store.save("k", {"n": 1}, LogPosition(10, 2), "id-1", version=3)
    assert store.load("k") == saved
    with ReplayableEventBus(None) as bus:
        account = BankAccount(bus, "acc-1")
        with pytest.raises(ValueError, match="needs a store"):
            rebuild(bus, account, path=tmp_path / "x.log", snapshot_every=5)
        with pytest.raises(ValueError, match=">= 0"):
            rebuild(bus, account, store=store, path=tmp_path / "x.log", snapshot_every=-1)


# -- the demo ---------------------------------------------------------------------------------
def test_demo_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_replay.main(["--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "replayed 2 events (2 upcast v1 -> v2" in out
    assert "-> balance 1300.00" in out
    assert "withdraw 5000.00 -> REJECTED: withdrawal of 5000.00 from acc-1 rejected" in out
    assert "withdraw 250.00 -> balance 2000.00" in out
    assert "6 events in the log" in out
    assert "replayed 6 events -> balance 2000.00 (the same as live)" in out
    assert "replayed 4 events -> balance as of then: 1800.00" in out
    assert "rebuild 1: with no snapshot, replayed 6 events -> balance 2000.00" in out
    assert "rebuild 2: from the snapshot at line 4 (balance 1800.00), replayed 2 events" in out
    assert "emails sent for the live events only: account.withdrawn 200.00;" in out
    log_lines = (tmp_path / "event_replay" / "bank.log").read_text().splitlines()
    assert len(log_lines) == 6 and "500000" not in "".join(log_lines)

    summary = demo_replay.run(tmp_path, snapshot_every=0, write=lambda line: None)
    assert (summary["balance"], summary["rebuilt_balance"], summary["time_travel_balance"]) == (
        "2000.00",
        "2000.00",
        "1800.00",
    )
    assert summary["listener_errors"] == 0 and "rebuild_1" not in summary


def test_demo_uses_eda_data_dir_and_validates_options(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo_replay.main(["--snapshot-every", "2"]) == 0
    assert (data_dir / "event_replay" / "bank.log").exists()
    assert (data_dir / "event_replay" / "snapshots" / "acc-1.snapshot.json").exists()
    assert "snapshots stored: line 2, line 4, line 6" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        demo_replay.main(["--snapshot-every", "-1"])


@pytest.mark.parametrize(
    "how",
    [
        ["level_3_advanced/event_replay/demo_replay.py"],
        ["-m", "level_3_advanced.event_replay.demo_replay"],
    ],
)
def test_demo_runs_as_a_script_and_as_a_module(python: str, tmp_path: Path, how: list[str]) -> None:
    proc = subprocess.run(
        [python, *how, "--data-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "summary: live balance 2000.00, rebuilt by replay 2000.00" in proc.stdout
