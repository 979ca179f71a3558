"""The optional C accelerators, loaded once: ``common._speedups`` (source: common/_speedups.c).

It holds C versions of the hottest paths: creating an Event, validating one read from the
wire, and the base bus's delivery and dispatch loop. The Python code in ``events.py`` and
``base_eventbus.py`` stays the reference and is used when the extension was not built (no C
compiler at install time) or when ``EDA_PURE_PYTHON=1`` is set; tests hold both equal.
:func:`load` applies the same rule to the other optional extension,
``level_4_hard.file_kafka._appender``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["ENABLED", "load", "speedups"]


def load(module: str) -> ModuleType | None:
    """The optional C extension ``module``, or None when it was not built or is turned off."""
    if os.environ.get("EDA_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


speedups = load("common._speedups")
ENABLED = speedups is not None
