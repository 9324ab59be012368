"""Rows written through insert_rows (COPY) read back exactly as they went in."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import create_engine, select

from store import tables as t
from store.uow import insert_rows
from testing.system import System, unique


def test_awkward_values_survive_the_copy(system: System) -> None:
    engine = create_engine(system.env["DATABASE_URL"])
    ids = [unique("msg") for _ in range(3)]
    bodies = [
        {"text": 'tab\there\nnew line\r\\back\\slash \\N "quoted"', "unicode": "上海 ✓", "n": 10**15},
        {"nested": {"list": [1, None, "x"], "empty": {}}, "null": None},
        None,  # JSON null, as SQLAlchemy writes it
    ]
    at = datetime(2026, 11, 27, 1, 2, 3, 456789, tzinfo=UTC)
    rows = [
        {
            "message_id": mid,
            "exchange": "order.events",
            "routing_key": "test.copy",
            "correlation_id": None if i == 1 else f"c\\{i}\t",
            "body": body,
            "headers": {"x-schema-version": 1},
            "created_at": at,
        }
        for i, (mid, body) in enumerate(zip(ids, bodies, strict=True))
    ]
    rows.append(
        {"message_id": unique("msg"), "exchange": "order.events", "routing_key": "other.columns", "body": {}}
    )
    try:
        with engine.begin() as conn:
            insert_rows(conn, t.outbox, rows)
            # Mark them sent in the same transaction so no relay publishes them.
            conn.execute(
                t.outbox.update()
                .where(t.outbox.c.routing_key.in_(["test.copy", "other.columns"]))
                .values(sent_at=at)
            )
        with engine.connect() as conn:
            got = {
                r.message_id: r
                for r in conn.execute(
                    select(t.outbox).where(t.outbox.c.message_id.in_([r["message_id"] for r in rows]))
                )
            }
    finally:
        engine.dispose()
    assert len(got) == 4
    for i, mid in enumerate(ids):
        assert got[mid].body == bodies[i]
        assert got[mid].correlation_id == rows[i]["correlation_id"]
        assert got[mid].created_at == at
    assert got[rows[3]["message_id"]].correlation_id is None and got[rows[3]["message_id"]].headers is None
