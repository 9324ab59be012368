"""Engine construction and the classification of transient database errors."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError


def make_engine(database_url: str, pool_size: int = 2, application_name: str = "order-centre") -> Engine:
    """An engine for a consumer process.

    `application_name` shows in pg_stat_activity, and the outbox trigger puts it in its NOTIFY
    payload: a consumer process whose own relay publishes its rows says so by its name
    (publishers.relay.relayed_writer).

    No ping before each use: that is a round trip per transaction, and a connection lost to a
    database restart fails its transaction with a transient error, which is retried on a new one.
    """
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=2,
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "application_name": application_name},
    )


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying as is: lost connection, serialization failure, deadlock, lock timeout."""
    if isinstance(exc, IntegrityError):
        return False
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def database_answers(engine: Engine) -> bool:
    """Whether the database answers at all; False only for a transient failure (down, unreachable)."""
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True
    except Exception as exc:
        if is_transient(exc):
            return False
        raise
