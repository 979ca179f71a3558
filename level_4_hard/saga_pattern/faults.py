"""Telling a service to fail, so that every path of a saga can be shown and tested.

Each service owns a :class:`Faults` plan, keyed by operation name (``"reserve"``,
``"refund"``, ``"schedule"``…). Three kinds of fault:

* ``refuse(op, reason)`` — a business failure: the service records its failure event (as a
  real refusal would) and raises :class:`~level_4_hard.saga_pattern.errors.ServiceRefused`;
* ``flaky(op, times)`` — the next ``times`` calls raise
  :class:`~level_4_hard.saga_pattern.errors.TransientError` before doing anything;
* ``slow(op, seconds)`` — the call takes ``seconds`` on the service's clock, after applying its
  effect (a late reply: the effect happened) or, with ``after_effect=False``, before it.

A fault with ``times=None`` stays armed; otherwise it is used up call by call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from level_4_hard.saga_pattern.errors import TransientError

__all__ = ["CallPlan", "Fault", "Faults"]

KINDS = ("refuse", "flaky", "slow")


@dataclass
class Fault:
    kind: str
    times: int | None = 1
    seconds: float = 0.0
    after_effect: bool = True
    reason: str = ""


class Faults:
    """The fault plan of one service; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plan: dict[str, list[Fault]] = {}

    def refuse(self, op: str, reason: str, *, times: int | None = None) -> None:
        """Make ``op`` fail with a business refusal (default: every call)."""
        self._add(op, Fault("refuse", times, reason=reason))

    def flaky(self, op: str, times: int) -> None:
        """Make the next ``times`` calls of ``op`` raise TransientError."""
        self._add(op, Fault("flaky", times))

    def slow(
        self, op: str, seconds: float, *, after_effect: bool = True, times: int | None = 1
    ) -> None:
        """Make ``op`` take ``seconds`` (after its effect by default: a late reply)."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        self._add(op, Fault("slow", times, seconds=seconds, after_effect=after_effect))

    def clear(self, op: str | None = None) -> None:
        """Disarm the faults of ``op``, or of every operation."""
        with self._lock:
            if op is None:
                self._plan.clear()
            else:
                self._plan.pop(op, None)

    def armed(self, op: str) -> list[Fault]:
        with self._lock:
            return list(self._plan.get(op, ()))

    def _add(self, op: str, fault: Fault) -> None:
        if not op or not isinstance(op, str):
            raise ValueError(f"op must be a non-empty string, got {op!r}")
        if fault.times is not None and fault.times < 1:
            raise ValueError(f"times must be >= 1 or None, got {fault.times!r}")
        with self._lock:
            self._plan.setdefault(op, []).append(fault)

    def take(self, op: str, kind: str) -> Fault | None:
        """Use up one armed fault of ``kind`` for this call of ``op`` (None if there is none)."""
        with self._lock:
            faults = self._plan.get(op)
            if not faults:
                return None
            for fault in faults:
                if fault.kind != kind:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times == 0:
                        faults.remove(fault)
                return fault
            return None

    def plan(self, op: str) -> CallPlan:
        """What this call of ``op`` must do; raises TransientError for a flaky fault."""
        if not self._plan:  # nothing armed at all: the common case, no lock needed
            return CallPlan()
        if self.take(op, "flaky") is not None:
            raise TransientError(f"{op}: service temporarily unavailable (injected)")
        refusal = self.take(op, "refuse")
        slow = self.take(op, "slow")
        plan = CallPlan(refusal.reason if refusal is not None else None)
        if slow is not None:
            if slow.after_effect:
                plan.delay_after = slow.seconds
            else:
                plan.delay_before = slow.seconds
        return plan


@dataclass
class CallPlan:
    """The faults one call meets: a refusal reason, and delays before and after the effect."""

    refusal: str | None = None
    delay_before: float = 0.0
    delay_after: float = 0.0
