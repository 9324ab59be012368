"""`orders check`: the invariants I2-I5 of the README, verified on the database.

Each check is one query returning the offending rows; an empty result means the invariant
holds. All queries run in one REPEATABLE READ read-only transaction, so they see one
consistent snapshot even while consumers keep writing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text


@dataclass(frozen=True)
class Check:
    """One invariant check: a name, the invariant it belongs to and the query of offending rows."""

    name: str
    invariant: str
    description: str
    sql: str


@dataclass
class CheckResult:
    check: Check
    offending: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.offending

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.check.name,
            "invariant": self.check.invariant,
            "description": self.check.description,
            "ok": self.ok,
            "offending": self.offending,
        }


CHECKS: tuple[Check, ...] = (
    Check(
        "ledger-matches-stock",
        "I2",
        "per (sku, warehouse): locked = sum of LOCKED ledger lines, sold = sum of DEDUCTED ones",
        """
        WITH ledger AS (
            SELECT sku, warehouse_id,
                   coalesce(sum(quantity) FILTER (WHERE state = 'LOCKED'), 0) AS ledger_locked,
                   coalesce(sum(quantity) FILTER (WHERE state = 'DEDUCTED'), 0) AS ledger_sold
            FROM stock_locks GROUP BY sku, warehouse_id)
        SELECT coalesce(s.sku, l.sku) AS sku, coalesce(s.warehouse_id, l.warehouse_id) AS warehouse_id,
               s.locked, coalesce(l.ledger_locked, 0) AS ledger_locked,
               s.sold, coalesce(l.ledger_sold, 0) AS ledger_sold
        FROM stock s FULL JOIN ledger l ON l.sku = s.sku AND l.warehouse_id = s.warehouse_id
        WHERE coalesce(s.locked, 0) <> coalesce(l.ledger_locked, 0)
           OR coalesce(s.sold, 0) <> coalesce(l.ledger_sold, 0)
        ORDER BY 1, 2
        """,
    ),
    Check(
        "one-order-per-request",
        "I2",
        "one parent order per (user_id, request_id) (one payment per payment_no is the payments PK)",
        """
        SELECT user_id, request_id, count(*) AS orders, array_agg(order_no ORDER BY order_no) AS order_nos
        FROM orders WHERE parent_no IS NULL AND request_id IS NOT NULL
        GROUP BY user_id, request_id HAVING count(*) > 1 ORDER BY 1, 2
        """,
    ),
    Check(
        "stock-conserved",
        "I3",
        "per (sku, warehouse): available + locked + sold = restocked_total, none negative",
        """
        SELECT sku, warehouse_id, available, locked, sold, restocked_total,
               available + locked + sold - restocked_total AS difference
        FROM stock
        WHERE available + locked + sold <> restocked_total OR available < 0 OR locked < 0 OR sold < 0
           OR restocked_total < 0
        ORDER BY 1, 2
        """,
    ),
    Check(
        "shipped-units-stay-sold",
        "I3",
        "every order line of a child that ever shipped is still DEDUCTED (never released or restored)",
        """
        SELECT sl.order_no, sl.line_no, sl.child_order_no, sl.sku, sl.warehouse_id, sl.state
        FROM stock_locks sl JOIN orders c ON c.order_no = sl.child_order_no
        WHERE c.shipped_at IS NOT NULL AND sl.state <> 'DEDUCTED'
        ORDER BY 1, 2
        """,
    ),
    Check(
        "unapplied-payment-refunded",
        "I4",
        "every payment that did not pay its order (late, or refused for its amount) is wholly behind "
        "refunds that have not failed: no money kept",
        """
        SELECT pm.payment_no, pm.order_no, pm.amount, pm.outcome, pm.refundable
        FROM payments pm
        WHERE pm.outcome <> 'APPLIED' AND pm.refundable <> 0
        ORDER BY 1
        """,
    ),
    Check(
        "closed-order-payment-refunded",
        "I4",
        "the payment of every CLOSED parent is wholly behind refunds that have not failed",
        """
        SELECT o.order_no, o.status, pm.payment_no, pm.amount, pm.refundable
        FROM orders o JOIN payments pm ON pm.payment_no = o.payment_no
        WHERE o.parent_no IS NULL AND o.status = 'CLOSED' AND pm.refundable <> 0
        ORDER BY 1
        """,
    ),
    Check(
        "refunds-within-payment",
        "I5",
        "per payment, across the parent, its children and every flow: refunds not failed add up to "
        "at most the payment, and its refundable balance is exactly what they leave",
        """
        WITH claimed AS (
            SELECT payment_no, coalesce(sum(amount) FILTER (WHERE status <> 'FAILED'), 0) AS claimed
            FROM refunds WHERE payment_no IS NOT NULL GROUP BY payment_no)
        SELECT pm.payment_no, pm.order_no, pm.amount, coalesce(c.claimed, 0) AS claimed, pm.refundable
        FROM payments pm LEFT JOIN claimed c ON c.payment_no = pm.payment_no
        WHERE coalesce(c.claimed, 0) > pm.amount OR pm.refundable < 0
           OR pm.refundable <> pm.amount - coalesce(c.claimed, 0)
        ORDER BY 1
        """,
    ),
    Check(
        "refunds-name-a-payment",
        "I5",
        "every refund names a recorded payment it returns money of",
        """
        SELECT r.refund_no, r.order_no, r.source, r.amount, r.payment_no FROM refunds r
        WHERE NOT EXISTS (SELECT 1 FROM payments pm WHERE pm.payment_no = r.payment_no)
        ORDER BY 1
        """,
    ),
    Check(
        "late-payment-refunded",
        "I4",
        "every payment of a CANCELLED order has a refund of it (LATE_PAYMENT, or PAYMENT_REJECTED)",
        """
        SELECT pm.payment_no, pm.order_no, pm.amount, pm.outcome
        FROM payments pm JOIN orders o ON o.order_no = pm.order_no
        WHERE o.status = 'CANCELLED' AND NOT EXISTS (
            SELECT 1 FROM refunds r
            WHERE r.source IN ('LATE_PAYMENT', 'PAYMENT_REJECTED') AND r.source_ref = pm.payment_no)
        ORDER BY 1
        """,
    ),
    Check(
        "closed-order-refunded",
        "I4",
        "every CLOSED order with paid_amount > 0 has a refund (on itself, its parent or a child)",
        """
        SELECT o.order_no, o.parent_no, o.paid_amount, o.refunded_amount
        FROM orders o
        WHERE o.status = 'CLOSED' AND o.paid_amount > 0 AND NOT EXISTS (
            SELECT 1 FROM refunds r
            WHERE r.order_no = o.order_no OR r.order_no = o.parent_no
               OR r.order_no IN (SELECT c.order_no FROM orders c WHERE c.parent_no = o.order_no))
        ORDER BY 1
        """,
    ),
    Check(
        "refunded-within-paid",
        "I4",
        "refunded_amount <= paid_amount on every order",
        """
        SELECT order_no, parent_no, status, paid_amount, refunded_amount FROM orders
        WHERE refunded_amount > paid_amount ORDER BY 1
        """,
    ),
)


def run_checks(engine: Engine, checks: tuple[Check, ...] = CHECKS) -> list[CheckResult]:
    """Run every check on one consistent snapshot of the database."""
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        conn.execute(text("SET TRANSACTION READ ONLY"))
        results = [
            CheckResult(check, [dict(r) for r in conn.execute(text(check.sql)).mappings()])
            for check in checks
        ]
        conn.rollback()
    return results
