"""A tiny, dependency-free TCP proxy for fault-injection tests.

Put it between the service and RabbitMQ / PostgreSQL on loopback, then call :meth:`TcpProxy.cut` to
simulate a network failure (every proxied connection is reset on both sides and new connections are
dropped) and :meth:`TcpProxy.restore` to heal the network again::

    with TcpProxy("127.0.0.1", 5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        ...                      # start consumers against ``url``
        proxy.cut()              # consumers see ConnectionResetError / StreamLostError
        proxy.restore()          # consumers can reconnect

Design: a single background thread runs a :mod:`selectors` loop (no busy polling) that accepts clients,
opens a non-blocking connection to the target per client and shovels bytes both ways with bounded
buffers (back-pressure: a side is not read while its outgoing buffer is full). Half-close is forwarded:
when one side sends FIN, the proxy sends FIN to the other side once the buffered bytes are delivered.
Any socket error on either side resets the whole proxied connection. Control calls from other threads
(``cut``/``restore``/``stop``) take a lock and wake the loop through a socketpair; ``cut`` blocks until
the loop has actually reset every connection, so callers can rely on it having happened on return.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
import threading
from types import TracebackType
from typing import Any, Literal

__all__ = ["TcpProxy"]

_CHUNK_SIZE = 64 * 1024
_MAX_BUFFER = 256 * 1024
_CONTROL_TIMEOUT_S = 5.0
# SO_LINGER on, timeout 0: close() discards unsent data and sends RST instead of FIN.
_LINGER_RST = struct.pack("ii", 1, 0)
_CONNECT_IN_PROGRESS = frozenset({0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN})

_Role = Literal["client", "upstream"]
_LISTENER = "listener"
_WAKER = "waker"


def _reset_and_close(sock: socket.socket) -> None:
    """Close ``sock`` so that its peer sees a connection reset (RST) rather than an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    with contextlib.suppress(OSError):
        sock.close()


def _set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle so small protocol frames (heartbeats, acks) are not delayed by the proxy."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Connection:
    """State of one proxied connection: a client socket, its upstream socket and two byte buffers."""

    __slots__ = (
        "client",
        "client_eof",
        "client_shut",
        "closed",
        "connecting",
        "registered",
        "to_client",
        "to_upstream",
        "upstream",
        "upstream_eof",
        "upstream_shut",
    )

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.connecting = True
        self.to_upstream = bytearray()
        self.to_client = bytearray()
        self.client_eof = False  # the client sent FIN
        self.upstream_eof = False  # the upstream sent FIN
        self.client_shut = False  # we sent FIN to the client
        self.upstream_shut = False  # we sent FIN to the upstream
        self.registered: dict[_Role, int] = {"client": 0, "upstream": 0}
        self.closed = False

    def sock(self, role: _Role) -> socket.socket:
        """Return the socket playing ``role``."""
        return self.client if role == "client" else self.upstream

    def interest(self, role: _Role) -> int:
        """Return the selector events the loop currently needs for the socket playing ``role``."""
        if role == "upstream" and self.connecting:
            return selectors.EVENT_WRITE  # writable == connect() finished (successfully or not)
        if role == "client":
            can_read = not self.client_eof and len(self.to_upstream) < _MAX_BUFFER
            must_write = bool(self.to_client)
        else:
            can_read = not self.upstream_eof and len(self.to_client) < _MAX_BUFFER
            must_write = bool(self.to_upstream)
        return (selectors.EVENT_READ if can_read else 0) | (selectors.EVENT_WRITE if must_write else 0)

    @property
    def finished(self) -> bool:
        """True once both directions have been half-closed and fully delivered."""
        return self.client_shut and self.upstream_shut


