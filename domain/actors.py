"""Who did something, as the order timeline and events name them (one place for every actor)."""

from __future__ import annotations

from typing import Final

SYSTEM: Final = "system"  # the service itself: splits, derived statuses, timers' follow-ups
PAYMENT_PROVIDER: Final = "payment-provider"
REFUND_PROVIDER: Final = "refund-provider"


def user(user_id: str) -> str:
    """A buyer, as `user:ID`."""
    return f"user:{user_id}"


def merchant(merchant_id: str) -> str:
    """A merchant, as `merchant:ID`."""
    return f"merchant:{merchant_id}"
