"""What a unit of work knows about the message being applied."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Envelope:
    """The message being applied: who consumes it, its ids, its routing key and its raw body."""

    consumer: str
    message_id: str | None
    correlation_id: str | None
    routing_key: str
    body: Mapping[str, Any] = field(default_factory=dict)  # the raw JSON object (signatures need it)
