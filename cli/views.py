"""Read models of the `orders` command: an order with its family, a SKU's stock, refunds, the report.

Every function takes an open connection and returns plain dicts (JSON-ready after
`cli.format.jsonable`); nothing here writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, func, select, text

from domain.status import OrderStatus, RefundStatus
from store import tables as t

MONEY_COLUMNS = ("goods_total", "freight", "discount_total", "payable", "paid_amount", "refunded_amount")
TIME_COLUMNS = (
    "placed_at",
    "paid_at",
    "shipped_at",
    "completed_at",
    "cancelled_at",
    "closed_at",
    "pay_deadline",
)
ITEM_COLUMNS = (
    "line_no",
    "sku",
    "name",
    "merchant_id",
    "warehouse_id",
    "unit_price",
    "quantity",
    "line_total",
    "child_order_no",
)
PAYMENT_COLUMNS = (
    "payment_no",
    "order_no",
    "method",
    "amount",
    "refundable",
    "paid_at",
    "outcome",
    "received_at",
)
REFUND_COLUMNS = (
    "refund_no",
    "order_no",
    "source",
    "source_ref",
    "payment_no",
    "amount",
    "status",
    "provider_refund_no",
    "attempts",
    "created_at",
    "updated_at",
)
AFTERSALE_COLUMNS = (
    "aftersale_no",
    "order_no",
    "user_id",
    "merchant_id",
    "kind",
    "amount",
    "reason",
    "status",
    "review_deadline",
    "refund_no",
    "reject_reason",
    "created_at",
    "updated_at",
)


def _pick(row: RowMapping, columns: tuple[str, ...]) -> dict[str, Any]:
    return {c: row[c] for c in columns}


def _items(conn: Connection, order: RowMapping) -> list[dict[str, Any]]:
    column = t.order_items.c.child_order_no if order["parent_no"] else t.order_items.c.order_no
    rows = conn.execute(
        select(t.order_items).where(column == order["order_no"]).order_by("line_no")
    ).mappings()
    return [_pick(r, ITEM_COLUMNS) for r in rows]


def _order_fields(order: RowMapping) -> dict[str, Any]:
    return {
        "order_no": order["order_no"],
        "parent_no": order["parent_no"],
        "status": order["status"],
        "order_type": order["order_type"],
        "user_id": order["user_id"],
        "request_id": order["request_id"],
        "merchant_id": order["merchant_id"],
        "warehouse_id": order["warehouse_id"],
        "coupon_code": order["coupon_code"],
        "payment_no": order["payment_no"],
        "version": order["version"],
        **_pick(order, MONEY_COLUMNS),
        "money": _pick(order, MONEY_COLUMNS),
        **_pick(order, TIME_COLUMNS),
        "receiver": order["receiver"],
        "carrier": order["carrier"],
        "tracking_no": order["tracking_no"],
        "logistics_status": order["logistics_status"],
        "logistics_at": order["logistics_at"],
    }


def order_view(conn: Connection, order_no: str) -> dict[str, Any] | None:
    """An order (parent or child) with items, children, payments, refunds, after-sales and timeline."""
    order = conn.execute(select(t.orders).where(t.orders.c.order_no == order_no)).mappings().first()
    if order is None:
        return None
    children = list(
        conn.execute(
            select(t.orders).where(t.orders.c.parent_no == order_no).order_by(t.orders.c.order_no)
        ).mappings()
    )
    family = [order_no, *(c["order_no"] for c in children)]
    if order["parent_no"]:
        family.append(order["parent_no"])

    view = _order_fields(order)
    view["items"] = _items(conn, order)
    view["children"] = [{**_order_fields(c), "items": _items(conn, c)} for c in children]
    view["payments"] = [
        _pick(r, PAYMENT_COLUMNS)
        for r in conn.execute(
            select(t.payments).where(t.payments.c.order_no.in_(family)).order_by(t.payments.c.received_at)
        ).mappings()
    ]
    view["refunds"] = [
        _pick(r, REFUND_COLUMNS)
        for r in conn.execute(
            select(t.refunds).where(t.refunds.c.order_no.in_(family)).order_by(t.refunds.c.created_at)
        ).mappings()
    ]
    view["aftersales"] = [
        _pick(r, AFTERSALE_COLUMNS)
        for r in conn.execute(
            select(t.aftersales)
            .where(t.aftersales.c.order_no.in_(family))
            .order_by(t.aftersales.c.created_at)
        ).mappings()
    ]
    view["timeline"] = [
        {
            "at": r["at"],
            "order_no": r["order_no"],
            "actor": r["actor"],
            "action": r["action"],
            "from_status": r["from_status"],
            "to_status": r["to_status"],
            "detail": r["detail"],
            "message_id": r["message_id"],
        }
        for r in conn.execute(
            select(t.order_timeline)
            .where(t.order_timeline.c.order_no.in_(family))
            .order_by(t.order_timeline.c.at, t.order_timeline.c.id)
        ).mappings()
    ]
    return view


def stock_view(conn: Connection, sku: str) -> dict[str, Any] | None:
    """A SKU's counters in total and per warehouse; `available` never includes locked units."""
    product = conn.execute(select(t.skus).where(t.skus.c.sku == sku)).mappings().first()
    if product is None:
        return None
    warehouses = [
        {
            "warehouse_id": r["warehouse_id"],
            "available": r["available"],
            "locked": r["locked"],
            "sold": r["sold"],
            "restocked_total": r["restocked_total"],
        }
        for r in conn.execute(
            select(t.stock).where(t.stock.c.sku == sku).order_by(t.stock.c.warehouse_id)
        ).mappings()
    ]
    return {
        "sku": sku,
        "name": product["name"],
        "unit_price": product["unit_price"],
        "merchant_id": product["merchant_id"],
        "available": sum(w["available"] for w in warehouses),
        "locked": sum(w["locked"] for w in warehouses),
        "sold": sum(w["sold"] for w in warehouses),
        "sales_count": product["sales_count"],
        "restocked_total": sum(w["restocked_total"] for w in warehouses),
        "warehouses": warehouses,
    }


