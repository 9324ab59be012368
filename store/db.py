"""Engine construction and the classification of transient database errors."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError


def make_engine(database_url: str, pool_size: int = 2) -> Engine:
    """An engine whose pooled connections are checked before use (a restarted server is noticed)."""
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=2,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "application_name": "order-centre"},
    )


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying as is: lost connection, serialization failure, deadlock, lock timeout."""
    if isinstance(exc, IntegrityError):
        return False
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
