"""The saga package's exception tree: how a step can fail, and what the engine raises.

The split that matters is between a *definite* failure and an *uncertain* one:

* :class:`BusinessError` — the service answered "no" (insufficient funds, out of stock) and did
  nothing. Retrying cannot help; the failed step itself needs no compensation.
* everything else (:class:`TransientError` after the retries ran out, :class:`StepTimeout`, an
  unexpected exception) — the call may or may not have taken effect, so the orchestrator also
  runs the failed step's compensation, which must be idempotent and harmless when there is
  nothing to undo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.events import Event

__all__ = [
    "BusinessError",
    "InsufficientFunds",
    "InsufficientStock",
    "SagaDefinitionError",
    "SagaError",
    "SagaLogBusy",
    "SagaLogError",
    "SagaNotFound",
    "SagaStateError",
    "SagaVoided",
    "ServiceRefused",
    "StepTimeout",
    "TransientError",
]


class SagaError(Exception):
    """Base of every error this package raises on purpose."""


class BusinessError(SagaError):
    """A definite "no" from a service: nothing was done and retrying cannot help.

    ``event`` is the failure event the service recorded in its ledger (``payment.declined``…),
    for the caller to publish; None when the refusal left no record (a late, voided call).
    ``new`` is False when the call repeated an earlier one that failed (the event is old).
    """

    def __init__(self, message: str, event: Event | None = None, *, new: bool = False) -> None:
        super().__init__(message)
        self.event = event
        self.new = new


class InsufficientStock(BusinessError):
    """The inventory cannot cover the order."""


class InsufficientFunds(BusinessError):
    """The customer's balance cannot cover the order total."""


class ServiceRefused(BusinessError):
    """A service refused a request for a business reason (an injected refusal in the demos)."""


class SagaVoided(BusinessError):
    """A late action for a saga that was already compensated or given up: refused, no effect."""


class TransientError(SagaError):
    """A failure that may pass (a dropped connection, a 503): the step is retried with backoff."""


class StepTimeout(SagaError):
    """A step did not answer within its timeout; whether it took effect is unknown."""


class SagaDefinitionError(SagaError, ValueError):
    """The steps given to an orchestrator are not a valid saga, or do not match a logged saga."""


class SagaLogError(SagaError):
    """The saga log cannot be read: a line in the middle is not a valid record."""


class SagaLogBusy(SagaError):
    """Another live orchestrator owns this saga log (one owner at a time)."""


class SagaNotFound(SagaError, LookupError):
    """No saga with that id is known to the orchestrator (nor in its log)."""


class SagaStateError(SagaError):
    """The operation does not apply to the saga in its current state (e.g. retry of a live one)."""
