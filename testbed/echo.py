"""A TCP echo server on loopback and round-trip timing: the far end for link-emulator checks
(tests/test_testbed.py and benchmarks/linkemu_bench.py)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def echo_server() -> Iterator[tuple[str, int]]:
    """Echo on an ephemeral loopback port until each client half-closes; yields (host, port)."""
    server = socket.create_server(("127.0.0.1", 0))

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[:2]
    finally:
        server.close()


def connect(port: int) -> socket.socket:
    """A loopback connection without Nagle's delay (small writes go at once)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def round_trip(sock: socket.socket, size: int = 100) -> float:
    """Seconds for ``size`` bytes to come back through an echo server."""
    started = time.perf_counter()
    sock.sendall(b"x" * size)
    got = 0
    while got < size:
        got += len(sock.recv(size - got))
    return time.perf_counter() - started
