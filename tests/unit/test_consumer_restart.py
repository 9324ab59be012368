"""The consumer loop keeps going after any failure while (re)connecting (no broker: pure control flow)."""

from __future__ import annotations

import threading

import pika.exceptions

from consumers.process import ConsumerProcess
from consumers.unrouted import spec
from settings import Settings


class FlakyConnect(ConsumerProcess):
    """`_consume` fails as pika can while a connection is cut mid-handshake, then stops the loop."""

    def __init__(self, failures: list[Exception]) -> None:
        settings = Settings()
        super().__init__(spec(settings), settings, engine=None, declare_topology=lambda _ch: None)  # type: ignore[arg-type]
        self.failures = failures
        self.attempts = 0

    def _consume(self) -> None:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        self.stop_event.set()


def test_errors_while_connecting_are_retried_not_fatal() -> None:
    # Given a consumer whose first connections fail in three different ways
    process = FlakyConnect(
        [
            pika.exceptions.AMQPConnectionError("refused"),
            ValueError("Expected connected socket, but getpeername() failed"),
            ConnectionResetError(104, "Connection reset by peer"),
        ]
    )
    process.stop_event.wait = lambda timeout=None: False  # type: ignore[method-assign]  # no backoff sleep
    # When it runs
    process._consume_until_stopped()
    # Then it tried again after each one and went on
    assert process.attempts == 4 and process.failures == []


def test_background_jobs_stop_when_the_consumer_stops() -> None:
    # Given a consumer with a background job that runs until told to stop
    seen = threading.Event()

    def job(stop: threading.Event) -> None:
        stop.wait()
        seen.set()

    process = FlakyConnect([])
    process.background = [job]
    # When the consumer stops, the job is told to stop too and the run ends
    assert process.run() == 0
    assert seen.is_set()
