"""A window of batchable routes (order.place) in one transaction without savepoints.

Dedup rows are claimed in one statement, the window's reads made once up front
(`Route.prefetch`), stock reservations summed and locked once just before commit, and the
inserts written once per table. A refusal or a park drops only its own message's writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from consumers.delivery import Parsed
from consumers.outcomes import Applied, Duplicate, Outcome, Park
from consumers.strategies import WindowStrategy
from domain.errors import ParkCommand, Refusal
from store.stock import WindowStockLocks
from store.uow import Envelope, UnitOfWork, WriteBuffer, unclaim


@dataclass
class _Batch:
    """What the messages of one batched window share: its transaction, its time, the message
    ids it claimed (and has not applied yet), its stock locks, its write buffer and its routes'
    up-front reads (routing key -> result of `Route.prefetch`)."""

    conn: Connection
    now: datetime
    fresh: set[str]
    stock: WindowStockLocks
    buffer: WriteBuffer
    prefetched: dict[str, object]


@dataclass
class BatchedWindow(WindowStrategy):
    """One transaction, no savepoints: dedup rows claimed together, inserts written together."""

    def suits(self, window: Sequence[Parsed]) -> bool:
        routes = self.spec.routes
        return all(p.rejection is not None or routes[p.delivery.routing_key].batchable for p in window)

    def apply(self, window: Sequence[Parsed]) -> list[Outcome]:
        now = self.clock()
        window_stock = WindowStockLocks()
        buffer = WriteBuffer()
        outcomes: list[Outcome] = []
        parked_ids: list[str] = []
        with self.engine.begin() as conn:
            envelopes, fresh = self._claim(conn, window)
            prefetched = self._prefetch(conn, window, window_stock)
            batch = _Batch(conn, now, fresh, window_stock, buffer, prefetched)
            for parsed, envelope in zip(window, envelopes, strict=True):
                with self._in_hand(envelope):
                    outcome = self._apply_buffered(batch, parsed, envelope)
                if isinstance(outcome, Park) and parsed.rejection is None and envelope.message_id:
                    parked_ids.append(envelope.message_id)
                outcomes.append(outcome)
            buffer.write(conn)
            window_stock.apply(conn)  # last: the hot stock rows stay locked only until commit
            if parked_ids:  # parked commands keep no dedup row, so a replay applies them
                unclaim(conn, self.spec.queue, parked_ids)
        return outcomes

    def _prefetch(
        self, conn: Connection, window: Sequence[Parsed], window_stock: WindowStockLocks
    ) -> dict[str, object]:
        """Each route's up-front reads for its commands in this window (routing key -> result)."""
        commands: dict[str, list[Any]] = {}
        for parsed in window:
            if parsed.command is not None:
                commands.setdefault(parsed.delivery.routing_key, []).append(parsed.command)
        return {
            key: prefetch(conn, cmds, window_stock)
            for key, cmds in commands.items()
            if (prefetch := self.spec.routes[key].prefetch) is not None
        }

    def _apply_buffered(self, batch: _Batch, parsed: Parsed, envelope: Envelope) -> Outcome:
        conn, now, buffer = batch.conn, batch.now, batch.buffer
        own = WriteBuffer()
        uow = UnitOfWork(conn, envelope, now, batch.stock, own)
        uow.prefetched = batch.prefetched.get(envelope.routing_key)
        if parsed.rejection is not None:
            return self._park_buffered(uow, buffer, own, *parsed.rejection)
        if envelope.message_id not in batch.fresh:
            return Duplicate()
        batch.fresh.discard(envelope.message_id)  # a second copy in this window is a duplicate
        route = self.spec.routes[envelope.routing_key]
        assert parsed.command is not None
        try:
            route.handler(parsed.command, uow)
            uow.flush()
        except Refusal as refusal:
            # Drop everything the message did before it was refused: rows, events, stock reservations.
            own, uow.outgoing, uow.stock_reserved = WriteBuffer(), [], {}
            uow.buffer = own
            self.refusals.announce(route, parsed.command, refusal, uow)
        except ParkCommand as park:
            return self._park_buffered(
                UnitOfWork(conn, envelope, now), buffer, WriteBuffer(), park.code, park.reason
            )
        buffer.merge(own)
        batch.stock.keep(uow.stock_reserved)
        return Applied()

    def _park_buffered(
        self, uow: UnitOfWork, buffer: WriteBuffer, own: WriteBuffer, code: str, reason: str
    ) -> Outcome:
        """Park through the window's write buffer: `command.rejected` written with the window."""
        uow.buffer = own
        outcome = self.refusals.park(uow, code, reason)
        buffer.merge(own)
        return outcome
