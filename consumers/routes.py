"""What a consumer queue is made of: a route per routing key, and the queue's spec."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine

from consumers.delivery import Delivery
from consumers.schemas import Command
from domain.errors import Refusal
from domain.names import COMMANDS_EXCHANGE
from settings import Settings
from store.envelope import Envelope
from store.ports import UnitOfWork
from store.stock import WindowStockLocks

# Covariant so that a dict of routes of different commands is a dict of Route[Command]; the
# consumer hands each route only the commands its own schema parsed.
C = TypeVar("C", bound=Command, covariant=True)


@dataclass(frozen=True)
class Route(Generic[C]):
    """How one routing key is handled: its schema, its handler and how a refusal is announced."""

    schema: type[C]
    handler: Callable[[C, UnitOfWork], None]
    refuse: Callable[[C, Refusal, UnitOfWork], None] | None = None
    # The handler reads and checks first and writes only through UnitOfWork.insert: its writes
    # can wait for the window's end, and a refusal needs no savepoint.
    batchable: bool = False
    # For a batched window: reads the whole window needs, up front (available as uow.prefetched).
    prefetch: Callable[[Connection, list[Any], WindowStockLocks | None], object] | None = None
    # Optional set-based version of the handler for a window of fresh messages of this key:
    # (conn, now, [(command, envelope)]), with the same effects as the handler for each.
    apply_window: Callable[[Connection, datetime, list[tuple[C, Envelope]]], None] | None = None


@dataclass(frozen=True)
class ConsumerSpec:
    """One consumer queue: its routes, the bindings that fill it, and an optional periodic job."""

    queue: str
    routes: Mapping[str, Route[Any]]
    # Not given: every routing key of `routes`, bound from the commands exchange.
    bindings: tuple[tuple[str, str], ...] = field(default=())
    periodic: Callable[[Engine, Settings], None] | None = None
    # When a delivery may be applied (None: at once). A delivery that is not due yet waits in
    # the consumer's buffer, unacked, while due ones are applied (see `due_window`).
    due_at: Callable[[Delivery], datetime | None] | None = None
    # This queue's prefetch instead of the PREFETCH setting (windows stay PREFETCH at most).
    prefetch: int | None = None

    def __post_init__(self) -> None:
        if not self.bindings:
            object.__setattr__(self, "bindings", tuple((COMMANDS_EXCHANGE, key) for key in self.routes))
