"""The byte-counting relay of the benchmarks: exact counts over real sockets."""

from __future__ import annotations

import socket
import threading

from benchmarks.relay import Connection, CountingRelay
from splitkd.demo import free_port

REQUEST = bytes(range(256)) * 4001  # ~1 MB: crosses in several reads
REPLY = b"reply:" + bytes(range(97)) * 311


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"peer closed after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


def _recv_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def _server(listener: socket.socket, connections: int, received: list[bytes]) -> None:
    """Reads one REQUEST per connection, answers REPLY, closes."""
    for _ in range(connections):
        peer, _ = listener.accept()
        with peer:
            received.append(_recv_exactly(peer, len(REQUEST)))
            peer.sendall(REPLY)


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        return _recv_all(sock)


def test_relay_counts_exact_bytes_per_connection() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []
    server = threading.Thread(target=_server, args=(listener, 2, received), daemon=True)
    server.start()
    with listener, CountingRelay(listener.getsockname()[1]) as relay:
        assert _exchange(relay.port, REQUEST) == REPLY
        assert _exchange(relay.port, REQUEST) == REPLY
        assert relay.wait_closed(timeout=30), "the relay did not see both connections end"
        server.join(timeout=30)
        assert received == [REQUEST, REQUEST]
        assert relay.connections == [
            Connection(up=len(REQUEST), down=len(REPLY), open=False),
            Connection(up=len(REQUEST), down=len(REPLY), open=False),
        ]
        assert relay.snapshot() == (2 * len(REQUEST), 2 * len(REPLY))
        assert (relay.up, relay.down) == relay.snapshot()


def test_relay_to_a_closed_port_closes_the_client_and_counts_nothing() -> None:
    with CountingRelay(free_port()) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as sock:
            assert _recv_all(sock) == b""
        assert relay.wait_closed(timeout=30)
        assert relay.connections == [Connection(up=0, down=0, open=False)]


def test_wait_for_bytes_times_out_when_nothing_flows() -> None:
    with CountingRelay(free_port()) as relay:
        assert not relay.wait_for_bytes(1, 0, timeout=0.05)
        assert relay.wait_for_bytes(0, 0, timeout=0.05)