def refund_list(conn: Connection, failed_only: bool, limit: int) -> list[dict[str, Any]]:
    """Refunds, newest first (only FAILED ones with `failed_only`)."""
    stmt = (
        select(t.refunds).order_by(t.refunds.c.created_at.desc(), t.refunds.c.refund_no.desc()).limit(limit)
    )
    if failed_only:
        stmt = stmt.where(t.refunds.c.status == RefundStatus.FAILED)
    return [_pick(r, REFUND_COLUMNS) for r in conn.execute(stmt).mappings()]


def refund_status(conn: Connection, refund_no: str) -> str | None:
    return conn.execute(select(t.refunds.c.status).where(t.refunds.c.refund_no == refund_no)).scalar()


# ---------------------------------------------------------------------------------------------
# The reconciliation report


def _rows(conn: Connection, sql: str, since: datetime) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(text(sql), {"since": since}).mappings()]


# Payments and refunds belong to the window of the order (or its parent) they are for.
_IN_WINDOW = """
    JOIN orders o ON o.order_no = {alias}.order_no
    LEFT JOIN orders p ON p.order_no = o.parent_no
    WHERE coalesce(p.placed_at, o.placed_at) >= :since
"""


def report(conn: Connection, since: datetime) -> dict[str, Any]:
    """Counts and sums by status, payments against orders, refunds against cancellations and closures."""
    by_status = """
        SELECT status, count(*) AS orders, coalesce(sum(payable), 0) AS payable,
               coalesce(sum(paid_amount), 0) AS paid_amount,
               coalesce(sum(refunded_amount), 0) AS refunded_amount
        FROM orders WHERE placed_at >= :since AND parent_no IS {null} GROUP BY status ORDER BY status
    """
    parents = _rows(conn, by_status.format(null="NULL"), since)
    children = _rows(conn, by_status.format(null="NOT NULL"), since)
    payments = _rows(
        conn,
        "SELECT pm.outcome, count(*) AS payments, coalesce(sum(pm.amount), 0) AS amount FROM payments pm"
        + _IN_WINDOW.format(alias="pm")
        + " GROUP BY pm.outcome ORDER BY pm.outcome",
        since,
    )
    refunds = _rows(
        conn,
        "SELECT r.source, r.status, count(*) AS refunds, coalesce(sum(r.amount), 0) AS amount FROM refunds r"
        + _IN_WINDOW.format(alias="r")
        + " GROUP BY r.source, r.status ORDER BY r.source, r.status",
        since,
    )

    def total(rows: list[dict[str, Any]], column: str) -> int:
        return sum(int(r[column]) for r in rows)

    applied = total([p for p in payments if p["outcome"] == "APPLIED"], "amount")
    late = total([p for p in payments if p["outcome"] != "APPLIED"], "amount")
    late_refunds = total([r for r in refunds if r["source"] == "LATE_PAYMENT"], "amount")
    succeeded = total([r for r in refunds if r["status"] == RefundStatus.SUCCEEDED], "amount")
    refunded = total(parents + children, "refunded_amount")
    cancelled = [r for r in parents if r["status"] == OrderStatus.CANCELLED]
    closed = [r for r in parents + children if r["status"] == OrderStatus.CLOSED]
    reconciliation: list[dict[str, Any]] = [
        {
            "check": "applied payments vs parents' paid_amount",
            "left": applied,
            "right": total(parents, "paid_amount"),
        },
        {"check": "late payments vs LATE_PAYMENT refunds", "left": late, "right": late_refunds},
        {"check": "succeeded refunds vs refunded_amount", "left": succeeded, "right": refunded},
    ]
    for line in reconciliation:
        line["difference"] = line["left"] - line["right"]
    return {
        "since": since,
        "orders": {"parents": parents, "children": children},
        "payments": payments,
        "refunds": refunds,
        "cancellations": {
            "cancelled_orders": total(cancelled, "orders"),
            "closed_orders": total(closed, "orders"),
            "closed_paid_amount": total(closed, "paid_amount"),
            "closed_refunded_amount": total(closed, "refunded_amount"),
        },
        "reconciliation": reconciliation,
    }


