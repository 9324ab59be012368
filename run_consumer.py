"""Start consumers: `--list` names the queues, `QUEUE...` consumes those, `--all` consumes every one.

One process per queue: with one queue the consumer runs in this process; with several, this
process supervises one child per queue, forwards SIGTERM/SIGINT to them and restarts a child
that dies. Each consumer process also runs an outbox relay (RELAY_ENABLED) and its queue's
periodic job (the backstop sweeper for the timeouts queue).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import logs
import metrics
from consumers.amqp import allow_deep_headers
from consumers.process import ConsumerProcess
from consumers.registry import consumer_specs
from publishers.relay import OutboxRelay, relayed_writer
from settings import Settings, load_settings, require_webhook_secret
from store.db import make_engine
from topology import declarer

log = logging.getLogger("run_consumer")


def _periodic(
    job: Callable[..., None], settings: Settings, engine: object
) -> Callable[[threading.Event], None]:
    def run_periodic(stop: threading.Event) -> None:
        while not stop.wait(settings.sweeper_interval.total_seconds()):
            try:
                job(engine, settings)
            except Exception:
                logging.getLogger("periodic").exception("periodic job failed; will run again")

    return run_periodic


def consume(queue: str, settings: Settings) -> int:
    """Run one queue's consumer in this process until SIGTERM/SIGINT."""
    observer = metrics.MetricsObserver()
    spec = consumer_specs(settings, observer)[queue]
    background: list[Callable[[threading.Event], None]] = []
    if settings.relay_enabled:
        # This process's relay publishes what its consumer writes; other relays leave its small
        # commits to it (the outbox NOTIFY names the writer).
        writer = relayed_writer(os.getpid())
        engine = make_engine(settings.database_url, application_name=writer)
        relay = OutboxRelay(make_engine(settings.database_url, pool_size=1), settings, own_writer=writer)
        background.append(relay.run)
    else:
        engine = make_engine(settings.database_url)
    if spec.periodic is not None:
        background.append(_periodic(spec.periodic, settings, engine))
    if settings.metrics_port is not None:  # /metrics and /healthz, plus the database gauges' sampler
        background.append(metrics.start(settings, queue, make_engine(settings.database_url, pool_size=1)))
    # Everything imported and built so far lives as long as the process: keep it out of the
    # garbage collector's full collections, which otherwise walk it all (about 75 ms a pass on a
    # slow 2-core box, a stall for every message in hand; about 1 ms once frozen).
    gc.freeze()
    process = ConsumerProcess(spec, settings, engine, declarer(settings), background, observer=observer)
    return process.run()


class _Children:
    """`supervise`'s child processes, one per queue, and whether they are being stopped."""

    def __init__(self, queues: list[str]) -> None:
        self.queues = queues
        self.stopping = threading.Event()
        self.by_queue: dict[str, subprocess.Popen[bytes]] = {}
        self.base_port = os.environ.get("METRICS_PORT")

    def spawn(self, queue: str) -> None:
        env = dict(os.environ)
        if self.base_port:  # one metrics port per child: METRICS_PORT, +1, +2, ... in --list order
            env["METRICS_PORT"] = str(int(self.base_port) + self.queues.index(queue))
        self.by_queue[queue] = subprocess.Popen([sys.executable, __file__, queue], env=env)

    def forward(self, signum: int, _frame: object) -> None:
        self.stopping.set()
        for child in self.by_queue.values():
            if child.poll() is None:
                child.send_signal(signum)

    def restart_exited(self) -> None:
        for queue, child in list(self.by_queue.items()):
            code = child.poll()
            if code is not None and not self.stopping.is_set():
                log.error("consumer exited; restarting", extra={"queue": queue, "exit_code": code})
                # A stop asked during the pause must not start a child that never hears of it.
                if self.stopping.wait(1):
                    return
                self.spawn(queue)

    def wait(self) -> int:
        """Wait for every child to exit (a minute each, then it is killed); their status ORed."""
        status = 0
        for child in self.by_queue.values():
            if child.poll() is None:  # one started while the stop was being forwarded hears it too
                child.terminate()
        for child in self.by_queue.values():
            try:
                status |= child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                status = 1
        return status


def supervise(queues: list[str]) -> int:
    """One child process per queue; SIGTERM/SIGINT are passed on; a crashed child is restarted."""
    children = _Children(queues)
    signal.signal(signal.SIGTERM, children.forward)
    signal.signal(signal.SIGINT, children.forward)
    for queue in queues:
        children.spawn(queue)
    while not children.stopping.is_set():
        children.restart_exited()
        children.stopping.wait(0.5)
    return children.wait()



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("queues", nargs="*", metavar="QUEUE")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--list", action="store_true", help="print the queues the service consumes")
    group.add_argument("--all", action="store_true", help="consume every queue --list names")
    args = parser.parse_args(argv)
    settings = load_settings()
    known = list(consumer_specs(settings))
    if args.list:
        print("\n".join(known))
        return 0
    queues = known if args.all else args.queues
    if not queues:
        parser.error("name at least one QUEUE, or use --all or --list")
    unknown = [q for q in queues if q not in known]
    if unknown:
        parser.error(f"unknown queue(s): {', '.join(unknown)} (known: {', '.join(known)})")
    if len(queues) == 1:
        allow_deep_headers()  # a hostile header must reach validation, not stop the queue
        logs.configure(settings.log_level, settings.log_format, queue=queues[0])
        require_webhook_secret(settings)  # unset or a published example: exit 2 naming it
        return consume(queues[0], settings)
    logs.configure(settings.log_level, settings.log_format)
    require_webhook_secret(settings)  # before any child starts: a child refused would be restarted forever
    return supervise(queues)


if __name__ == "__main__":
    sys.exit(main())
