"""The saga log: every saga's progress, written before each step, read back after a crash.

Each record is an :class:`~common.events.Event` in the repository's one wire format, named
``saga.*``, with ``correlation_id`` = the saga id — so the log is also an events.log that the
diagram renderer (or any replay tool) reads like any other. The records, in the order a saga
writes them:

=============================  ==============================================================
``saga.started``               name, step names, the initial context
``saga.step_started``          before a step's action runs (the write-ahead record)
``saga.step_retrying``         an attempt failed transiently; the delay before the next one
``saga.step_completed``        the action's output (merged into the context)
``saga.step_failed``           the error, its kind, and the compensation plan (step names)
``saga.compensation_started``  before a compensation runs
``saga.compensation_retrying`` a compensation attempt failed; the delay before the next one
``saga.step_compensated``      the compensation's output
``saga.completed``             terminal: every step done
``saga.compensated``           terminal: every compensation of the plan done
``saga.failed``                parked: a compensation failed after its retries (``retry`` it)
``saga.resumed``               ``recover()`` or ``retry`` took the saga over (by which process)
=============================  ==============================================================

:class:`SagaState` folds these records into the saga's state; the orchestrator uses the very
same ``apply`` while it runs, so the state it acts on and the state recovery rebuilds are
computed by one function. Writing goes through :class:`~common.storage.AppendLog` (a torn last
line from a killed writer is cut on open); reading through :class:`~common.storage.LineReader`.
A malformed line in the middle is not guessed around: it raises :class:`SagaLogError`.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.events import Event, InvalidEventError
from common.logger import get_logger
from common.storage import AppendLog, LineReader
from level_4_hard.saga_pattern.errors import SagaLogError

__all__ = ["SagaLog", "SagaState", "SagaStatus", "read_events"]

log = get_logger(__name__)

STARTED = "saga.started"
STEP_STARTED = "saga.step_started"
STEP_RETRYING = "saga.step_retrying"
STEP_COMPLETED = "saga.step_completed"
STEP_FAILED = "saga.step_failed"
COMPENSATION_STARTED = "saga.compensation_started"
COMPENSATION_RETRYING = "saga.compensation_retrying"
STEP_COMPENSATED = "saga.step_compensated"
COMPLETED = "saga.completed"
COMPENSATED = "saga.compensated"
FAILED = "saga.failed"
RESUMED = "saga.resumed"


def read_events(path: str | os.PathLike[str], correlation_id: str | None = None) -> Iterator[Event]:
    """Stream the events of any JSON-lines event file (a saga log, a service ledger, an
    events.log), all or those with ``correlation_id``. A malformed line raises SagaLogError
    with its line number; a torn last line (a writer killed mid-write) is skipped with a
    warning."""
    reader = LineReader(path)
    for number, line in reader:
        try:
            event = Event.from_json(line)
        except InvalidEventError as exc:
            raise SagaLogError(f"{path} line {number}: {exc}") from None
        if correlation_id is None or event.correlation_id == correlation_id:
            yield event
    if reader.torn_tail:
        log.warning("%s: ignored a torn last line (a writer died mid-write)", path)


class SagaStatus(str, enum.Enum):
    """Where a saga is. The last three are where ``run`` ends; the first two are in flight."""

    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value

    @property
    def in_flight(self) -> bool:
        return self in (SagaStatus.RUNNING, SagaStatus.COMPENSATING)


@dataclass
class SagaState:
    """One saga, as its records say; ``apply`` is its only way to change."""

    saga_id: str
    saga: str
    steps: list[str]
    context: dict[str, Any]
    status: SagaStatus = SagaStatus.RUNNING
    completed: list[str] = field(default_factory=list)
    compensated: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)  # compensations to run, in order
    failed_step: str | None = None
    error: str | None = None  # why the forward path failed
    reason: str | None = None  # why the saga is parked (status FAILED)
    in_flight: str | None = None  # a step or compensation started and not finished
    records: int = 0
    resumed: int = 0

    @classmethod
    def from_started(cls, event: Event) -> SagaState:
        if event.name != STARTED or event.correlation_id is None:
            raise SagaLogError(f"a saga begins with {STARTED}, got {event.name}")
        data = event.data
        state = cls(
            saga_id=event.correlation_id,
            saga=data["saga"],
            steps=list(data["steps"]),
            context=dict(data["context"]),
        )
        state.records = 1
        return state

    def apply(self, event: Event) -> None:
        """Fold one record into the state (the transition function of the saga)."""
        name, data = event.name, event.data
        self.records += 1
        if name in (STEP_STARTED, COMPENSATION_STARTED):
            self.in_flight = data["step"]
        elif name == STEP_COMPLETED:
            self.in_flight = None
            self.completed.append(data["step"])
            self.context.update(data.get("output") or {})
        elif name == STEP_FAILED:
            self.in_flight = None
            self.status = SagaStatus.COMPENSATING
            self.failed_step = data["step"]
            self.error = data["error"]
            self.plan = list(data["compensate"])
        elif name == STEP_COMPENSATED:
            self.in_flight = None
            self.compensated.append(data["step"])
            self.context.update(data.get("output") or {})
        elif name == COMPLETED:
            self.status = SagaStatus.COMPLETED
        elif name == COMPENSATED:
            self.status = SagaStatus.COMPENSATED
        elif name == FAILED:
            self.in_flight = None
            self.status = SagaStatus.FAILED
            self.reason = data["reason"]
        elif name == RESUMED:
            self.resumed += 1
            if self.status is SagaStatus.FAILED:
                self.status = SagaStatus.COMPENSATING
                self.reason = None
        elif name not in (STEP_RETRYING, COMPENSATION_RETRYING):
            raise SagaLogError(f"unknown saga record {name!r} for saga {self.saga_id}")

    def pending_compensations(self) -> list[str]:
        return [name for name in self.plan if name not in self.compensated]

    def summary(self) -> dict[str, Any]:
        """The state as a JSON-friendly dict (the CLI's ``status`` prints it)."""
        return {
            "saga_id": self.saga_id,
            "saga": self.saga,
            "status": self.status.value,
            "completed": list(self.completed),
            "compensated": list(self.compensated),
            "failed_step": self.failed_step,
            "error": self.error,
            "reason": self.reason,
            "in_flight": self.in_flight,
        }


class SagaLog:
    """One JSON-lines file of saga records (``saga_logs/<name>.jsonl``), appended in order.

    ``durability``: ``"fsync"`` (default) makes each record survive a power cut before the step
    it announces runs; ``"flush"`` survives the process dying (the crash the tests inflict).
    """

    def __init__(self, path: str | os.PathLike[str], *, durability: str = "fsync") -> None:
        self.path = Path(path)
        self._file = AppendLog(self.path, durability=durability)

    @property
    def durability(self) -> str:
        return self._file.durability

    def append(self, line: bytes) -> None:
        """Append one serialised record (``Event.to_json_bytes()``)."""
        self._file.append(line)

    def read(self, saga_id: str | None = None) -> Iterator[Event]:
        """The records, all or one saga's; a malformed line raises SagaLogError (line number)."""
        return read_events(self.path, saga_id)

    def load(self) -> dict[str, SagaState]:
        """Every saga in the log, folded into its state, in the order they started."""
        sagas: dict[str, SagaState] = {}
        for event in self.read():
            saga_id = event.correlation_id
            try:
                if event.name == STARTED:
                    if saga_id in sagas:
                        raise SagaLogError(f"{self.path}: saga {saga_id} started twice")
                    sagas[saga_id] = SagaState.from_started(event)  # type: ignore[index]
                    continue
                state = sagas.get(saga_id)  # type: ignore[arg-type]
                if state is None:
                    raise SagaLogError(
                        f"{self.path}: record {event.name} for unknown saga {saga_id}"
                    )
                state.apply(event)
            except (KeyError, TypeError) as exc:
                raise SagaLogError(f"{self.path}: bad {event.name} record: {exc!r}") from None
        return sagas

    def close(self) -> None:
        self._file.close()