ReportRow = tuple[str, str, str, Any]  # (section, key, metric, value)


def _long_form(
    section: str,
    rows: Sequence[Mapping[str, Any]],
    key: Callable[[Mapping[str, Any]], str],
    metrics: tuple[str, ...],
) -> list[ReportRow]:
    """Each of `rows` as one line per metric, keyed by `key(row)`."""
    return [(section, key(row), metric, row[metric]) for row in rows for metric in metrics]


def report_rows(data: dict[str, Any]) -> list[ReportRow]:
    """The report in long form (section, key, metric, value): one CSV shape for every section."""
    out: list[ReportRow] = []
    for kind in ("parents", "children"):
        out += _long_form(
            f"orders.{kind}",
            data["orders"][kind],
            lambda row: row["status"],
            ("orders", "payable", "paid_amount", "refunded_amount"),
        )
    out += _long_form("payments", data["payments"], lambda row: row["outcome"], ("payments", "amount"))
    out += _long_form(
        "refunds", data["refunds"], lambda row: f"{row['source']}/{row['status']}", ("refunds", "amount")
    )
    out += [("cancellations", "all", metric, value) for metric, value in data["cancellations"].items()]
    out += _long_form(
        "reconciliation", data["reconciliation"], lambda row: row["check"], ("left", "right", "difference")
    )
    return out


def unsent_outbox(conn: Connection) -> tuple[int, float | None]:
    """(unsent outbox rows, age in seconds of the oldest one)."""
    row = conn.execute(
        select(func.count(), func.extract("epoch", func.now() - func.min(t.outbox.c.created_at))).where(
            t.outbox.c.sent_at.is_(None)
        )
    ).one()
    return int(row[0]), (float(row[1]) if row[1] is not None else None)


def order_list(conn: Connection, user_id: str | None, status: str | None, limit: int) -> list[dict[str, Any]]:
    """Parent orders, newest first, optionally of one user and/or in one status."""
    rows = conn.execute(
        text(
            "SELECT order_no, user_id, request_id, order_type, status, payable, placed_at, pay_deadline "
            "FROM orders WHERE parent_no IS NULL "
            "AND (CAST(:user_id AS text) IS NULL OR user_id = :user_id) "
            "AND (CAST(:status AS text) IS NULL OR status = :status) "
            "ORDER BY placed_at DESC, order_no DESC LIMIT :limit"
        ),
        {"user_id": user_id, "status": status, "limit": limit},
    ).mappings()
    return [dict(r) for r in rows]
