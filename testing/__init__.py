"""Helpers shared by tests/ and bench/: a fresh vhost and database per session, the broker's API,
event listeners, given_* builders.

Nothing here mocks the broker or the database: `testing.system.fresh_system` makes a vhost and a
database for a session and runs the service as `run_consumer.py` processes against them;
`testing.broker` talks to RabbitMQ (management API, queue counts, an event listener),
`testing.database` to PostgreSQL, and `testing.builders` holds the Given/When steps (and the
reads that check them) the integration tests share. `testing.streams`, `testing.invariants` and
`testing.tcp_proxy` serve the fault and shutdown tests. The package sits at the repository root
next to tests/ and bench/, is imported from there (pytest and `python -m bench` run from the
root), and is not part of the installed service.
"""
