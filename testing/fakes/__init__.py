"""In-memory fakes of the store (cosmicpython style): handlers run on them in milliseconds.

`testing.fakes.db` holds the tables (`FakeDatabase`, one list of `Record`s per table of
store/tables.py) and the `VirtualClock`; `testing.fakes.uow.FakeUnitOfWork` implements the
store/ports.py UnitOfWork on it, with one fake repository per store module (each written by the
owner of the SQL repository, with the same semantics); `testing.fakes.service.InProcessService`
applies commands the way a consumer would, and fires timers as the virtual clock passes them.
"""