class TcpProxy:
    """A controllable TCP forwarder from ``listen_host:listen_port`` to ``target_host:target_port``.

    All public methods are thread-safe. ``listen_port=0`` picks a free ephemeral port; read it from
    :attr:`port` after :meth:`start`.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        """Configure the proxy; nothing is bound until :meth:`start`."""
        self._target_host = target_host
        self._target_port = target_port
        self._listen_host = listen_host
        self._listen_port = listen_port

        self._cond = threading.Condition()  # guards every field below that other threads touch
        self._refusing = False
        self._stopping = False
        self._running = False
        self._cut_requested = 0
        self._cut_done = 0
        self._conns: set[_Connection] = set()
        self._thread: threading.Thread | None = None
        self._port: int | None = None

        # Owned by the loop thread once started.
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._waker_r: socket.socket | None = None
        self._waker_w: socket.socket | None = None
        self._target_addr: tuple[socket.AddressFamily, socket.SocketKind, int, tuple[Any, ...]]

    # ------------------------------------------------------------------ public API

    def start(self) -> TcpProxy:
        """Bind the listening socket, start the forwarding thread and return ``self``."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("TcpProxy already started")
            family, type_, proto, _, addr = socket.getaddrinfo(
                self._target_host, self._target_port, type=socket.SOCK_STREAM
            )[0]
            self._target_addr = (family, type_, proto, addr)

            listen_info = socket.getaddrinfo(self._listen_host, self._listen_port, type=socket.SOCK_STREAM)
            listen_family = listen_info[0][0]
            listener = socket.create_server(
                (self._listen_host, self._listen_port), family=listen_family, backlog=128
            )
            listener.setblocking(False)
            waker_r, waker_w = socket.socketpair()
            waker_r.setblocking(False)
            waker_w.setblocking(False)
            selector = selectors.DefaultSelector()
            selector.register(listener, selectors.EVENT_READ, _LISTENER)
            selector.register(waker_r, selectors.EVENT_READ, _WAKER)

            self._listener, self._selector = listener, selector
            self._waker_r, self._waker_w = waker_r, waker_w
            self._port = int(listener.getsockname()[1])
            self._running = True
            self._thread = threading.Thread(
                target=self._run,
                name=f"TcpProxy-{self._port}->{self._target_host}:{self._target_port}",
                daemon=True,
            )
            self._thread.start()
        return self

    @property
    def port(self) -> int:
        """The port the proxy listens on (resolved after :meth:`start` when ``listen_port`` was 0)."""
        if self._port is None:
            raise RuntimeError("TcpProxy not started")
        return self._port

    @property
    def connections(self) -> int:
        """Number of live proxied connections (including ones still connecting upstream)."""
        with self._cond:
            return len(self._conns)

    @property
    def is_cut(self) -> bool:
        """True between :meth:`cut` and :meth:`restore`."""
        with self._cond:
            return self._refusing

    def cut(self) -> None:
        """Simulate a network failure.

        Resets every open proxied connection on both sides (client and target see RST) and makes the
        proxy reset new connections immediately after accepting them, until :meth:`restore`. Blocks
        until the forwarding thread has reset all open connections.
        """
        with self._cond:
            self._refusing = True
            if not self._running:
                return
            self._cut_requested += 1
            ticket = self._cut_requested
            self._wake()
            if threading.current_thread() is self._thread:
                return  # cannot wait for ourselves; the loop handles it after this callback
            done = self._cond.wait_for(
                lambda: self._cut_done >= ticket or not self._running, timeout=_CONTROL_TIMEOUT_S
            )
            if not done:
                raise TimeoutError("TcpProxy forwarding thread did not process cut() in time")

    def restore(self) -> None:
        """Heal the network: accept and forward new connections again (already cut ones stay dead)."""
        with self._cond:
            self._refusing = False

    def stop(self) -> None:
        """Reset every connection, close the listening socket and join the forwarding thread."""
        with self._cond:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
            if self._running:
                self._wake()
        if thread is not threading.current_thread():
            thread.join(timeout=_CONTROL_TIMEOUT_S)
            if thread.is_alive():
                raise TimeoutError("TcpProxy forwarding thread did not stop in time")

    def __enter__(self) -> TcpProxy:
        """Start the proxy."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the proxy."""
        self.stop()

    def __repr__(self) -> str:
        """Describe the proxy for test output."""
        state = "cut" if self._refusing else "ok"
        return (
            f"TcpProxy({self._listen_host}:{self._port or self._listen_port} -> "
            f"{self._target_host}:{self._target_port}, {state}, connections={len(self._conns)})"
        )

    # ------------------------------------------------------------------ loop thread

    def _wake(self) -> None:
        """Interrupt the selector; caller holds ``self._cond`` and has checked ``self._running``."""
        assert self._waker_w is not None
        with contextlib.suppress(OSError):  # BlockingIOError: a wake-up is already pending
            self._waker_w.send(b"\0")

    def _run(self) -> None:
        """Forwarding loop: runs until :meth:`stop`."""
        selector = self._selector
        assert selector is not None
        try:
            while True:
                for key, events in selector.select():
                    if key.data is _LISTENER:
                        self._accept_all()
                    elif key.data is _WAKER:
                        self._drain_waker()
                    else:
                        conn, role = key.data
                        if not conn.closed:
                            self._service(conn, role, events)
                if self._process_control():
                    return
        finally:
            with self._cond:
                self._running = False
                conns = list(self._conns)
            for conn in conns:
                self._reset(conn)
            for sock in (self._listener, self._waker_r, self._waker_w):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
            selector.close()
            with self._cond:
                self._cond.notify_all()

    def _drain_waker(self) -> None:
        """Consume pending wake-up bytes."""
        assert self._waker_r is not None
        with contextlib.suppress(OSError):
            while self._waker_r.recv(4096):
                pass

    def _process_control(self) -> bool:
        """Apply pending cut requests; return True when the loop should exit."""
        with self._cond:
            requested = self._cut_requested
            stopping = self._stopping
            conns = list(self._conns) if requested > self._cut_done else []
        if requested > self._cut_done:
            for conn in conns:
                self._reset(conn)
            with self._cond:
                self._cut_done = requested
                self._cond.notify_all()
        return stopping

    def _accept_all(self) -> None:
        """Accept every pending client and start connecting it upstream (or reset it when cut)."""
        assert self._listener is not None and self._selector is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNABORTED: the client gave up while queued
                continue
            with self._cond:
                refusing = self._refusing or self._stopping
            if refusing:
                _reset_and_close(client)
                continue

            client.setblocking(False)
            _set_nodelay(client)
            family, type_, proto, addr = self._target_addr
            try:
                upstream = socket.socket(family, type_, proto)
            except OSError:
                _reset_and_close(client)
                continue
            upstream.setblocking(False)
            err = upstream.connect_ex(addr)
            if err not in _CONNECT_IN_PROGRESS:  # e.g. ECONNREFUSED: the target is down
                _reset_and_close(upstream)
                _reset_and_close(client)
                continue

            conn = _Connection(client, upstream)
            with self._cond:
                self._conns.add(conn)
            self._update(conn)

    def _service(self, conn: _Connection, role: _Role, events: int) -> None:
        """Handle readiness ``events`` on the socket playing ``role`` in ``conn``."""
        try:
            if role == "upstream" and conn.connecting:
                err = conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                conn.connecting = False
                _set_nodelay(conn.upstream)
                self._flush(conn, "upstream")  # the client may already have sent bytes (or FIN)
            else:
                if events & selectors.EVENT_READ:
                    self._read(conn, role)
                if events & selectors.EVENT_WRITE:
                    self._flush(conn, role)
        except OSError:
            self._reset(conn)
            return
        self._update(conn)

    def _read(self, conn: _Connection, role: _Role) -> None:
        """Read from ``role`` into the buffer for the opposite side and try to forward immediately."""
        try:
            data = conn.sock(role).recv(_CHUNK_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        other: _Role = "upstream" if role == "client" else "client"
        if role == "client":
            if data:
                conn.to_upstream += data
            else:
                conn.client_eof = True
        elif data:
            conn.to_client += data
        else:
            conn.upstream_eof = True
        self._flush(conn, other)

    def _flush(self, conn: _Connection, dest: _Role) -> None:
        """Send buffered bytes to ``dest``; forward a half-close once the buffer is drained."""
        if dest == "upstream" and conn.connecting:
            return
        sock = conn.sock(dest)
        buf = conn.to_upstream if dest == "upstream" else conn.to_client
        while buf:
            try:
                sent = sock.send(buf)
            except (BlockingIOError, InterruptedError):
                return
            del buf[:sent]
        if dest == "upstream":
            if conn.client_eof and not conn.upstream_shut:
                conn.upstream.shutdown(socket.SHUT_WR)
                conn.upstream_shut = True
        elif conn.upstream_eof and not conn.client_shut:
            conn.client.shutdown(socket.SHUT_WR)
            conn.client_shut = True

    def _update(self, conn: _Connection) -> None:
        """Re-register ``conn``'s sockets for the events they need, or close it when it is done."""
        if conn.closed:
            return
        if conn.finished:
            self._close(conn, reset=False)
            return
        assert self._selector is not None
        roles: tuple[_Role, _Role] = ("client", "upstream")
        for role in roles:
            old, new = conn.registered[role], conn.interest(role)
            if old == new:
                continue
            sock = conn.sock(role)
            if old == 0:
                self._selector.register(sock, new, (conn, role))
            elif new == 0:
                self._selector.unregister(sock)
            else:
                self._selector.modify(sock, new, (conn, role))
            conn.registered[role] = new

    def _reset(self, conn: _Connection) -> None:
        """Abort ``conn``: both peers see a connection reset."""
        self._close(conn, reset=True)

    def _close(self, conn: _Connection, *, reset: bool) -> None:
        """Unregister and close both sockets of ``conn`` and forget it."""
        if conn.closed:
            return
        conn.closed = True
        assert self._selector is not None
        roles: tuple[_Role, _Role] = ("client", "upstream")
        for role in roles:
            sock = conn.sock(role)
            if conn.registered[role]:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(sock)
                conn.registered[role] = 0
            if reset:
                _reset_and_close(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()
        with self._cond:
            self._conns.discard(conn)
