"""``make bench`` (part): how close the link emulator comes to the delay it is given.

The tests prove what load cannot break (a round trip takes at least the
configured delay; the emulator is a delay line, not stop-and-wait). How little
it adds on top, and how much faster than stop-and-wait a bulk transfer is,
depend on the machine's load, so they are measured here and printed as ratios:

1. Round trip through 30 ms each way against the 60 ms configured. Goal: <= 1.5.
2. 16 MB echoed through 50 ms each way against stop-and-wait's lower bound
   (one 100 ms round trip per 64 KiB chunk: 24 s). Goal: <= 0.2.
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time

from testbed.echo import connect, echo_server, round_trip
from testbed.linkemu import CHUNK_BYTES, Delay, LinkEmulator


def echo_seconds(sock: socket.socket, payload: bytes) -> float:
    started = time.perf_counter()
    sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
    sender.start()
    received = 0
    while data := sock.recv(1 << 20):
        received += len(data)
    sender.join()
    assert received == len(payload)
    return time.perf_counter() - started


def main() -> int:
    with echo_server() as upstream:
        with connect(upstream[1]) as direct:
            baseline = statistics.median(round_trip(direct) for _ in range(20))
        delay = Delay.from_ms(30.0)
        with (
            LinkEmulator(("127.0.0.1", 0), upstream, delay, delay) as emulator,
            connect(emulator.port) as sock,
        ):
            round_trip(sock)  # the first one also pays the emulated handshake
            rtt = statistics.median(round_trip(sock) for _ in range(20))
        payload = os.urandom(16_000_000)
        delay = Delay.from_ms(50.0)
        with (
            LinkEmulator(("127.0.0.1", 0), upstream, delay, delay) as emulator,
            connect(emulator.port) as sock,
        ):
            bulk = echo_seconds(sock, payload)
    stop_and_wait = len(payload) / CHUNK_BYTES * 0.100
    print(f"loopback round trip (median)        {baseline * 1e3:8.2f} ms")
    print(
        f"round trip, 30 ms each way (median) {rtt * 1e3:8.2f} ms  ratio to 60 ms: {rtt / 0.060:.2f}"
    )
    print(
        f"16 MB echo, 50 ms each way          {bulk:8.2f} s   "
        f"ratio to stop-and-wait ({stop_and_wait:.0f} s): {bulk / stop_and_wait:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
