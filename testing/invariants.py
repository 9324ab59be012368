"""The service's invariants, checked on the database (and the parking lot) after a fault.

I1 nothing lost: every command published with a confirm was applied, refused or parked.
I2 nothing applied twice: each order line's stock moved at most once per step; one order per
   (user, request_id); the stock counters equal what the ledger says.
I3 stock conservation: available + locked + sold == restocked, none negative.
I4 money: every payment taken is applied or refunded, never kept.
I5 refunds of one payment never add up to more than it.
"""

from __future__ import annotations

from collections.abc import Iterable

from cli.checks import run_checks
from store.db import make_engine
from testing.system import System


def parked_ids(system: System) -> set[str]:
    return {p.message_id for p, _ in system.parked() if p.message_id}


def missing_commands(system: System, message_ids: Iterable[str]) -> set[str]:
    """I1: the message ids that are neither in the dedup table nor in the parking lot."""
    wanted = set(message_ids)
    done = {r["message_id"] for r in system.db.query("SELECT message_id FROM processed_messages")}
    return wanted - done - parked_ids(system)


def violations(system: System) -> dict[str, list[dict]]:
    """I2-I5 on the database, as `orders check` verifies them: the offending rows of each
    check (empty lists when all hold)."""
    engine = make_engine(system.env["DATABASE_URL"])
    try:
        return {f"{r.check.invariant} {r.check.name}": r.offending for r in run_checks(engine)}
    finally:
        engine.dispose()


def assert_invariants(system: System, message_ids: Iterable[str]) -> None:
    missing = missing_commands(system, message_ids)
    assert not missing, f"I1: {len(missing)} commands were lost: {sorted(missing)[:5]}"
    broken = {name: rows for name, rows in violations(system).items() if rows}
    assert not broken, f"invariants broken: {broken}"
