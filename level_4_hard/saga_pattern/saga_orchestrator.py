"""Saga orchestration: a central coordinator runs the steps, and undoes them when one fails.

First a general orchestrator, then the order saga built with it (:func:`build_order_saga`).

How a saga runs (:meth:`SagaOrchestrator.run`):

1. ``saga.started`` is logged with the initial context (which always holds ``saga_id``).
2. For each step: ``saga.step_started`` is logged *before* the action runs (write-ahead), then
   the action is called with a copy of the context; a dict it returns is merged into the
   context and logged with ``saga.step_completed``. Transient errors (``Retry.retry_on``) are
   retried with exponential backoff (:class:`common.retry.Backoff`), each retry logged.
3. A step that fails — a business "no", retries spent, a timeout, an unexpected exception —
   ends the forward path: ``saga.step_failed`` records the error and the compensation *plan*:
   the completed steps in reverse order, preceded by the failed step itself unless its failure
   was a definite business "no" (a timed-out or flaky call may have taken effect; its
   compensation is idempotent and harmless when there is nothing to undo).
4. Compensations run in the plan's order, each logged before and after; they are retried
   (by default on any exception). If one still fails, the saga is *parked*: ``saga.failed``
   with the reason, and :meth:`retry` (``python -m level_4_hard.saga_pattern retry <id>``)
   resumes it where it stopped.

Every record is an :class:`~common.events.Event` with ``correlation_id`` = saga id: it is
appended to the saga log (``<log_dir>/<name>.jsonl``) and then published on the bus.

Timeouts: a step with ``timeout`` runs through the clock's ``call`` — on the real clock in a
daemon worker thread that the orchestrator waits for at most ``timeout`` seconds. The step then
counts as failed with an unknown outcome; the thread may still finish later, and its late
result is ignored. Compensation repairs both orders of events: if the late effect landed
first, the compensation undoes it; if the compensation ran first, it left a tombstone and the
service refuses the late call. See :mod:`level_4_hard.saga_pattern.clock`.

Crashes: :meth:`recover` (on a new orchestrator over the same log, after the owner died)
resumes every saga in flight — forward from the first step not logged as completed (a step
that was running when the process died is called again: the services are idempotent by saga
id, so it takes effect once), or on with the compensations. One live orchestrator owns a log
at a time (an exclusive ``flock`` on ``<name>.lock``, released by the kernel when the owner
dies), so recovery never races the process it replaces.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.base_eventbus import BaseEventBus
from common.events import Event, dumps
from common.logger import get_logger
from common.retry import Backoff, retry_call
from common.storage import OwnerLock, OwnerLockBusy
from level_1_basic.eventbus import EventBus
from level_4_hard.saga_pattern import saga_log as records
from level_4_hard.saga_pattern.clock import Clock, SystemClock
from level_4_hard.saga_pattern.errors import (
    BusinessError,
    SagaDefinitionError,
    SagaError,
    SagaLogBusy,
    SagaNotFound,
    SagaStateError,
    StepTimeout,
    TransientError,
)
from level_4_hard.saga_pattern.ledger import Outcome, validate_order
from level_4_hard.saga_pattern.saga_log import SagaLog, SagaState, SagaStatus
from level_4_hard.saga_pattern.shop import Shop

__all__ = [
    "Retry",
    "SagaOrchestrator",
    "SagaResult",
    "SagaStatus",
    "SagaStep",
    "build_order_saga",
    "order_saga_steps",
    "run_order",
]

log = get_logger(__name__)

StepFunction = Callable[[dict[str, Any]], "Mapping[str, Any] | None"]
DEFAULT_BACKOFF = Backoff(base=0.1, factor=2.0, cap=5.0)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Retry:
    """How often to call, and how long to wait between calls (``attempts`` includes the first).

    Only exceptions in ``retry_on`` are retried; anything else fails at once. A timeout
    (StepTimeout) is not retried by default: the step counts as failed.
    """

    attempts: int = 1
    backoff: Backoff = DEFAULT_BACKOFF
    retry_on: tuple[type[BaseException], ...] = (TransientError, ConnectionError)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise SagaDefinitionError(f"attempts must be an integer, got {self.attempts!r}")
        if self.attempts < 1:
            raise SagaDefinitionError(f"attempts must be at least 1, got {self.attempts}")


# Compensations must eventually succeed: any exception is worth another try.
COMPENSATION_RETRY = Retry(attempts=3, retry_on=(Exception,))


@dataclass(frozen=True)
class SagaStep:
    """One step: an ``action(context)`` and the ``compensation(context)`` that undoes it.

    Both take a copy of the saga's context (a dict holding ``saga_id``) and may return a dict
    that is merged into it. The compensation must be idempotent and safe to run when the
    action never took effect (it is also run for a step whose outcome is unknown). A step with
    no compensation (``None``) is skipped when undoing. ``participant`` names who does the work
    in diagrams (default: the step name).
    """

    name: str
    action: StepFunction
    compensation: StepFunction | None = None
    retry: Retry = field(default_factory=Retry)
    timeout: float | None = None
    compensation_retry: Retry = COMPENSATION_RETRY
    participant: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _SAFE_NAME.match(self.name):
            raise SagaDefinitionError(
                f"step name must be 1-128 letters, digits, '_', '.' or '-', got {self.name!r}"
            )
        if not callable(self.action):
            raise SagaDefinitionError(f"step {self.name}: action must be callable")
        if self.compensation is not None and not callable(self.compensation):
            raise SagaDefinitionError(f"step {self.name}: compensation must be callable or None")
        if self.timeout is not None and (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, (int, float))
            or self.timeout <= 0
        ):
            raise SagaDefinitionError(
                f"step {self.name}: timeout must be a positive number, got {self.timeout!r}"
            )
        for policy in (self.retry, self.compensation_retry):
            if not isinstance(policy, Retry):
                raise SagaDefinitionError(f"step {self.name}: retry policies must be Retry")

    @property
    def who(self) -> str:
        return self.participant or self.name


@dataclass(frozen=True)
class SagaResult:
    """How a saga ended (or where it stands): status, steps done and undone, the error."""

    saga_id: str
    status: SagaStatus
    completed: tuple[str, ...]
    compensated: tuple[str, ...]
    error: str | None = None
    failed_step: str | None = None
    reason: str | None = None
    context: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_state(cls, state: SagaState) -> SagaResult:
        return cls(
            saga_id=state.saga_id,
            status=state.status,
            completed=tuple(state.completed),
            compensated=tuple(state.compensated),
            error=state.error,
            failed_step=state.failed_step,
            reason=state.reason,
            context=dict(state.context),
        )

    @property
    def ok(self) -> bool:
        return self.status is SagaStatus.COMPLETED

    def describe(self) -> str:
        """One line for humans: the status and what went wrong."""
        text = f"saga {self.saga_id}: {self.status.value}"
        if self.failed_step:
            text += f" ({self.failed_step} failed: {self.error})"
        if self.compensated:
            text += f"; compensated {', '.join(self.compensated)}"
        if self.reason:
            text += f"; parked: {self.reason}"
        return text


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _kind(exc: BaseException) -> str:
    if isinstance(exc, BusinessError):
        return "business"
    if isinstance(exc, StepTimeout):
        return "timeout"
    if isinstance(exc, (TransientError, ConnectionError)):
        return "transient"
    return "error"


def _check_output(step: str, output: Any) -> dict[str, Any]:
    if output is None:
        return {}
    if not isinstance(output, Mapping):
        raise TypeError(f"step {step} returned {type(output).__name__}; return a dict or None")
    if "saga_id" in output:
        raise ValueError(f"step {step} may not change 'saga_id'")
    output = dict(output)
    dumps(output)  # InvalidEventError (a ValueError) now, not when the record is written
    return output


def _acquire_owner_lock(path: Path) -> OwnerLock:
    """One live orchestrator per saga log; raises SagaLogBusy naming the holder's pid."""
    try:
        return OwnerLock(path).acquire()
    except OwnerLockBusy as exc:
        raise SagaLogBusy(
            f"{path.with_suffix('.jsonl')} is owned by another live orchestrator "
            f"(pid {exc.holder}); one owner at a time"
        ) from None


