"""The composition root: every consumer queue the service runs, built from settings.

Refund follow-ups are gathered here from the modules that create refunds and handed to the
module that settles them (payment), and timer kinds from the modules that start timers and
handed to the module that fires them (timeouts), so no consumer module imports another's wiring.
"""

from __future__ import annotations

from consumers import aftersale, catalog, fulfillment, payment, placement, timeouts, unrouted
from consumers.observer import NullObserver, Observer
from consumers.routes import ConsumerSpec
from consumers.timers import TimerKind
from settings import Settings


def timer_kinds(settings: Settings) -> list[TimerKind]:
    """Every kind of timer the flows start (topology declares a delay queue for each)."""
    return [
        *payment.timer_kinds(settings),
        *fulfillment.timer_kinds(settings),
        *aftersale.timer_kinds(settings),
    ]


def consumer_specs(settings: Settings, observer: Observer | None = None) -> dict[str, ConsumerSpec]:
    """Queue name -> consumer, in the order `run_consumer.py --list` prints them (their periodic
    jobs report to `observer`)."""
    followups = {**payment.refund_followups(settings), **aftersale.refund_followups(settings)}
    specs = [
        catalog.spec(settings),
        placement.spec(settings),
        payment.spec(settings, followups),
        fulfillment.spec(settings),
        aftersale.spec(settings),
        timeouts.spec(settings, timer_kinds(settings), observer or NullObserver()),
        unrouted.spec(settings),
    ]
    return {s.queue: s for s in specs}
