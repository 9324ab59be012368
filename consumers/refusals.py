"""The one path every way of applying a window takes for a refusal, a park or a failure.

A business refusal is announced (logged, reported, answered by the route's `refuse`); a
message that cannot be applied is parked (`command.rejected` written, the message copied to
the parking lot once the window commits); a failure is retried until the retries run out.
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any

from consumers import wire
from consumers.delivery import Delivery
from consumers.events import CommandRejected
from consumers.observer import Observer
from consumers.outcomes import Park
from consumers.routes import ConsumerSpec, Route
from consumers.schemas import Command
from domain.errors import Refusal
from store.envelope import Envelope
from store.uow import UnitOfWork

log = logging.getLogger("consumer")


@dataclass(frozen=True)
class Refusals:
    """Announces refusals and parks messages for one consumer queue."""

    spec: ConsumerSpec
    observer: Observer

    def announce(self, route: Route[Any], command: Command, refusal: Refusal, uow: UnitOfWork) -> None:
        """A valid command the business refused: said so, and answered by the route (written
        through `uow`, which must hold nothing of the refused attempt)."""
        log.info("command refused", extra={"reason": refusal.reason, "detail": refusal.detail})
        self.observer.command_refused(self.spec, uow.envelope.routing_key, refusal.reason)
        if route.refuse is not None:
            route.refuse(command, refusal, uow)
        uow.flush()

    def park(self, uow: UnitOfWork, code: str, reason: str) -> Park:
        """A message that will not be applied: `command.rejected` written through `uow`; the
        message goes to the parking lot once the window commits."""
        log.warning("command rejected", extra={"code": code, "reason": reason})
        uow.emit(command_rejected(uow.envelope, code, reason))
        uow.flush()
        return Park(code, reason)


def retries_left(delivery: Delivery, max_attempts: int) -> bool:
    """Whether a failed message goes to a retry queue again (else it is parked)."""
    return delivery.attempts < max_attempts


def failed_reason(delivery: Delivery, error: str) -> str:
    """The parking reason of a message whose retries ran out."""
    return f"failed {delivery.attempts + 1} times; last error: {error}"


def command_rejected(envelope: Envelope, code: str, reason: str) -> CommandRejected:
    """`command.rejected` for a message: hostile text in its reason is escaped (JSONB refuses NUL)."""
    return CommandRejected(
        message_id=envelope.message_id,
        routing_key=envelope.routing_key,
        code=code,
        reason=wire.printable(reason, 2000, keep=wire.FREE_TEXT_WHITESPACE),
    )


def error_summary(exc: BaseException) -> str:
    """`Type: message` and where it was raised (the last frames), escaped, for a parking reason."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames))
    text = f"{type(exc).__name__}: {exc}" + (f" (at {where})" if where else "")
    return wire.printable(text, 1000)
