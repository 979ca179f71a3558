"""The optional C accelerator, ``common._speedups`` (source: common/_speedups.c), loaded once.

It holds C versions of the hottest paths: creating an Event, validating one read from the
wire, and the base bus's delivery and dispatch loop. The Python code in ``events.py`` and
``base_eventbus.py`` stays the reference and is used when the extension was not built (no C
compiler at install time) or when ``EDA_PURE_PYTHON=1`` is set; tests hold both equal.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["ENABLED", "speedups"]


def _load() -> ModuleType | None:
    if os.environ.get("EDA_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from common import _speedups
    except ImportError:
        return None
    return _speedups


speedups = _load()
ENABLED = speedups is not None
