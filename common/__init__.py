"""The shared core of every level: the Event envelope, topic patterns, the base bus, logging,
settings, crash-safe files and retry policy."""

from common.base_eventbus import BaseEventBus, ListenerError, Subscription
from common.events import Event, InvalidEventError
from common.logger import configure_logging, get_logger
from common.patterns import PatternIndex, matches, validate_name, validate_pattern

__all__ = [
    "BaseEventBus",
    "Event",
    "InvalidEventError",
    "ListenerError",
    "PatternIndex",
    "Subscription",
    "configure_logging",
    "get_logger",
    "matches",
    "validate_name",
    "validate_pattern",
]
