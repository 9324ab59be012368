"""What follows a successful refund, by the refund's source (USER_CANCEL, AFTERSALE, ...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consumers import aftersale, payment
from settings import Settings
from store.uow import UnitOfWork


def refund_followups(settings: Settings) -> dict[str, Callable[[UnitOfWork, Any], None]]:
    """Refund source -> function(uow, refund_row) run in the same transaction as the success."""
    return {**payment.refund_followups(settings), **aftersale.refund_followups(settings)}
