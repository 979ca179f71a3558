"""The composition root: the shop, a bus and one saga style over a data directory.

Layout of a data directory (the CLI's ``--data-dir``, one per demo scenario and style)::

    services/order.jsonl        the services' ledgers (their state, and their outboxes)
    services/inventory.jsonl
    services/payment.jsonl
    services/delivery.jsonl
    saga_logs/order.jsonl       orchestration: the saga log (and order.lock, its owner)
    events.log                  choreography: every event the bus carried (Level 1 file log)

``bootstrap(None, ...)`` keeps everything in memory (tests, benchmarks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.base_eventbus import BaseEventBus
from level_1_basic.eventbus import EventBus
from level_4_hard.saga_pattern.choreography import Choreography
from level_4_hard.saga_pattern.clock import Clock
from level_4_hard.saga_pattern.saga_orchestrator import (
    COMPENSATION_RETRY,
    ORDER_RETRY,
    Retry,
    SagaOrchestrator,
    build_order_saga,
)
from level_4_hard.saga_pattern.shop import Shop, build_shop

__all__ = ["STYLES", "SagaApp", "bootstrap"]

STYLES = ("orchestration", "choreography")


@dataclass
class SagaApp:
    """What one process needs to run order sagas in one style; ``close()`` releases it all."""

    style: str
    data_dir: Path | None
    shop: Shop
    bus: BaseEventBus
    orchestrator: SagaOrchestrator | None = None
    choreography: Choreography | None = None

    @property
    def events_log(self) -> Path | None:
        return self.data_dir / "events.log" if self.data_dir and self.choreography else None

    def close(self) -> None:
        if self.orchestrator is not None:
            self.orchestrator.close()
        if self.choreography is not None:
            self.choreography.close()
        if isinstance(self.bus, EventBus):
            self.bus.close()
        self.shop.close()

    def __enter__(self) -> SagaApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bootstrap(
    data_dir: str | os.PathLike[str] | None,
    *,
    style: str = "orchestration",
    clock: Clock | None = None,
    durability: str = "fsync",
    timeout: float | None = 2.0,
    retry: Retry = ORDER_RETRY,
    compensation_retry: Retry = COMPENSATION_RETRY,
    bus: BaseEventBus | None = None,
) -> SagaApp:
    """Build the shop on ``data_dir`` and the order saga in ``style`` over it.

    Orchestration gets a private in-memory bus (its saga log is the durable record);
    choreography a Level 1 EventBus that appends every event to ``events.log``. Pass ``bus``
    to use your own (listeners subscribed to it before this call run before the reactions).
    Raises SagaLogBusy if another live orchestrator owns the data directory's saga log.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    folder = Path(data_dir) if data_dir is not None else None
    shop = build_shop(folder, clock=clock, durability=durability)
    try:
        if style == "orchestration":
            bus = bus if bus is not None else EventBus()
            orchestrator = build_order_saga(
                shop,
                bus=bus,
                log_dir=folder / "saga_logs" if folder is not None else None,
                clock=clock,
                durability=durability,
                retry=retry,
                timeout=timeout,
                compensation_retry=compensation_retry,
            )
            return SagaApp(style, folder, shop, bus, orchestrator=orchestrator)
        if bus is None:
            log_path = folder / "events.log" if folder is not None else None
            bus = EventBus(log_path, durability=durability)
        choreography = Choreography(
            shop,
            bus,
            clock=clock,
            retry=retry,
            timeout=timeout,
            compensation_retry=compensation_retry,
        )
        return SagaApp(style, folder, shop, bus, choreography=choreography)
    except BaseException:
        shop.close()
        raise
