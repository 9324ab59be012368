"""The records both model tests (tests/model: real broker, and in process) keep of what they sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sent:
    """One command as it went out: enough to send it again with `orders send`."""

    routing_key: str
    body: dict[str, Any]
    message_id: str

    def replayable(self) -> dict[str, Any]:
        return {"routing_key": self.routing_key, "body": self.body, "message_id": self.message_id}


@dataclass(frozen=True)
class Sku:
    sku: str
    price: int
    merchant_id: str
    warehouse_id: str
    stock: int


@dataclass
class PlacedOrder:
    order_no: str
    user_id: str
    order_type: str
    payable: int
    place: Sent  # the order.place that made it
    lines: dict[tuple[str, str], int]  # (sku, warehouse) -> quantity
    children: list[str] = field(default_factory=list)
