"""The schema as SQLAlchemy Core tables; alembic migrations in migrations/ create it."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

ID = String(64)
NOW = func.now()


def _ts(name: str, nullable: bool = True) -> Column:  # type: ignore[type-arg]
    return Column(name, DateTime(timezone=True), nullable=nullable)


skus = Table(
    "skus",
    metadata,
    Column("sku", ID, primary_key=True),
    Column("name", String(255), nullable=False),
    Column("unit_price", BigInteger, nullable=False),
    Column("merchant_id", ID, nullable=False),
    Column("warehouse_id", ID, nullable=False),
    Column("sales_count", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
)

stock = Table(
    "stock",
    metadata,
    Column("sku", ID, ForeignKey("skus.sku"), nullable=False),
    Column("warehouse_id", ID, nullable=False),
    Column("available", BigInteger, nullable=False, server_default="0"),
    Column("locked", BigInteger, nullable=False, server_default="0"),
    Column("sold", BigInteger, nullable=False, server_default="0"),
    Column("restocked_total", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("sku", "warehouse_id"),
)

# One row per order line: its lock's life (LOCKED -> RELEASED | DEDUCTED -> RESTORED).
stock_locks = Table(
    "stock_locks",
    metadata,
    Column("order_no", ID, nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("child_order_no", ID, nullable=True),
    Column("sku", ID, nullable=False),
    Column("warehouse_id", ID, nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    PrimaryKeyConstraint("order_no", "line_no"),
    Index("ix_stock_locks_child", "child_order_no"),
)

coupons = Table(
    "coupons",
    metadata,
    Column("code", ID, primary_key=True),
    Column("user_id", ID, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("min_spend", BigInteger, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("state", String(16), nullable=False, server_default="AVAILABLE"),  # AVAILABLE|HELD|USED
    Column("order_no", ID, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
)

orders = Table(
    "orders",
    metadata,
    Column("order_no", ID, primary_key=True),
    Column("parent_no", ID, ForeignKey("orders.order_no"), nullable=True),
    Column("user_id", ID, nullable=False),
    Column("request_id", ID, nullable=True),
    Column("order_type", String(16), nullable=False),  # physical | virtual
    Column("status", String(32), nullable=False),
    Column("merchant_id", ID, nullable=True),  # children only
    Column("warehouse_id", ID, nullable=True),  # children only
    Column("goods_total", BigInteger, nullable=False),
    Column("freight", BigInteger, nullable=False),
    Column("discount_total", BigInteger, nullable=False),
    Column("payable", BigInteger, nullable=False),
    Column("paid_amount", BigInteger, nullable=False, server_default="0"),
    Column("refunded_amount", BigInteger, nullable=False, server_default="0"),
    Column("coupon_code", ID, nullable=True),
    Column("receiver", JSONB, nullable=True),
    Column("payment_no", ID, nullable=True),
    Column("carrier", ID, nullable=True),
    Column("tracking_no", ID, nullable=True),
    Column("logistics_status", String(64), nullable=True),
    _ts("logistics_at"),
    _ts("pay_deadline"),
    Column("version", Integer, nullable=False, server_default="1"),
    Column("placed_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    _ts("paid_at"),
    _ts("shipped_at"),
    _ts("completed_at"),
    _ts("cancelled_at"),
    _ts("closed_at"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    # Children by parent; parents (NULL) are never looked up through it (migration 0004).
    Index("ix_orders_children", "parent_no", postgresql_where=text("parent_no IS NOT NULL")),
    Index(
        "uq_orders_user_request",
        "user_id",
        "request_id",
        unique=True,
        postgresql_where=text("parent_no IS NULL"),
    ),
    Index(
        "ix_orders_unpaid_deadline",
        "pay_deadline",
        postgresql_where=text("status = 'PENDING_PAYMENT'"),
    ),
    Index("ix_orders_shipped", "shipped_at", postgresql_where=text("status = 'SHIPPED'")),
)

order_items = Table(
    "order_items",
    metadata,
    Column("order_no", ID, ForeignKey("orders.order_no"), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("child_order_no", ID, nullable=True),
    Column("sku", ID, nullable=False),
    Column("name", String(255), nullable=False),
    Column("merchant_id", ID, nullable=False),
    Column("warehouse_id", ID, nullable=False),
    Column("unit_price", BigInteger, nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("line_total", BigInteger, nullable=False),
    PrimaryKeyConstraint("order_no", "line_no"),
    Index("ix_order_items_child", "child_order_no"),
)

# The dedup table: a row per (consumer, message_id) applied, written in the same transaction.
processed_messages = Table(
    "processed_messages",
    metadata,
    Column("consumer", String(64), nullable=False),
    Column("message_id", String(255), nullable=False),
    Column("routing_key", String(255), nullable=True),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    PrimaryKeyConstraint("consumer", "message_id"),
)

# Transactional outbox: rows are published by the relay after commit, then marked sent.
outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False, unique=True),
    Column("exchange", String(255), nullable=False),
    Column("routing_key", String(255), nullable=False),
    Column("correlation_id", String(255), nullable=True),
    Column("body", JSONB, nullable=False),
    Column("headers", JSONB, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    _ts("sent_at"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Index("ix_outbox_unsent", "id", postgresql_where=text("sent_at IS NULL")),
)

order_timeline = Table(
    "order_timeline",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("order_no", ID, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("from_status", String(32), nullable=True),
    Column("to_status", String(32), nullable=True),
    Column("detail", JSONB, nullable=True),
    Column("message_id", String(255), nullable=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("ix_order_timeline_order", "order_no", "id"),
)

payments = Table(
    "payments",
    metadata,
    Column("payment_no", ID, primary_key=True),
    Column("order_no", ID, nullable=False),
    Column("method", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("paid_at", DateTime(timezone=True), nullable=False),
    Column("outcome", String(32), nullable=False),  # APPLIED | LATE_REFUNDED | REJECTED
    # What may still be refunded of this payment: every refund claims from it under the row
    # lock, a failed refund gives its amount back (store.refunds).
    Column("refundable", BigInteger, nullable=False, server_default="0"),
    Column("raw", JSONB, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("ix_payments_order", "order_no"),
)

refunds = Table(
    "refunds",
    metadata,
    Column("refund_no", ID, primary_key=True),
    Column("order_no", ID, nullable=False),
    Column("source", String(32), nullable=False),  # USER_CANCEL|LATE_PAYMENT|AFTERSALE|MERCHANT_CANCEL
    Column("source_ref", ID, nullable=False),  # payment_no, aftersale_no, merchant-cancel id, order_no
    Column("payment_no", ID, nullable=True),  # the payment this refund returns money of
    Column("amount", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("provider_refund_no", ID, nullable=True),
    Column("attempts", Integer, nullable=False, server_default="1"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    UniqueConstraint("source", "source_ref", name="uq_refunds_source"),
    Index("ix_refunds_order", "order_no"),
    Index("ix_refunds_payment", "payment_no"),
)

aftersales = Table(
    "aftersales",
    metadata,
    Column("aftersale_no", ID, primary_key=True),
    Column("order_no", ID, nullable=False),
    Column("user_id", ID, nullable=False),
    Column("merchant_id", ID, nullable=False),
    Column("kind", String(16), nullable=False),  # REFUND_ONLY | RETURN_REFUND
    Column("amount", BigInteger, nullable=False),
    Column("reason", Text, nullable=True),
    Column("status", String(32), nullable=False),
    Column("review_deadline", DateTime(timezone=True), nullable=False),
    Column("refund_no", ID, nullable=True),
    Column("reject_reason", Text, nullable=True),
    Column("version", Integer, nullable=False, server_default="1"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("ix_aftersales_order", "order_no"),
    Index("ix_aftersales_review", "review_deadline", postgresql_where=text("status = 'PENDING_REVIEW'")),
)

# The merchant-cancel operation record: one per cancelled child, each step resumable.
merchant_cancellations = Table(
    "merchant_cancellations",
    metadata,
    Column("order_no", ID, primary_key=True),
    Column("merchant_id", ID, nullable=False),
    Column("reason", Text, nullable=True),
    Column("step", String(32), nullable=False),  # REFUND_REQUESTED | REFUNDED | CLOSED
    Column("refund_no", ID, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
)
