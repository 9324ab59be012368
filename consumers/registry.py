"""Every consumer queue the service runs, built from settings."""

from __future__ import annotations

from consumers import aftersale, catalog, fulfillment, payment, placement, timeouts, unrouted
from consumers.loop import ConsumerSpec
from settings import Settings


def consumer_specs(settings: Settings) -> dict[str, ConsumerSpec]:
    """Queue name -> consumer, in the order `run_consumer.py --list` prints them."""
    specs = [
        catalog.spec(settings),
        placement.spec(settings),
        payment.spec(settings),
        fulfillment.spec(settings),
        aftersale.spec(settings),
        timeouts.spec(settings),
        unrouted.spec(settings),
    ]
    return {s.queue: s for s in specs}
