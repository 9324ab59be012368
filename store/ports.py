"""What a handler may ask of the database: the unit of work and its repositories, as protocols.

Handlers in consumers/ are written against these protocols only. store/ implements them on
PostgreSQL (store/uow.py `UnitOfWork` and the repositories beside it); testing/fakes/
implements them in memory (`FakeUnitOfWork`), so that every handler and timer flow can be
unit-tested in milliseconds. A repository reads and writes; it never decides what to announce:
events are the handler's, built from consumers/events.py and passed to `UnitOfWork.emit`.

A `Record` is one row as read: its columns as attributes (a SQLAlchemy `Row` on PostgreSQL, a
`testing.fakes.db.Record` in memory). Add a method here, to the SQL repository and to its fake
together.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol

from domain.pricing import CouponTerms
from domain.status import AfterSaleAction, AfterSaleStatus, OrderAction, RefundAction
from store.envelope import Envelope
from store.stock import StockMove

# One row of a table: attribute access by column name.
Record = Any


class EventLike(Protocol):
    """An event for order.events (consumers/events.py): its routing key and its JSON body."""

    @property
    def name(self) -> str: ...

    def body(self) -> dict[str, Any]: ...


class UnitOfWork(Protocol):
    """One message's effects, committed together with its dedup row and outbox rows."""

    envelope: Envelope
    now: datetime

    # Repositories; each module of store/ owns one (see the classes below this one).
    @property
    def orders(self) -> Orders: ...
    @property
    def stock(self) -> Stock: ...
    @property
    def refunds(self) -> Refunds: ...
    @property
    def aftersales(self) -> AfterSales: ...
    @property
    def coupons(self) -> Coupons: ...
    @property
    def catalog(self) -> Catalog: ...

    @property
    def correlation_id(self) -> str | None: ...

    def emit(self, event: EventLike) -> None:
        """Announce an event on order.events (published after commit)."""

    def start_timer(self, kind: str, ref: str, delay: timedelta, **extra: Any) -> None:
        """Schedule a durable timer: it fires on the timeouts queue after `delay`."""

    def savepoint(self, envelope: Envelope) -> AbstractContextManager[UnitOfWork]:
        """A unit of work for another message's effects (one timer of a merged timer message),
        in a savepoint of this one: if the block raises, only its effects are rolled back."""

    def record(
        self,
        order_no: str,
        action: str,
        from_status: str | None,
        to_status: str | None,
        actor: str,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Append a line to the order's timeline (the operation log)."""


class TimerWindow(Protocol):
    """A window of due timers of one kind applied together, set-based (TimerKind.fire_many):
    one unit of work per timer (its own envelope: correlation id, timeline message id), all in
    the window's one transaction; their rows and events are written in the order they were made.
    Any unit reaches every row of the window, so set-based reads and writes may use any one."""

    now: datetime
    refs: list[str]  # the timers' refs, each once, in the order they came

    def unit(self, ref: str) -> UnitOfWork:
        """The unit of work of the timer `ref`."""


class AfterSales(Protocol):
    """After-sales and merchant cancellations (store/aftersales.py, testing/fakes/aftersales.py)."""

    def next_number(self) -> str:
        """A new after-sale number."""

    def refundable(self, order: Record) -> int:
        """What may still be refunded on the order: its own remainder (paid, less refunded,
        pending refunds and open claims), at most what remains of its payment once every other
        claim on that payment is counted."""

    def load(self, aftersale_no: str, lock: bool = True) -> Record | None:
        """One after-sale (locked by default), None when unknown."""

    def require(self, aftersale_no: str) -> Record:
        """The after-sale (locked), or Refusal(UNKNOWN_AFTERSALE)."""

    def create(
        self,
        aftersale_no: str,
        order: Record,
        merchant_id: str,
        kind: str,
        amount: int,
        reason: str,
        review_deadline: datetime,
    ) -> None:
        """Insert a new after-sale, PENDING_REVIEW."""

    def move(self, aftersale: Record, action: AfterSaleAction, actor: str, **columns: Any) -> AfterSaleStatus:
        """Apply `action` through the after-sale table (Refusal(INVALID_STATE)) under the version
        guard (ConcurrentUpdate), with other columns; logged on the order's timeline."""

    def open_unrefunded(self, order_nos: list[str]) -> list[Record]:
        """These orders' after-sales still open and not yet behind a refund (locked), by number."""

    def set_refund_no(self, aftersale_no: str, refund_no: str) -> None:
        """Tie an after-sale to the refund that pays it."""

    def load_cancellation(self, order_no: str, lock: bool = True) -> Record | None:
        """The merchant-cancel operation record of a child (locked by default)."""

    def create_cancellation(self, order_no: str, merchant_id: str, reason: str) -> None:
        """Insert the operation record at its first step (REFUND_REQUESTED)."""

    def advance_cancellation(self, order_no: str, step: str, actor: str, **columns: Any) -> None:
        """Move the operation record to `step` (with other columns); logged on the timeline."""


class Orders(Protocol):
    """Orders, their lines and children; status changes under the version guard, logged."""

    def load(self, order_no: str, lock: bool = True) -> Record | None:
        """One order (locked FOR UPDATE by default), or None."""

    def require(self, order_no: str, lock: bool = True) -> Record:
        """The order, or Refusal(UNKNOWN_ORDER)."""

    def children(self, parent_no: str, lock: bool = False) -> list[Record]:
        """A parent's children in order-number order."""

    def items(self, order: Record) -> list[Record]:
        """An order's lines: a parent's own, or the lines a child ships (by line number)."""

    def set_status(
        self,
        order: Record,
        to_status: str,
        action: str,
        actor: str,
        detail: Mapping[str, Any] | None = None,
        **columns: Any,
    ) -> None:
        """New status (and columns) if the version is unchanged, else ConcurrentUpdate; logged."""

    def transition(
        self,
        order: Record,
        action: OrderAction,
        actor: str,
        detail: Mapping[str, Any] | None = None,
        **columns: Any,
    ) -> str:
        """`action` through the state machine (Refusal(INVALID_STATE) when not allowed); the new status."""

    def update(self, order: Record, **columns: Any) -> None:
        """Other columns than the status, under the version guard (ConcurrentUpdate)."""

    def recompute_parent(self, parent_no: str, actor: str) -> str | None:
        """A parent's status derived from its children; the new status if it changed (no event)."""

    def refusal_subject(self, order_no: str | None) -> dict[str, Any]:
        """`order_no`, `user_id`, `request_id` of an order for a refusal event (None when unknown)."""

    def add_refunded(self, order_no: str, amount: int) -> None:
        """Count a succeeded refund against the order it was paid for."""

    def next_number(self, kind: str) -> str:
        """A new business number (store.numbers.ORDER, AFTERSALE, REFUND)."""

    def find_request(self, user_id: str, request_id: str) -> str | None:
        """The parent order a user's request already made, if any."""

    def create(self, order: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """Insert a new order row and its lines (columns as in store/tables.py)."""

    def timeline_has(self, order_no: str, action: str, **detail: str) -> bool:
        """Whether the order's timeline has a line of `action` whose detail has these text values."""

    def insert_child(self, parent: Record, order_no: str, line_nos: list[int], **columns: Any) -> None:
        """Insert a child of a paid parent (buyer, type, receiver, payment and times copied from
        it; status, money, merchant and warehouse in `columns`) shipping the lines `line_nos`."""

    def lock_for_timeout(self, order_nos: list[str]) -> list[Record]:
        """These orders (order_no, user_id, coupon_code, status, parent_no, pay_deadline), locked
        in order-number order: what a window of payment timeouts decides on."""

    def set_status_many(self, order_nos: list[str], to_status: str, **columns: Any) -> None:
        """Write a status (and columns) on orders already locked, no version guard, no timeline."""


class Stock(Protocol):
    """Stock rows and the stock-lock ledger: each line's units move at most once per state."""

    def lock_line(self, sku: str, quantity: int, preferred_warehouse: str) -> str:
        """Lock units in one warehouse (the preferred first); its id, or Refusal(OUT_OF_STOCK)."""

    def record_locks(self, order_no: str, locks: list[tuple[int, StockMove]]) -> None:
        """The ledger rows (LOCKED) of a new order's lines: (line_no, move)."""

    def release(self, order_no: str) -> list[StockMove]:
        """LOCKED -> RELEASED: locked units back to available (idempotent); the lines moved."""

    def release_many(self, order_nos: list[str]) -> dict[str, list[StockMove]]:
        """`release` for many orders at once; the lines moved by order."""

    def deduct(self, order_no: str) -> list[StockMove]:
        """LOCKED -> DEDUCTED: locked units sold, sales counted (idempotent)."""

    def restore(self, order_no: str, child_order_no: str | None = None) -> list[StockMove]:
        """DEDUCTED -> RESTORED (the order's, or one child's lines): back on sale, sales reduced."""

    def assign_child(self, order_no: str, line_no: int, child_order_no: str) -> None:
        """Tie a ledger line to the child order that ships it."""


class Coupons(Protocol):
    """Coupons: AVAILABLE, HELD by a pending order, USED once it is paid."""

    def grant(
        self, code: str, user_id: str, amount: int, min_spend: int, expires_at: datetime
    ) -> tuple[Record, bool]:
        """Grant (a code granted again keeps its first grant); the row and whether it is new."""

    def load_for_order(self, code: str) -> CouponTerms:
        """The coupon's terms (locked); Refusal(COUPON_INVALID) if unknown."""

    def hold(self, code: str, order_no: str) -> None:
        """AVAILABLE -> HELD by the order (nothing when not available)."""

    def use(self, code: str, order_no: str) -> None:
        """HELD by the order -> USED (nothing otherwise)."""

    def give_back(self, code: str | None, order_no: str) -> bool:
        """HELD by the order -> AVAILABLE; True if it was returned."""

    def give_back_many(self, order_nos: list[str]) -> list[str]:
        """`give_back` for every coupon these orders hold; the codes returned."""


class Catalog(Protocol):
    """SKU snapshots (what orders are priced from) and restocking."""

    def upsert_sku(self, values: dict[str, Any]) -> None:
        """Write a SKU's snapshot (sales count kept); its own warehouse gets a stock row."""

    def known(self, sku: str) -> bool:
        """Whether the SKU was ever upserted."""

    def restock(self, sku: str, warehouse_id: str, quantity: int) -> int:
        """Add sellable units to (sku, warehouse), the row made if missing; `available` after."""

    def snapshots(self, skus: list[str]) -> dict[str, Record]:
        """The catalogue rows of these SKUs by SKU (unknown ones absent)."""


class NewRefund(NamedTuple):
    """What `Refunds.request` did: the refund of that source, and whether it was created now
    (False: the source had its refund already, nothing was claimed)."""

    refund_no: str
    created: bool


class NewPayment(NamedTuple):
    """A payment to record (`Refunds.add_payment`): the provider's notification, as received."""

    payment_no: str
    order_no: str
    method: str
    amount: int
    paid_at: datetime
    outcome: str
    raw: dict[str, Any]  # the notification's body


class Refunds(Protocol):
    """Refunds, payments and what remains refundable of each payment (store/refunds.py,
    testing/fakes/refunds.py). Every refund claims its amount from its payment's balance."""

    def claim(self, payment_no: str | None, amount: int) -> int:
        """Take `amount` from the payment's refundable balance; what is left.
        Refusal(AMOUNT_EXCEEDS_REFUNDABLE) when short (or no payment, or amount <= 0)."""

    def give_back(self, payment_no: str | None, amount: int) -> None:
        """Return `amount` to the payment's refundable balance (a failed refund)."""

    def balance(self, payment_no: str | None, lock: bool = False) -> int:
        """What remains refundable of a payment (0 for none)."""

    def promised_claims(self, payment_no: str | None) -> int:
        """After-sale amounts promised on orders of this payment but not yet behind a refund."""

    def request(
        self, order_no: str, amount: int, source: str, source_ref: str, payment_no: str | None
    ) -> NewRefund:
        """The refund of (source, source_ref): the existing one, or a new REQUESTED one with its
        amount claimed from the payment (Refusal(AMOUNT_EXCEEDS_REFUNDABLE) when short)."""

    def load(self, refund_no: str, lock: bool = True) -> Record | None:
        """One refund row (locked by default)."""

    def settle(self, refund: Record, action: RefundAction, provider_refund_no: str | None) -> str:
        """Move a refund through its state machine (Refusal(INVALID_STATE)); a failure gives its
        amount back, a retry or late success after a failure claims it again; the new status."""

    def open_for(self, order_nos: list[str]) -> list[Record]:
        """Refunds of these orders not succeeded yet (REQUESTED or FAILED)."""

    def payment(self, payment_no: str) -> Record | None:
        """The recorded payment of this number, if any."""

    def add_payment(self, payment: NewPayment, once: bool = False) -> bool:
        """Record a payment, all of it refundable; `once`: a known payment number is left as it
        is (False). Without `once` a duplicate is an IntegrityError."""
