"""Wait on a condition with a deadline: the tests' and the demos' alternative to sleep()."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout: float = 5.0,
    *,
    interval: float = 0.005,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Raises TimeoutError naming ``message`` when ``timeout`` seconds pass first. The polling
    interval grows from ``interval`` to at most 0.1 s, so short waits stay short.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        result = condition()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            text = message() if callable(message) else message
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {text}")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.1)
