"""PostgreSQL for tests and benchmarks: the admin connection, test databases, plain SQL reads."""

from __future__ import annotations

import os
from typing import Any

import psycopg2
import psycopg2.extras

PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_URL_BASE = os.environ.get("TEST_PG_URL_BASE", "postgresql+psycopg2://postgres@127.0.0.1:5432")


def admin_execute(sql: str) -> None:
    conn = psycopg2.connect(PG_ADMIN_DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def create_database(name: str) -> str:
    """Create an empty database; returns its URL (`testing.system` migrates it)."""
    admin_execute(f'CREATE DATABASE "{name}"')
    return f"{PG_URL_BASE}/{name}"


def drop_database(name: str) -> None:
    admin_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    )
    admin_execute(f'DROP DATABASE IF EXISTS "{name}"')


class Db:
    """Plain SQL against the test database, for Given steps and Then checks."""

    def __init__(self, url: str) -> None:
        self.dsn = url.replace("postgresql+psycopg2://", "postgresql://")

    def query(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        conn = psycopg2.connect(self.dsn)
        try:
            with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                cur.execute(sql, params or None)
                rows = [dict(r) for r in cur.fetchall()] if cur.description else []
            conn.commit()
            return rows
        finally:
            conn.close()

    def one(self, sql: str, *params: Any) -> dict[str, Any]:
        rows = self.query(sql, *params)
        assert len(rows) == 1, f"expected one row, got {len(rows)}: {sql}"
        return rows[0]

    def scalar(self, sql: str, *params: Any) -> Any:
        return next(iter(self.one(sql, *params).values()))
