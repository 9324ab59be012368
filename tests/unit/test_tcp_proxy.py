"""Loopback tests for the fault-injection TCP proxy in ``testing/tcp_proxy.py``."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from testing.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(10)

_IO_TIMEOUT_S = 2.0


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echo every byte back until the client half-closes; tolerate resets (that is what cut() does)."""

    def handle(self) -> None:
        """Echo loop."""
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            pass


class _EchoServer(socketserver.ThreadingTCPServer):
    """Threaded echo server on an ephemeral loopback port."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default (5) drops SYNs under a burst of connects -> 1 s retransmit stalls

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet about connections reset by the proxy."""


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A running echo server; yields its (host, port)."""
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield str(host), int(port)
    server.shutdown()
    server.server_close()
    thread.join(timeout=2)


@pytest.fixture
def proxy(echo_server: tuple[str, int]) -> Iterator[TcpProxy]:
    """A started proxy in front of the echo server."""
    with TcpProxy(*echo_server) as started:
        yield started


def _connect(proxy: TcpProxy) -> socket.socket:
    """Open a client connection to the proxy with a bounded I/O timeout."""
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=_IO_TIMEOUT_S)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes or fail on EOF."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        assert chunk, f"unexpected EOF after {len(chunks)} of {size} bytes"
        chunks += chunk
    return bytes(chunks)


def _recv_until_eof(sock: socket.socket) -> bytes:
    """Read until the peer half-closes."""
    chunks = bytearray()
    while chunk := sock.recv(65536):
        chunks += chunk
    return bytes(chunks)


def _round_trip(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` and read the same number of bytes back."""
    sock.sendall(payload)
    return _recv_exactly(sock, len(payload))


def _is_dropped(sock: socket.socket) -> bool:
    """True when the connection is dead: recv gives EOF or raises (reset, broken pipe...), not a timeout."""
    try:
        sock.sendall(b"ping")
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _new_connection_is_dropped(proxy: TcpProxy) -> bool:
    """True when a fresh connection to the proxy is refused/reset during connect or dropped right after."""
    try:
        client = _connect(proxy)
    except OSError:
        return True  # the reset can race the connect() completion: that counts as dropped too
    with client:
        return _is_dropped(client)


def _wait_until(predicate: Callable[[], bool], timeout: float = _IO_TIMEOUT_S) -> bool:
    """Poll ``predicate`` briefly until it holds or ``timeout`` expires."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _free_port() -> int:
    """A loopback port nobody listens on (bound then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_bytes_round_trip_through_proxy(proxy: TcpProxy) -> None:
    # Given a client connected through the proxy to an echo server
    with _connect(proxy) as client:
        # When it sends bytes
        echoed = _round_trip(client, b"hello, broker")

        # Then the same bytes come back and the proxy counts one live connection
        assert echoed == b"hello, broker"
        assert proxy.connections == 1
    # And once the client hangs up, the proxied connection goes away
    assert _wait_until(lambda: proxy.connections == 0)


def test_large_payload_is_forwarded_full_duplex(proxy: TcpProxy) -> None:
    # Given a payload far larger than the socket and proxy buffers
    payload = bytes(range(256)) * 16 * 1024  # 4 MiB
    with _connect(proxy) as client:
        # When one thread writes it while the main thread reads the echo concurrently
        writer = threading.Thread(target=client.sendall, args=(payload,))
        writer.start()
        echoed = _recv_exactly(client, len(payload))
        writer.join(timeout=_IO_TIMEOUT_S)

    # Then every byte arrives, in order
    assert echoed == payload


def test_half_close_is_forwarded(proxy: TcpProxy) -> None:
    # Given a client that sends a request and then half-closes its write side
    with _connect(proxy) as client:
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)

        # When it keeps reading
        received = _recv_until_eof(client)

    # Then the echo server saw the FIN (it replied and closed), and the reply still got through
    assert received == b"last words"


