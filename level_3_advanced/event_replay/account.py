"""The assignment's bank account, event-sourced: state is whatever the events say it is.

A command (:meth:`BankAccount.deposit`, :meth:`BankAccount.withdraw`) checks the business rule
against the current state and, if it holds, emits an event; it never changes the state itself.
The state changes only in :meth:`BankAccount.apply`, the listener for ``account.*`` events. The
live account and an account rebuilt from the log therefore run the very same code, and a replay
reaches the very same balance. A rejected command (an overdraft) emits nothing, so it leaves no
trace in the log and no replay can apply it.

Amounts are integer cents: a replay must reach *exactly* 2000.00, which floats do not promise.

Schema history, to show upcasting: version 1 of the events called the account field
``account``; version 2 (current) calls it ``account_id``. :func:`register_upcasters` teaches a
:class:`~level_3_advanced.event_replay.eventbus_replay.ReplayableEventBus` to upgrade old lines
during a replay, so :meth:`BankAccount.apply` only ever sees version 2.
"""

from __future__ import annotations

from typing import Any

from common.base_eventbus import BaseEventBus
from common.events import Event
from level_3_advanced.event_replay.eventbus_replay import ReplayableEventBus

__all__ = [
    "DEPOSITED",
    "OPENED",
    "SCHEMA_VERSION",
    "WITHDRAWN",
    "AccountError",
    "BankAccount",
    "OverdraftError",
    "format_cents",
    "register_upcasters",
    "rename_account_field",
]

OPENED = "account.opened"
DEPOSITED = "account.deposited"
WITHDRAWN = "account.withdrawn"
ACCOUNT_EVENTS = (OPENED, DEPOSITED, WITHDRAWN)
SCHEMA_VERSION = 2


class AccountError(ValueError):
    """A command that the account refuses; nothing was emitted."""


class OverdraftError(AccountError):
    """A withdrawal larger than the balance."""


def format_cents(cents: int) -> str:
    """``123456`` -> ``"1234.56"``, exactly (no float on the way)."""
    sign = "-" if cents < 0 else ""
    whole, rest = divmod(abs(cents), 100)
    return f"{sign}{whole}.{rest:02d}"


def rename_account_field(data: dict[str, Any]) -> dict[str, Any]:
    """Upcaster v1 -> v2: the field ``account`` was renamed ``account_id``."""
    data["account_id"] = data.pop("account")
    return data


def register_upcasters(bus: ReplayableEventBus) -> None:
    """Register the v1 -> v2 upcaster for every account event on ``bus``."""
    for name in ACCOUNT_EVENTS:
        bus.register_upcaster(name, 1, rename_account_field)


def _check_amount(cents: Any, what: str, *, allow_zero: bool = False) -> int:
    if isinstance(cents, bool) or not isinstance(cents, int):
        raise AccountError(f"{what} must be a whole number of cents, got {cents!r}")
    if cents < 0 or (cents == 0 and not allow_zero):
        raise AccountError(f"{what} must be positive, got {format_cents(cents)}")
    return cents


class BankAccount:
    """One account whose balance is rebuilt from ``account.*`` events on ``bus``.

    Creating it subscribes :meth:`apply`; :meth:`close` unsubscribes. Commands raise
    :class:`AccountError` (or :class:`OverdraftError`) to the caller and emit nothing when a
    rule is broken. Events of other accounts are ignored, so several accounts share one log.
    """

    snapshot_version = 1  # the shape of snapshot_state(); bump it when that changes

    def __init__(self, bus: BaseEventBus, account_id: str) -> None:
        if not isinstance(account_id, str) or not account_id:
            raise AccountError(f"account_id must be a non-empty string, got {account_id!r}")
        self.bus = bus
        self.account_id = account_id
        self.is_open = False
        self.balance_cents = 0
        self.events_applied = 0
        self._subscription = bus.subscribe("account.*", self.apply)

    # -- commands: check the rule, then emit (the state changes in apply) -------------------
    def open(self, opening_balance_cents: int) -> Event:
        if self.is_open:
            raise AccountError(f"account {self.account_id} is already open")
        cents = _check_amount(opening_balance_cents, "opening balance", allow_zero=True)
        return self._emit(OPENED, {"opening_balance_cents": cents})

    def deposit(self, cents: int) -> Event:
        self._check_open()
        return self._emit(DEPOSITED, {"amount_cents": _check_amount(cents, "deposit")})

    def withdraw(self, cents: int) -> Event:
        """Withdraw, or raise OverdraftError (and log nothing) if the balance is too small."""
        self._check_open()
        _check_amount(cents, "withdrawal")
        if cents > self.balance_cents:
            raise OverdraftError(
                f"withdrawal of {format_cents(cents)} from {self.account_id} rejected: "
                f"the balance is {format_cents(self.balance_cents)} and overdrafts are not allowed"
            )
        return self._emit(WITHDRAWN, {"amount_cents": cents})

    def _check_open(self) -> None:
        if not self.is_open:
            raise AccountError(f"account {self.account_id} is not open")

    def _emit(self, name: str, data: dict[str, Any]) -> Event:
        return self.bus.emit(name, {"account_id": self.account_id, **data}, version=SCHEMA_VERSION)

    # -- the one place where state changes --------------------------------------------------
    def apply(self, event: Event) -> None:
        """Change the state by one event (live or replayed); other accounts' are ignored."""
        data = event.data
        if data.get("account_id") != self.account_id:
            if event.version < SCHEMA_VERSION and "account" in data:
                raise AccountError(
                    f"{event.name} v{event.version} [{event.id}] reached the account without "
                    "upcasting: call register_upcasters(bus) before replaying"
                )
            return
        name = event.name
        if name == OPENED:
            self.is_open = True
            self.balance_cents = data["opening_balance_cents"]
        elif name == DEPOSITED:
            self.balance_cents += data["amount_cents"]
        elif name == WITHDRAWN:
            self.balance_cents -= data["amount_cents"]
        else:
            return  # an account event this version does not know: not ours to interpret
        self.events_applied += 1

    @property
    def balance(self) -> str:
        return format_cents(self.balance_cents)

    # -- snapshots (see snapshots.Snapshottable) --------------------------------------------
    def snapshot_state(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "is_open": self.is_open,
            "balance_cents": self.balance_cents,
            "events_applied": self.events_applied,
        }

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("account_id") != self.account_id:
            raise AccountError(
                f"snapshot of account {state.get('account_id')!r} given to {self.account_id}"
            )
        self.is_open = bool(state["is_open"])
        self.balance_cents = int(state["balance_cents"])
        self.events_applied = int(state["events_applied"])

    def close(self) -> None:
        """Stop following the bus."""
        self._subscription.cancel()

    def __repr__(self) -> str:
        return f"<BankAccount {self.account_id} balance={self.balance}>"
