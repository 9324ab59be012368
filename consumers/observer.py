"""What the consumer reports as it goes, to whoever watches (metrics.MetricsObserver in service).

The consumer code calls an `Observer` it is given and never imports metrics; `NullObserver`
is the default, for tests and tools that build a consumer directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from consumers.delivery import Delivery
from consumers.outcomes import Outcome
from consumers.routes import ConsumerSpec


class Observer(Protocol):
    def window_received(self, spec: ConsumerSpec, window: Sequence[Delivery]) -> float:
        """A window was taken from the buffer; returns the start time for `window_acked`."""
        ...

    def window_acked(
        self, spec: ConsumerSpec, window: Sequence[Delivery], outcomes: Sequence[Outcome], started: float
    ) -> None:
        """The window was committed, its copies republished and its messages acked."""
        ...

    def time_handler(self, spec: ConsumerSpec, routing_key: str) -> Callable[[], None]:
        """One message is being applied; call the result when it is done."""
        ...

    def command_refused(self, spec: ConsumerSpec, routing_key: str, reason: str) -> None:
        """The business refused a valid command (a retried window reports it again)."""
        ...

    def transient_retry(self, queue: str) -> None:
        """A window's transaction failed for a transient reason and is tried again."""
        ...

    def consumer_connected(self, queue: str, connected: bool) -> None:
        """The consumer subscribed to its queue (True) or lost the subscription (False)."""
        ...

    def reconnecting(self, component: str, exc: BaseException) -> None:
        """`component`'s connection was lost to `exc`; it connects again after a pause."""
        ...

    def sweeper_failed(self, kind: str) -> None:
        """The backstop sweeper could not apply a lost timer of `kind` (it tries again next pass)."""
        ...


class NullObserver:
    """Reports to nobody."""

    def window_received(self, spec: ConsumerSpec, window: Sequence[Delivery]) -> float:
        return 0.0

    def window_acked(
        self, spec: ConsumerSpec, window: Sequence[Delivery], outcomes: Sequence[Outcome], started: float
    ) -> None:
        pass

    def time_handler(self, spec: ConsumerSpec, routing_key: str) -> Callable[[], None]:
        return _nothing

    def command_refused(self, spec: ConsumerSpec, routing_key: str, reason: str) -> None:
        pass

    def transient_retry(self, queue: str) -> None:
        pass

    def consumer_connected(self, queue: str, connected: bool) -> None:
        pass

    def reconnecting(self, component: str, exc: BaseException) -> None:
        pass

    def sweeper_failed(self, kind: str) -> None:
        pass


def _nothing() -> None:
    pass
