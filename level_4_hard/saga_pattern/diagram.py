"""A picture of a run: a Mermaid sequence diagram of what actually happened to one saga.

Two sources, one renderer (:func:`render_sequence`):

* an orchestrated saga's records (its saga log, or a bus's history): the orchestrator calls
  each participant, retries, the failure, the compensations in the order they ran, a parked
  saga, and a restart by ``recover()`` after a crash. Domain events found among the records
  (``inventory.reserved``…) are shown as notes beside the participant that recorded them;
* a choreographed saga's events (any events.log, filtered by correlation id): each event is an
  arrow from the service that emitted it to the one that reacts (``consumers``), or to the bus.

Only what is in the records is drawn — a diagram of the run, not of the design. Output is
deterministic for a given list of records (no timestamps), so a known run has a known picture.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.events import Event
from common.storage import atomic_write
from level_4_hard.saga_pattern import saga_log as records
from level_4_hard.saga_pattern.saga_log import read_events

__all__ = ["load_events", "render_sequence", "sequence_lines", "write_markdown"]

ORCHESTRATOR = "Orchestrator"
_MAX_TEXT = 120


def load_events(path: str | os.PathLike[str], correlation_id: str | None = None) -> list[Event]:
    """The events of any JSON-lines event file (saga log, ledger, events.log), by saga id."""
    return list(read_events(path, correlation_id))


def _text(value: Any) -> str:
    """Make text safe inside a Mermaid message: one line, no ';' or '#', bounded length."""
    text = re.sub(r"\s+", " ", str(value)).strip()
    text = text.replace(";", ",").replace("#", "no.")
    if len(text) > _MAX_TEXT:
        text = text[: _MAX_TEXT - 3] + "..."
    return text


def _owner(event_name: str) -> str:
    """The participant that records a domain event: ``inventory.reserved`` -> Inventory."""
    return event_name.split(".", 1)[0].capitalize()


class _Diagram:
    def __init__(self, title: str | None) -> None:
        self.title = title
        self.participants: dict[str, str] = {}  # display name -> mermaid id
        self.body: list[str] = []

    def who(self, name: str) -> str:
        ident = self.participants.get(name)
        if ident is None:
            ident = re.sub(r"\W", "_", name) or "P"
            while ident in self.participants.values():
                ident += "_"
            self.participants[name] = ident
        return ident

    def arrow(self, src: str, arrow: str, dst: str, text: str) -> None:
        self.body.append(f"    {self.who(src)}{arrow}{self.who(dst)}: {_text(text)}")

    def note(self, over: str, text: str, where: str = "over") -> None:
        self.body.append(f"    Note {where} {self.who(over)}: {_text(text)}")

    def render(self) -> str:
        lines = ["sequenceDiagram"]
        if self.title:
            lines.append(f"    title {_text(self.title)}")
        for name, ident in self.participants.items():
            alias = _text(name)
            lines.append(f"    participant {ident}" + (f" as {alias}" if ident != alias else ""))
        return "\n".join(lines + self.body) + "\n"


def _short(output: Mapping[str, Any] | None) -> str:
    if not output:
        return ""
    return " (" + ", ".join(f"{k}={v}" for k, v in output.items()) + ")"


def _render_orchestrated(events: list[Event], title: str | None) -> str:
    d = _Diagram(title)
    d.who(ORCHESTRATOR)
    by_step: dict[str, str] = {}  # step -> participant
    again: str | None = None  # the step that was running when the process died

    def target(data: Mapping[str, Any]) -> str:
        step = data.get("step", "?")
        return by_step.setdefault(step, data.get("participant") or step)

    for event in events:
        name, data = event.name, event.data
        if not name.startswith("saga."):
            d.note(_owner(name), name, where="right of")
        elif name == records.STARTED:
            d.note(ORCHESTRATOR, f"saga {event.correlation_id} started ({data.get('saga')})")
        elif name in (records.STEP_STARTED, records.COMPENSATION_STARTED):
            undo = "undo " if name == records.COMPENSATION_STARTED else ""
            suffix = " (again, after the restart)" if data["step"] == again else ""
            d.arrow(ORCHESTRATOR, "->>", target(data), f"{undo}{data['step']}{suffix}")
            again = None
        elif name in (records.STEP_RETRYING, records.COMPENSATION_RETRYING):
            undo = "undo " if name == records.COMPENSATION_RETRYING else ""
            text = f"{undo}attempt {data['attempt']}: {data['error']}"
            d.arrow(target(data), "--x", ORCHESTRATOR, text)
            d.note(ORCHESTRATOR, f"retry {undo}{data['step']} in {data['delay']:g}s")
        elif name in (records.STEP_COMPLETED, records.STEP_COMPENSATED):
            done = "done" if name == records.STEP_COMPLETED else "undone"
            d.arrow(target(data), "-->>", ORCHESTRATOR, done + _short(data.get("output")))
        elif name == records.STEP_FAILED:
            d.arrow(target(data), "--x", ORCHESTRATOR, f"{data['kind']}: {data['error']}")
            plan = ", ".join(data["compensate"]) or "nothing"
            d.note(ORCHESTRATOR, f"{data['step']} failed: compensate {plan}")
        elif name == records.FAILED:
            d.note(ORCHESTRATOR, f"PARKED (failed): {data['reason']}")
        elif name == records.RESUMED:
            if data.get("by") == "recover":
                d.note(ORCHESTRATOR, "the orchestrator process died here")
                again = data.get("in_flight")
            d.note(ORCHESTRATOR, f"resumed by {data.get('by')} in pid {data.get('pid')}")
        elif name == records.COMPLETED:
            d.note(ORCHESTRATOR, "saga completed")
        elif name == records.COMPENSATED:
            d.note(ORCHESTRATOR, "saga compensated")
    return d.render()


def _render_choreographed(
    events: list[Event], consumers: Mapping[str, str] | None, title: str | None
) -> str:
    d = _Diagram(title)
    for event in events:
        d.who(_owner(event.name))
    if consumers is None:
        d.who("Bus")
    seen: set[str] = set()
    for event in events:
        src = _owner(event.name)
        dst = consumers.get(event.name) if consumers is not None else "Bus"
        text = event.name + (" (published again)" if event.id in seen else "")
        seen.add(event.id)
        if dst is None:
            d.note(src, text)
        else:
            d.arrow(src, "->>", dst, text)
    return d.render()


def render_sequence(
    events: Iterable[Event],
    correlation_id: str | None = None,
    *,
    consumers: Mapping[str, str] | None = None,
    title: str | None = None,
) -> str:
    """The Mermaid ``sequenceDiagram`` text of one saga's events (filtered by
    ``correlation_id`` when given). Orchestrated when ``saga.*`` records are present, else
    choreographed: ``consumers`` maps an event name to the participant that reacts to it
    (events without one become notes; None draws every event to a ``Bus``)."""
    chosen = [e for e in events if correlation_id is None or e.correlation_id == correlation_id]
    if any(e.name.startswith("saga.") for e in chosen):
        return _render_orchestrated(chosen, title)
    return _render_choreographed(chosen, consumers, title)


def _fact(key: str, value: Any) -> str:
    if key == "items" and isinstance(value, list):
        return " ".join(f"{i.get('sku')} x{i.get('qty')}" for i in value if isinstance(i, dict))
    return f"{key}={value}"


def sequence_lines(events: Iterable[Event]) -> list[str]:
    """The events as short text lines (``name: key facts``), for terminals and Markdown."""
    lines = []
    for event in events:
        facts = [
            _fact(k, v)
            for k, v in event.data.items()
            if k not in ("order", "context", "kind", "undone") and v not in (None, "", [], {})
        ]
        lines.append(f"{event.name}: {_text(', '.join(facts))}" if facts else event.name)
    return lines


def write_markdown(
    path: str | os.PathLike[str], title: str, diagram: str, events: Iterable[Event] = ()
) -> Path:
    """Write a Markdown file with the diagram (renders on GitHub) and the events listed."""
    target = Path(path)
    parts = [f"# {title}\n", "```mermaid", diagram.rstrip("\n"), "```\n"]
    listed = sequence_lines(events)
    if listed:
        parts.append("## Events, in order\n")
        parts.extend(f"{n}. `{line}`" for n, line in enumerate(listed, 1))
        parts.append("")
    atomic_write(target, "\n".join(parts).encode(), fsync=False)
    return target
