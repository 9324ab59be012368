"""What became of a message once its window committed, and the exceptions that steer a window.

A leaf module: the consumer modules, metrics and tests import it; it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Applied:
    """Applied, or refused with its refusal event written: acked."""


@dataclass(frozen=True)
class Duplicate:
    """Its message_id was already processed: acked, nothing changed."""


@dataclass(frozen=True)
class Park:
    """Rejected (command.rejected written): copied to the parking lot, then acked."""

    code: str
    reason: str


@dataclass(frozen=True)
class Retry:
    """Failed, with retries left: copied to the next retry queue, then acked."""

    error: str


Outcome = Applied | Duplicate | Park | Retry


class NeedsSavepoints(Exception):
    """A message of an optimistic window was refused, parked or failed: redo it with savepoints."""


class DatabaseDown(Exception):
    """The database stopped answering while a window's messages were applied one by one."""


class WindowFailed(Exception):
    """The window's transaction kept failing for a transient reason; nothing of it committed."""
