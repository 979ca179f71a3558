"""Level 1's EventBus: synchronous publish/subscribe with wildcards and an event log.

Everything about subscribing and dispatching comes from :class:`common.base_eventbus.BaseEventBus`
(read its docstring for the exact semantics). This level adds one thing: with ``log_path``,
every emitted event is also appended to a file as one JSON line — the start of the durable log
that Level 3 replays.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.base_eventbus import BaseEventBus
from common.events import Event
from common.storage import AppendLog

__all__ = ["EventBus"]


class EventBus(BaseEventBus):
    """A synchronous bus: ``emit`` returns after every matching listener has run.

    ``log_path`` (optional): append every event to this JSON-lines file; ``durability`` is
    ``"none"``, ``"flush"`` (default: survives the process dying) or ``"fsync"``. An event
    whose data cannot be serialised raises InvalidEventError before any listener runs.
    """

    def __init__(
        self,
        log_path: str | os.PathLike[str] | None = None,
        *,
        durability: str = "flush",
        history_limit: int | None = 10_000,
        error_limit: int = 1_000,
    ) -> None:
        super().__init__(history_limit=history_limit, error_limit=error_limit)
        self.log_path = Path(log_path) if log_path is not None else None
        self._file = AppendLog(self.log_path, durability=durability) if self.log_path else None
        if self._file is not None:
            self._sink = self._append_to_file

    def _append_to_file(self, event: Event) -> None:
        # Runs before the event is kept or delivered: an unserialisable event fails here.
        assert self._file is not None
        self._file.append(event.to_json_bytes())

    def close(self) -> None:
        """Flush and close the log file (the bus itself needs no closing)."""
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> EventBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