def test_cut_drops_open_connections_promptly(proxy: TcpProxy) -> None:
    # Given a working connection through the proxy
    with _connect(proxy) as client:
        assert _round_trip(client, b"before") == b"before"

        # When the network is cut
        started = time.monotonic()
        proxy.cut()

        # Then the client sees the connection die (EOF or reset), not a hang
        assert _is_dropped(client)
        assert time.monotonic() - started < 1.0
        assert proxy.connections == 0


def test_cut_resets_the_target_side_too() -> None:
    # Given a proxy in front of a plain listening socket we control as the "broker"
    with (
        socket.create_server(("127.0.0.1", 0)) as broker,
        TcpProxy("127.0.0.1", broker.getsockname()[1]) as proxy,
    ):
        broker.settimeout(_IO_TIMEOUT_S)
        with _connect(proxy) as client:
            client.sendall(b"x")
            upstream, _ = broker.accept()
            with upstream:
                upstream.settimeout(_IO_TIMEOUT_S)
                assert upstream.recv(1) == b"x"

                # When the network is cut
                proxy.cut()

                # Then the broker side also sees the connection dropped
                assert _is_dropped(upstream)


def test_new_connections_are_dropped_while_cut(proxy: TcpProxy) -> None:
    # Given a cut network
    proxy.cut()

    # When a client tries to connect
    dropped = _new_connection_is_dropped(proxy)

    # Then the connection fails or is dropped immediately instead of reaching the echo server
    assert dropped
    assert proxy.connections == 0


def test_restore_accepts_connections_again(proxy: TcpProxy) -> None:
    # Given a connection that died in a cut
    with _connect(proxy) as old:
        assert _round_trip(old, b"a") == b"a"
        proxy.cut()
        assert _is_dropped(old)

    # When the network is restored
    proxy.restore()

    # Then new connections work end to end again
    with _connect(proxy) as fresh:
        assert _round_trip(fresh, b"back again") == b"back again"
        assert proxy.connections == 1


def test_many_concurrent_connections(proxy: TcpProxy) -> None:
    # Given two dozen clients (more than the service's consumer count) connected at the same time
    count = 24
    clients = [_connect(proxy) for _ in range(count)]
    try:
        for index, client in enumerate(clients):
            assert _round_trip(client, f"hello {index}".encode()) == f"hello {index}".encode()
        assert proxy.connections == count

        # When they all talk concurrently, several rounds each
        def chat(index: int) -> bool:
            client = clients[index]
            return all(
                _round_trip(client, f"client {index} round {r} ".encode() * 50)
                == f"client {index} round {r} ".encode() * 50
                for r in range(20)
            )

        with ThreadPoolExecutor(max_workers=count) as pool:
            results = list(pool.map(chat, range(count)))

        # Then every client got exactly its own bytes back
        assert all(results)

        # And a single cut drops all of them at once
        proxy.cut()
        assert proxy.connections == 0
        assert all(_is_dropped(client) for client in clients)
    finally:
        for client in clients:
            client.close()


def test_unreachable_target_drops_the_client() -> None:
    # Given a proxy whose target has nothing listening (the broker is down)
    with TcpProxy("127.0.0.1", _free_port()) as proxy:
        # When a client connects through it
        dropped = _new_connection_is_dropped(proxy)

        # Then the client sees the connection fail or drop promptly
        assert dropped
        assert _wait_until(lambda: proxy.connections == 0)


def test_stop_closes_connections_and_is_idempotent(echo_server: tuple[str, int]) -> None:
    # Given a started proxy with an open connection
    proxy = TcpProxy(*echo_server).start()
    port = proxy.port
    with _connect(proxy) as client:
        assert _round_trip(client, b"hi") == b"hi"

        # When it is stopped (twice)
        proxy.stop()
        proxy.stop()

        # Then the open connection is dropped and the port no longer accepts connections
        assert _is_dropped(client)
    assert proxy.connections == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=_IO_TIMEOUT_S).close()