class SagaOrchestrator:
    """Runs sagas made of :class:`SagaStep` s; see the module docstring for the semantics.

    ``log_dir`` None keeps sagas in memory (no recovery); otherwise the saga log is
    ``<log_dir>/<name>.jsonl`` with ``durability`` ``"fsync"`` (default) or ``"flush"``.
    ``bus`` receives every saga record (default: a private Level 1 EventBus, ``self.bus``).
    ``clock`` measures timeouts and backoff (default: the real clock).

    ``run`` may be called from several threads at once (different saga ids). Error policy: a
    step's failure is never raised — it becomes the saga's result; misuse (an invalid context,
    a saga id already running) raises.
    """

    def __init__(
        self,
        steps: Iterable[SagaStep],
        *,
        name: str = "saga",
        bus: BaseEventBus | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        clock: Clock | None = None,
        durability: str = "fsync",
    ) -> None:
        steps = tuple(steps)
        if not steps:
            raise SagaDefinitionError("a saga needs at least one step")
        for step in steps:
            if not isinstance(step, SagaStep):
                raise SagaDefinitionError(f"steps must be SagaStep, got {type(step).__name__}")
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise SagaDefinitionError(f"step names must be unique, got {names}")
        if not isinstance(name, str) or not _SAFE_NAME.match(name):
            raise SagaDefinitionError(f"saga name must be a safe file name, got {name!r}")
        if durability not in ("flush", "fsync"):
            raise ValueError(
                f"durability must be 'flush' or 'fsync', got {durability!r} (a saga log that "
                "may lose acknowledged records cannot recover its sagas)"
            )
        self.name = name
        self.steps = steps
        self._by_name = {s.name: s for s in steps}
        self.bus: BaseEventBus = bus if bus is not None else EventBus()
        self._own_clock = clock is None
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._lock = threading.Lock()
        self._states: dict[str, SagaState] = {}
        self._active: set[str] = set()
        self._log: SagaLog | None = None
        self._owner: OwnerLock | None = None
        self._closed = False
        if log_dir is not None:
            folder = Path(log_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self._owner = _acquire_owner_lock(folder / f"{name}.lock")
            try:
                self._log = SagaLog(folder / f"{name}.jsonl", durability=durability)
                self._states = self._log.load()
            except BaseException:
                self.close()
                raise

    @property
    def log_path(self) -> Path | None:
        return self._log.path if self._log is not None else None

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.steps]

    # -- running ----------------------------------------------------------------------------
    def run(
        self, context: Mapping[str, Any] | None = None, *, saga_id: str | None = None
    ) -> SagaResult:
        """Run a new saga to its end and return how it ended.

        Starting a saga id that already ended returns its result again (nothing runs twice);
        one that is running, in flight from a dead process, or parked raises SagaStateError.
        A context that is not a JSON-serialisable dict raises before anything is logged.
        """
        if context is None:
            context = {}
        if not isinstance(context, Mapping):
            raise TypeError(f"context must be a dict, got {type(context).__name__}")
        if saga_id is None:
            saga_id = f"{self.name}-{uuid.uuid4().hex[:12]}"
        elif not isinstance(saga_id, str) or not _SAFE_NAME.match(saga_id):
            raise ValueError(f"saga_id must be 1-128 safe characters, got {saga_id!r}")
        with self._lock:
            self._check_open()
            existing = self._states.get(saga_id)
            if saga_id in self._active:
                raise SagaStateError(f"saga {saga_id} is already running")
            if existing is not None and not existing.status.in_flight:
                if existing.status is SagaStatus.FAILED:
                    raise SagaStateError(f"saga {saga_id} is parked (failed): retry it instead")
                return SagaResult.from_state(existing)
            if existing is not None:
                raise SagaStateError(
                    f"saga {saga_id} is in flight from a process that stopped: run recover()"
                )
            self._active.add(saga_id)
        try:
            data = {"saga": self.name, "steps": self.step_names, "context": {**context}}
            data["context"]["saga_id"] = saga_id
            started = Event(records.STARTED, data, correlation_id=saga_id)
            line = started.to_json_bytes()  # InvalidEventError before anything is written
            state = SagaState.from_started(started)
            if self._log is not None:
                self._log.append(line)
            with self._lock:
                self._states[saga_id] = state
            self.bus.publish(started)
            return self._drive(state)
        finally:
            with self._lock:
                self._active.discard(saga_id)

    def retry(self, saga_id: str) -> SagaResult:
        """Resume a parked (failed) saga: run its remaining compensations."""
        with self._lock:
            self._check_open()
            state = self._states.get(saga_id)
            if state is None:
                raise SagaNotFound(f"no saga {saga_id!r} in {self.log_path or 'memory'}")
            if saga_id in self._active:
                raise SagaStateError(f"saga {saga_id} is running")
            if state.status is not SagaStatus.FAILED:
                hint = " (run recover() for a saga in flight)" if state.status.in_flight else ""
                raise SagaStateError(
                    f"saga {saga_id} is {state.status.value}: only a parked (failed) saga "
                    f"can be retried{hint}"
                )
            self._active.add(saga_id)
        try:
            self._emit(state, records.RESUMED, {"by": "retry", "pid": os.getpid()})
            return self._drive(state)
        finally:
            with self._lock:
                self._active.discard(saga_id)

    def recover(self) -> list[SagaResult]:
        """Finish or compensate every saga in flight in the log (after a crash, at start-up).

        Sagas moving forward resume forward (a step that was running is called again and is
        idempotent); sagas compensating carry on compensating. Parked sagas are left to
        :meth:`retry`. A saga whose logged steps differ from this orchestrator's is skipped
        with an error in the log. Returns the results, in the order the sagas started.
        """
        with self._lock:
            self._check_open()
            if self._log is None:
                raise SagaError("recover() needs a saga log: give the orchestrator a log_dir")
            todo = [
                s
                for s in self._states.values()
                if s.status.in_flight and s.saga_id not in self._active
            ]
            self._active.update(s.saga_id for s in todo)
        results = []
        for state in todo:
            try:
                if state.steps != self.step_names:
                    log.error(
                        "saga %s was started with steps %s, this orchestrator has %s: skipped",
                        state.saga_id,
                        state.steps,
                        self.step_names,
                    )
                    continue
                resumed = {
                    "by": "recover",
                    "pid": os.getpid(),
                    "status": state.status.value,
                    "in_flight": state.in_flight,
                }
                self._emit(state, records.RESUMED, resumed)
                log.info("recovering saga %s (%s)", state.saga_id, state.status.value)
                results.append(self._drive(state))
            finally:
                with self._lock:
                    self._active.discard(state.saga_id)
        return results

    # -- reading ------------------------------------------------------------------------------
    def get(self, saga_id: str) -> SagaResult:
        """Where a saga stands (SagaNotFound if unknown)."""
        with self._lock:
            state = self._states.get(saga_id)
            if state is None:
                raise SagaNotFound(f"no saga {saga_id!r} in {self.log_path or 'memory'}")
            return SagaResult.from_state(state)

    def sagas(self) -> list[SagaState]:
        """Every saga known (from the log and run here), in the order they started."""
        with self._lock:
            return list(self._states.values())

    def records(self, saga_id: str | None = None) -> list[Event]:
        """The saga log's records (of one saga); from the bus's history without a log."""
        if self._log is not None:
            return list(self._log.read(saga_id))
        return [
            e
            for e in self.bus.event_log
            if e.name.startswith("saga.") and (saga_id is None or e.correlation_id == saga_id)
        ]

    def _check_open(self) -> None:
        if self._closed:
            raise SagaError(f"{self!r} is closed")

    def close(self) -> None:
        """Close the log and give up ownership; with the default clock, wait (bounded) for
        timed-out calls still running in the background. Idempotent."""
        self._closed = True
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._owner is not None:
            self._owner.release()
            self._owner = None
        if self._own_clock:
            self.clock.close()

    def __enter__(self) -> SagaOrchestrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the engine ---------------------------------------------------------------------------
    def _emit(self, state: SagaState, name: str, data: dict[str, Any]) -> None:
        """Log one record (durably, per ``durability``), apply it, then publish it."""
        event = Event(name, data, correlation_id=state.saga_id)
        if self._log is not None:
            self._log.append(event.to_json_bytes())
        state.apply(event)
        self.bus.publish(event)

    def _drive(self, state: SagaState) -> SagaResult:
        if state.status is SagaStatus.RUNNING:
            self._forward(state)
        if state.status is SagaStatus.COMPENSATING:
            self._compensate(state)
        return SagaResult.from_state(state)

    def _forward(self, state: SagaState) -> None:
        for index, step in enumerate(self.steps):
            if step.name in state.completed:
                continue
            started = {"step": step.name, "index": index, "participant": step.who}
            self._emit(state, records.STEP_STARTED, started)
            try:
                output = self._call(state, step, step.action, step.retry, records.STEP_RETRYING)
            except Exception as exc:
                self._fail(state, step, exc)
                return
            self._emit(state, records.STEP_COMPLETED, {"step": step.name, "output": output})
        self._emit(state, records.COMPLETED, {})

    def _fail(self, state: SagaState, step: SagaStep, exc: Exception) -> None:
        definite = isinstance(exc, BusinessError)
        plan = [] if definite or step.compensation is None else [step.name]
        plan += [n for n in reversed(state.completed) if self._by_name[n].compensation]
        log.warning(
            "saga %s: step %s failed (%s); compensating %s",
            state.saga_id,
            step.name,
            _describe(exc),
            plan,
        )
        failed = {
            "step": step.name,
            "error": _describe(exc),
            "kind": _kind(exc),
            "compensate": plan,
        }
        self._emit(state, records.STEP_FAILED, failed)

    def _compensate(self, state: SagaState) -> None:
        for name in state.pending_compensations():
            step = self._by_name[name]
            self._emit(state, records.COMPENSATION_STARTED, {"step": name, "participant": step.who})
            assert step.compensation is not None
            try:
                output = self._call(
                    state,
                    step,
                    step.compensation,
                    step.compensation_retry,
                    records.COMPENSATION_RETRYING,
                )
            except Exception as exc:
                attempts = step.compensation_retry.attempts
                reason = (
                    f"compensation of {name} failed after {attempts} attempt(s): {_describe(exc)}"
                )
                log.error(
                    "saga %s parked: %s; resume it with %s",
                    state.saga_id,
                    reason,
                    self._retry_hint(state.saga_id),
                )
                self._emit(state, records.FAILED, {"step": name, "reason": reason})
                return
            self._emit(state, records.STEP_COMPENSATED, {"step": name, "output": output})
        compensated = {"failed_step": state.failed_step, "error": state.error}
        self._emit(state, records.COMPENSATED, compensated)

    def _retry_hint(self, saga_id: str) -> str:
        where = ""
        if self._log is not None and self._log.path.parent.name == "saga_logs":
            where = f" --data-dir {self._log.path.parent.parent}"
        return f"`python -m level_4_hard.saga_pattern{where} retry {saga_id}`"

    def _call(
        self, state: SagaState, step: SagaStep, fn: StepFunction, policy: Retry, retrying: str
    ) -> dict[str, Any]:
        """Call ``fn`` with the policy's retries and the step's timeout; returns its output."""

        def once() -> dict[str, Any]:
            context = dict(state.context)
            return _check_output(step.name, self.clock.call(lambda: fn(context), step.timeout))

        def on_retry(attempt: int, exc: BaseException, delay: float) -> None:
            data = {"step": step.name, "attempt": attempt, "error": _describe(exc), "delay": delay}
            self._emit(state, retrying, data)

        return retry_call(
            once,
            attempts=policy.attempts,
            backoff=policy.backoff,
            retry_on=policy.retry_on,
            sleep=self.clock.sleep,
            on_retry=on_retry,
        )

    def __repr__(self) -> str:
        return f"<SagaOrchestrator {self.name!r} steps={self.step_names} log={self.log_path}>"


