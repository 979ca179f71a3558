"""Retry with capped exponential backoff: the one policy object the levels share.

The queued bus retries a failing listener, the RabbitMQ workers reconnect, the saga retries a
transient step and the webhook sender re-posts on 5xx, all with :class:`Backoff`. The delay
after attempt ``n`` (1-based) is ``min(cap, base * factor ** (n - 1))``, optionally with full
jitter, so a crowd of clients does not retry in lockstep.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Backoff", "retry_call"]

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    base: float = 0.1
    factor: float = 2.0
    cap: float = 30.0
    jitter: bool = False

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or self.factor < 1:
            raise ValueError("Backoff needs base >= 0, cap >= 0 and factor >= 1")

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the ``attempt``-th failure (1-based)."""
        if attempt < 1:
            raise ValueError("attempt counts from 1")
        raw = self.base * self.factor ** min(attempt - 1, 64)
        delay = min(self.cap, raw)
        return delay * rng() if self.jitter else delay

    def delays(self) -> Iterator[float]:
        """An endless series of delays: attempt 1, 2, 3, ..."""
        attempt = 1
        while True:
            yield self.delay(attempt)
            attempt += 1


def retry_call(
    fn: Callable[[], T],
    *,
    attempts: int,
    backoff: Backoff = Backoff(),
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Call ``fn`` up to ``attempts`` times; the last failure is raised to the caller."""
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except retry_on as exc:
            if attempt == attempts:
                raise
            delay = backoff.delay(attempt)
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")
