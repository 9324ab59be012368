"""The service's invariants, checked on the database (and the parking lot) after a fault.

I1 nothing lost: every command published with a confirm was applied, refused or parked.
I2 nothing applied twice: each order line's stock moved at most once per step; one order per
   (user, request_id); the stock counters equal what the ledger says.
I3 stock conservation: available + locked + sold == restocked, none negative.
I4 money: a cancelled order with a payment has a refund for it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tests.support import System


def parked_ids(system: System) -> set[str]:
    return {p.message_id for p, _ in system.parked() if p.message_id}


def missing_commands(system: System, message_ids: Iterable[str]) -> set[str]:
    """I1: the message ids that are neither in the dedup table nor in the parking lot."""
    wanted = set(message_ids)
    done = {r["message_id"] for r in system.db.query("SELECT message_id FROM processed_messages")}
    return wanted - done - parked_ids(system)


def violations(system: System) -> dict[str, list[dict]]:
    """I2-I4 on the database: the offending rows of each invariant (empty lists when all hold)."""
    db = system.db
    return {
        "I2 ledger matches stock counters": db.query(
            """
            SELECT s.sku, s.warehouse_id, s.locked, s.sold,
                   coalesce(sum(l.quantity) FILTER (WHERE l.state = 'LOCKED'), 0) AS ledger_locked,
                   coalesce(sum(l.quantity) FILTER (WHERE l.state = 'DEDUCTED'), 0) AS ledger_sold
            FROM stock s LEFT JOIN stock_locks l ON l.sku = s.sku AND l.warehouse_id = s.warehouse_id
            GROUP BY s.sku, s.warehouse_id, s.locked, s.sold
            HAVING s.locked <> coalesce(sum(l.quantity) FILTER (WHERE l.state = 'LOCKED'), 0)
                OR s.sold <> coalesce(sum(l.quantity) FILTER (WHERE l.state = 'DEDUCTED'), 0)
            """
        ),
        "I2 one order per request": db.query(
            "SELECT user_id, request_id, count(*) FROM orders WHERE parent_no IS NULL "
            "GROUP BY user_id, request_id HAVING count(*) > 1"
        ),
        "I3 stock conservation": db.query(
            "SELECT * FROM stock WHERE available + locked + sold <> restocked_total "
            "OR available < 0 OR locked < 0 OR sold < 0"
        ),
        "I4 cancelled and paid has a refund": db.query(
            """
            SELECT p.payment_no, p.order_no FROM payments p JOIN orders o ON o.order_no = p.order_no
            WHERE o.status = 'CANCELLED' AND p.outcome <> 'REJECTED'
              AND NOT EXISTS (SELECT 1 FROM refunds r WHERE r.order_no = p.order_no)
            """
        ),
    }


def assert_invariants(system: System, message_ids: Iterable[str]) -> None:
    missing = missing_commands(system, message_ids)
    assert not missing, f"I1: {len(missing)} commands were lost: {sorted(missing)[:5]}"
    broken = {name: rows for name, rows in violations(system).items() if rows}
    assert not broken, f"invariants broken: {broken}"
