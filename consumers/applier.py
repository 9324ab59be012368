"""Applying a window: the fastest transaction that is safe for it, retried while the failure
is transient, and waiting out a database that does not answer at all."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_delay,
    wait_exponential,
    wait_random_exponential,
)

from consumers.batched import BatchedWindow
from consumers.delivery import Parsed
from consumers.observer import NullObserver, Observer
from consumers.outcomes import NeedsSavepoints, Outcome, WindowFailed
from consumers.routes import ConsumerSpec
from consumers.strategies import OptimisticWindow, SavepointPerMessage
from store.db import database_answers, is_transient
from store.stock import StockShortfall

log = logging.getLogger("consumer")


@dataclass
class WindowApplier:
    """Applies a window of parsed messages in one transaction, retried while it fails transiently."""

    engine: Engine
    spec: ConsumerSpec
    max_attempts: int
    retry_seconds: float
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    observer: Observer = field(default_factory=NullObserver)
    batched: BatchedWindow = field(init=False)
    optimistic: OptimisticWindow = field(init=False)
    savepoints: SavepointPerMessage = field(init=False)

    def __post_init__(self) -> None:
        shared = (self.engine, self.spec, self.observer, self.clock)
        self.batched = BatchedWindow(*shared)
        self.optimistic = OptimisticWindow(*shared)
        self.savepoints = SavepointPerMessage(*shared, max_attempts=self.max_attempts)

    def apply(self, window: Sequence[Parsed], retry_seconds: float | None = None) -> list[Outcome]:
        """Outcomes of the window's messages once its transaction committed; WindowFailed if it never did."""
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential(multiplier=0.05, max=5),
            stop=stop_after_delay(self.retry_seconds if retry_seconds is None else retry_seconds),
            sleep=self.sleep,
            reraise=False,
            after=lambda _state: self.observer.transient_retry(self.spec.queue),
            before_sleep=lambda state: log.warning(
                "transient database error, retrying window",
                extra={"attempt": state.attempt_number, "error": repr(state.outcome.exception())}
                if state.outcome
                else {},
            ),
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._apply_window(window)
        except RetryError as exc:
            raise WindowFailed(repr(exc.last_attempt.exception())) from exc
        raise AssertionError("unreachable")

    def _apply_window(self, window: Sequence[Parsed]) -> list[Outcome]:
        """The fastest way that is safe for this window, falling back to a savepoint per message."""
        if len(window) > 1 and self.batched.suits(window):
            try:
                return self.batched.apply(window)
            except StockShortfall:
                pass  # another consumer took the stock this window counted on
            except Exception as exc:
                if is_transient(exc):
                    raise
                # A race on a unique key, or a handler failing: isolate it message by message.
                log.info(
                    "batched window failed; applying it with a savepoint per message",
                    extra={"error": repr(exc)},
                )
            return self.savepoints.apply(window)
        if len(window) > 1 or self.optimistic.set_based(window):
            try:
                return self.optimistic.apply(window)
            except (NeedsSavepoints, StockShortfall) as exc:
                # A message was refused, parked or failed: isolate each one.
                log.info("window redone with a savepoint per message", extra={"why": str(exc)[:200]})
        return self.savepoints.apply(window)

    def announce_rejection(self, parsed: Parsed, code: str, reason: str) -> Outcome:
        """Write command.rejected for a message in a transaction of its own (no retries)."""
        return self.savepoints.park_alone(parsed, code, reason)

    def database_up(self) -> bool:
        """Whether the database answers at all (a window failing for a transient reason may be
        the window's fault, or the database's: only the second is waited out)."""
        return database_answers(self.engine)

    def wait_for_database(self, stopping: Callable[[], bool]) -> bool:
        """Sleep (heartbeats going on) with jittered backoff until the database answers; False
        when asked to stop first. An outage never counts against a message's retry budget."""
        retrying = Retrying(
            retry=retry_if_result(lambda up: up is False),
            wait=wait_random_exponential(multiplier=0.5, max=15),
            stop=lambda _state: stopping(),
            sleep=self.sleep,
            retry_error_callback=lambda _state: False,
            before_sleep=lambda state: log.warning(
                "database unavailable; holding the window unacked",
                extra={"attempt": state.attempt_number, "retry_in_s": round(state.upcoming_sleep, 2)},
            ),
            after=lambda _state: self.observer.transient_retry(self.spec.queue),
        )
        return bool(retrying(self.database_up))
