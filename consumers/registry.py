"""The composition root: every consumer queue the service runs, built from settings.

Refund follow-ups are gathered here from the modules that create refunds and handed to the
module that settles them (payment), so no consumer module imports another's wiring.
"""

from __future__ import annotations

from consumers import aftersale, catalog, fulfillment, payment, placement, timeouts, unrouted
from consumers.loop import ConsumerSpec
from settings import Settings


def consumer_specs(settings: Settings) -> dict[str, ConsumerSpec]:
    """Queue name -> consumer, in the order `run_consumer.py --list` prints them."""
    followups = {**payment.refund_followups(settings), **aftersale.refund_followups(settings)}
    specs = [
        catalog.spec(settings),
        placement.spec(settings),
        payment.spec(settings, followups),
        fulfillment.spec(settings),
        aftersale.spec(settings),
        timeouts.spec(settings),
        unrouted.spec(settings),
    ]
    return {s.queue: s for s in specs}
