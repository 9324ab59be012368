"""When a window will not commit: wait out a database outage, or find the message at fault.

A database outage is waited out with the window held unacked, never spending a message's
retry budget. Anything else that fails the window isolates its messages: each is applied
alone, so only the one at fault goes on to the retry queues and the parking lot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from consumers.applier import WindowApplier
from consumers.delivery import Parsed
from consumers.outcomes import DatabaseDown, Outcome, Park, Retry, WindowFailed
from consumers.refusals import error_summary, failed_reason, retries_left
from domain.errors import RejectCode

log = logging.getLogger("consumer")


def window_outcomes(
    applier: WindowApplier, parsed: list[Parsed], stopping: Callable[[], bool]
) -> list[Outcome] | None:
    """The window's outcomes once committed; None when asked to stop during an outage.

    A transient failure while the database answers, or any exception at all, applies the
    window's messages one by one.
    """
    while True:
        try:
            return applier.apply(parsed)
        except WindowFailed as exc:
            if not applier.database_up():
                if not applier.wait_for_database(stopping):
                    return None
                continue
            log.error(
                "window failed after retries; applying its messages one by one",
                extra={"error": str(exc), "size": len(parsed)},
            )
        except Exception as exc:
            log.exception("window failed; applying its messages one by one", extra={"size": len(parsed)})
            if len(parsed) == 1:
                return [_internal_error(applier, parsed[0], exc)]
        try:
            return [_apply_alone(applier, p) for p in parsed]
        except DatabaseDown:
            if not applier.wait_for_database(stopping):
                return None


def _apply_alone(applier: WindowApplier, parsed: Parsed) -> Outcome:
    try:
        return applier.apply([parsed], retry_seconds=1.0)[0]
    except WindowFailed as exc:
        if not applier.database_up():
            raise DatabaseDown() from exc
        return _exhausted_or_retry(applier, parsed, RejectCode.RETRIES_EXHAUSTED, str(exc))
    except Exception as exc:
        return _internal_error(applier, parsed, exc)


def _internal_error(applier: WindowApplier, parsed: Parsed, exc: Exception) -> Outcome:
    """A message whose own transaction failed outside its handler (a bug, hostile content)."""
    log.error("message failed outside its handler", exc_info=exc)
    return _exhausted_or_retry(applier, parsed, RejectCode.INTERNAL_ERROR, error_summary(exc))


def _exhausted_or_retry(applier: WindowApplier, parsed: Parsed, code: str, error: str) -> Outcome:
    if retries_left(parsed.delivery, applier.max_attempts):
        return Retry(error)
    reason = failed_reason(parsed.delivery, error)
    try:
        return applier.announce_rejection(parsed, code, reason)
    except Exception as db_exc:  # command.rejected cannot be written: park without it
        log.error("could not write command.rejected", extra={"error": repr(db_exc)})
        return Park(code, reason)