# -- the order saga ---------------------------------------------------------------------------
ORDER_RETRY = Retry(attempts=3, backoff=Backoff(base=0.05, factor=2.0, cap=1.0))


def order_saga_steps(
    shop: Shop,
    bus: BaseEventBus,
    *,
    retry: Retry = ORDER_RETRY,
    timeout: float | None = 2.0,
    compensation_retry: Retry = COMPENSATION_RETRY,
) -> list[SagaStep]:
    """order -> reserve stock -> reserve funds -> confirm -> delivery, over ``shop``'s services.

    Each step calls one service and publishes the event the service recorded (its outbox) on
    ``bus``; a repeated call (after a crash) publishes nothing again. The context holds
    ``order`` (see :func:`~level_4_hard.saga_pattern.ledger.validate_order`).
    """

    def relay(call: Callable[[], Outcome]) -> Event:
        try:
            outcome = call()
        except BusinessError as exc:
            if exc.new and exc.event is not None:
                bus.publish(exc.event)  # payment.declined, inventory.reservation_failed...
            raise
        if outcome.new:
            bus.publish(outcome.event)
        return outcome.event

    def by_saga(service: object, method: str) -> StepFunction:
        """A step calling ``service.method(saga_id)`` (looked up at each call)."""
        return lambda ctx: relay(lambda: getattr(service, method)(ctx["saga_id"])) and None

    def create_order(ctx: dict[str, Any]) -> None:
        relay(lambda: shop.orders.create(ctx["saga_id"], ctx["order"]))

    def reserve_stock(ctx: dict[str, Any]) -> None:
        relay(lambda: shop.inventory.reserve(ctx["saga_id"], ctx["order"]))

    def reserve_funds(ctx: dict[str, Any]) -> dict[str, Any]:
        event = relay(lambda: shop.payments.reserve_funds(ctx["saga_id"], ctx["order"]))
        return {"amount_held": event.data["amount"]}

    def schedule_delivery(ctx: dict[str, Any]) -> dict[str, Any]:
        event = relay(lambda: shop.deliveries.schedule(ctx["saga_id"], ctx["order"]))
        return {"delivery_id": event.data["delivery_id"]}

    cancel_order = by_saga(shop.orders, "cancel")
    release_stock = by_saga(shop.inventory, "release")
    refund = by_saga(shop.payments, "refund")
    confirm_order = by_saga(shop.orders, "confirm")
    cancel_delivery = by_saga(shop.deliveries, "cancel")

    common = {"retry": retry, "timeout": timeout, "compensation_retry": compensation_retry}
    return [
        SagaStep("create_order", create_order, cancel_order, participant="Order", **common),
        SagaStep("reserve_stock", reserve_stock, release_stock, participant="Inventory", **common),
        SagaStep("reserve_funds", reserve_funds, refund, participant="Payment", **common),
        # No compensation of its own: cancel_order (run last) cancels a confirmed order too.
        SagaStep("confirm_order", confirm_order, None, participant="Order", **common),
        SagaStep(
            "schedule_delivery",
            schedule_delivery,
            cancel_delivery,
            participant="Delivery",
            **common,
        ),
    ]


