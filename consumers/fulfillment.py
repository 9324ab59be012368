"""Queue order.fulfillment (scaffold: routes are added as the flows land)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consumers.loop import ConsumerSpec, Route
from consumers.timers import TimerKind
from domain.names import COMMANDS_EXCHANGE, FULFILLMENT_QUEUE
from settings import Settings
from store.uow import UnitOfWork


def spec(settings: Settings) -> ConsumerSpec:
    routes: dict[str, Route] = {}
    return ConsumerSpec(FULFILLMENT_QUEUE, routes, tuple((COMMANDS_EXCHANGE, key) for key in routes))


def timer_kinds(settings: Settings) -> list[TimerKind]:
    """The timers this module's flows start."""
    return []


def refund_followups(settings: Settings) -> dict[str, Callable[[UnitOfWork, Any], None]]:
    """What happens after a refund of each source this module creates succeeds."""
    return {}
