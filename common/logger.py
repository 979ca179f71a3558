"""Logging for every level: ``get_logger(name)`` and ``configure_logging()``.

Modules only ask for a logger; demos call :func:`configure_logging` in ``main()`` (never at
import). The level comes from ``EDA_LOG_LEVEL`` (default INFO) and ``EDA_LOG_FORMAT=json`` writes
one JSON object per line, for log shippers; both are read from `.env`, then the environment.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

__all__ = ["JsonFormatter", "configure_logging", "get_logger"]

_ROOT = "eda"
_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def get_logger(name: str) -> logging.Logger:
    """A logger under the repository's ``eda`` namespace (``eda.<module>``).

    A module run with ``python -m pkg.mod`` is ``__main__``: it logs under its real name.
    """
    if name == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec is not None else "main"
    if name == _ROOT or name.startswith(_ROOT + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{_ROOT}.{name}")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extras and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(payload, default=str).decode()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record.

    A handler bound to the stream object of the moment it was created keeps writing to a
    stream that may since have been replaced and closed (test runners capture stderr per test).
    """

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; ignore
        pass


def configure_logging(level: str | int | None = None, fmt: str | None = None) -> logging.Logger:
    """Attach one stderr handler to the ``eda`` logger; calling it again replaces the handler."""
    import time

    if level is None or fmt is None:
        from common.config import Settings  # .env, then the environment

        settings = Settings.load()
        level = level or settings.eda_log_level
        fmt = fmt or settings.eda_log_format
    fmt = fmt.lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"EDA_LOG_FORMAT must be 'text' or 'json', got {fmt!r}")
    root = logging.getLogger(_ROOT)
    for handler in list(root.handlers):
        if getattr(handler, "_eda_handler", False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler._eda_handler = True  # type: ignore[attr-defined]
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter(_TEXT_FORMAT, "%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    root.propagate = False
    return root