def build_order_saga(
    shop: Shop,
    *,
    bus: BaseEventBus | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    clock: Clock | None = None,
    durability: str = "fsync",
    retry: Retry = ORDER_RETRY,
    timeout: float | None = 2.0,
    compensation_retry: Retry = COMPENSATION_RETRY,
) -> SagaOrchestrator:
    """The order saga's orchestrator (saga name ``order``), on ``shop``'s services.

    ``clock`` defaults to the shop's clock, so a FakeClock given to :func:`build_shop` drives
    the services' simulated slowness and the orchestrator's timeouts alike (and the shop's
    ``close`` waits for late calls before closing the ledgers).
    """
    bus = bus if bus is not None else EventBus()
    steps = order_saga_steps(
        shop, bus, retry=retry, timeout=timeout, compensation_retry=compensation_retry
    )
    return SagaOrchestrator(
        steps,
        name="order",
        bus=bus,
        log_dir=log_dir,
        clock=clock if clock is not None else shop.clock,
        durability=durability,
    )


def run_order(
    orchestrator: SagaOrchestrator, order: Mapping[str, Any], *, saga_id: str | None = None
) -> SagaResult:
    """Validate ``order`` and run the order saga for it (saga id default: ``order-<order_id>``,
    so placing the same order twice runs it once)."""
    order = validate_order(order)
    return orchestrator.run({"order": order}, saga_id=saga_id or f"order-{order['order_id']}")
