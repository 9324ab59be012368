"""Queue order.unrouted: commands whose routing key no consumer knows (via the alternate exchange).

It has no routes, so the loop rejects and parks every message with UNKNOWN_ROUTING_KEY.
"""

from __future__ import annotations

from consumers.routes import ConsumerSpec
from domain.names import UNROUTED_EXCHANGE, UNROUTED_QUEUE
from settings import Settings


def spec(settings: Settings) -> ConsumerSpec:
    return ConsumerSpec(UNROUTED_QUEUE, {}, ((UNROUTED_EXCHANGE, ""),))
