"""The composition root: every consumer queue the service runs, built from settings.

Refund follow-ups are gathered here from the modules that create refunds and handed to the
module that settles them (payment), and timer kinds from the modules that start timers and
handed to the module that fires them (timeouts), so no consumer module imports another's wiring.
"""

from __future__ import annotations

from consumers import aftersale, catalog, fulfillment, payment, placement, timeouts, unrouted
from consumers.routes import ConsumerSpec
from settings import Settings


def consumer_specs(settings: Settings) -> dict[str, ConsumerSpec]:
    """Queue name -> consumer, in the order `run_consumer.py --list` prints them."""
    followups = {**payment.refund_followups(settings), **aftersale.refund_followups(settings)}
    timer_kinds = [
        *payment.timer_kinds(settings),
        *fulfillment.timer_kinds(settings),
        *aftersale.timer_kinds(settings),
    ]
    specs = [
        catalog.spec(settings),
        placement.spec(settings),
        payment.spec(settings, followups),
        fulfillment.spec(settings),
        aftersale.spec(settings),
        timeouts.spec(settings, timer_kinds),
        unrouted.spec(settings),
    ]
    return {s.queue: s for s in specs}
