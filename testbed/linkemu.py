"""A user-space TCP link emulator: one-way latency and jitter in each direction.

Why this exists: the usual tool, ``tc qdisc ... netem delay 35ms 10ms``, needs
the ``sch_netem`` kernel module, and the kernels we test on are built without
it. ``tc`` ``tbf``/``htb`` still shape *bandwidth* (see ``testbed.netns``), so
only the delay has to come from somewhere else: this proxy. It listens on one
address, connects each accepted client to an upstream address, and forwards
bytes in both directions, holding every chunk it reads until its release
time, ``arrival + delay``, where the delay is drawn per chunk from
Normal(latency, jitter) and clipped at zero.

What it keeps and what it does not:

* Byte order is kept exactly: a chunk is never released before the one read
  before it (release times are made monotonic), so a large negative jitter
  draw cannot reorder the stream the way ``netem`` reorders packets.
* Throughput is kept: chunks are read as fast as they arrive and released on
  their own timers, so the delay does not turn into a stop-and-wait rate
  limit; the queue between reader and writer holds a bandwidth-delay product.
* TCP's own dynamics are not those of a long path: the kernel's connections on
  both sides of the proxy see the short veth round trip, so slow start and
  loss recovery of a real 70 ms path are not reproduced. Per-message latency
  (what split learning pays per step) is; the TCP handshake is modelled by
  holding the client's first bytes for one round trip.

Threads, not asyncio: ``time.sleep`` wakes within tens of microseconds, while
the asyncio event loop rounds timeouts up to the millisecond, which would
swamp Ethernet's 0.25 ms.

Run ``python -m testbed.linkemu --listen 10.77.0.1:50100 --connect 127.0.0.1:50051
--profile lte`` (or ``--latency-ms``/``--jitter-ms``).
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import random
import signal
import socket
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from importlib import resources
from types import TracebackType
from typing import Any

log = logging.getLogger("testbed.linkemu")

# 64 KiB reads: large enough that a gigabit stream costs a few thousand
# wake-ups per second, small enough that a chunk's delay is a fair stand-in
# for the delay of each packet in it.
CHUNK_BYTES = 64 * 1024
# Chunks held per direction before the reader stops reading and TCP's flow
# control pushes back on the sender: 256 x 64 KiB covers 1 Gbit/s x 130 ms.
MAX_QUEUED_CHUNKS = 256
_EOF = None


@dataclass(frozen=True)
class Delay:
    """One direction's one-way delay: mean and standard deviation, in seconds."""

    latency: float
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.latency < 0 or self.jitter < 0:
            raise ValueError(f"latency and jitter must be >= 0, got {self.latency}, {self.jitter}")

    def sample(self, rng: random.Random) -> float:
        if self.jitter == 0:
            return self.latency
        return max(0.0, rng.gauss(self.latency, self.jitter))

    @classmethod
    def from_ms(cls, latency_ms: float, jitter_ms: float = 0.0) -> Delay:
        return cls(latency_ms / 1000.0, jitter_ms / 1000.0)


@dataclass
class Counters:
    connections: int = 0
    bytes_forward: int = 0
    bytes_backward: int = 0
    # Most chunks one direction held at once: above one, reading did not wait for
    # release (a delay line, not stop-and-wait), whatever the machine's speed.
    max_held_chunks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def held(self, chunks: int) -> None:
        with self.lock:
            self.max_held_chunks = max(self.max_held_chunks, chunks)

    def add(self, forward: bool, size: int) -> None:
        with self.lock:
            if forward:
                self.bytes_forward += size
            else:
                self.bytes_backward += size


def link_profile(name: str) -> dict[str, Any]:
    """A link profile from ``splitkd/profiles/links.json`` (latency_ms is one way)."""
    text = resources.files("splitkd").joinpath("profiles", "links.json").read_text()
    links: dict[str, Any] = json.loads(text)["links"]
    if name not in links:
        raise ValueError(f"unknown link profile {name!r}; known: {', '.join(sorted(links))}")
    profile: dict[str, Any] = links[name]
    return profile


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def _no_delay(sock: socket.socket) -> None:
    # Nagle on the proxy's own sockets would hold small gRPC frames for an ACK
    # (and meet delayed ACKs: 40 ms stalls that no real link profile has).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Pipe:
    """One direction of one connection: a reader thread and a timed writer thread."""

    def __init__(
        self,
        source: socket.socket,
        sink: socket.socket,
        delay: Delay,
        rng: random.Random,
        not_before: float,
        on_bytes: Any,
        closing: threading.Event,
        on_held: Any,
    ) -> None:
        self.source, self.sink, self.delay, self.rng = source, sink, delay, rng
        self.not_before = not_before
        self.on_bytes = on_bytes
        self.on_held = on_held
        self.closing = closing
        self.queue: queue.Queue[tuple[float, bytes] | None] = queue.Queue(MAX_QUEUED_CHUNKS)
        self.threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._write, daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join()

    def _put(self, item: tuple[float, bytes] | None) -> None:
        while not self.closing.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _read(self) -> None:
        last_release = 0.0
        try:
            while not self.closing.is_set():
                data = self.source.recv(CHUNK_BYTES)
                if not data:
                    break
                arrival = time.monotonic()
                # A byte cannot leave before the handshake round trip is over,
                # and never before the chunk ahead of it (no reordering).
                release = max(arrival, self.not_before) + self.delay.sample(self.rng)
                last_release = max(release, last_release)
                self._put((last_release, data))
                self.on_held(self.queue.qsize())
        except OSError:
            self.closing.set()
        finally:
            self._put(_EOF)

    def _write(self) -> None:
        try:
            while True:
                try:
                    item = self.queue.get(timeout=0.2)
                except queue.Empty:
                    if self.closing.is_set():
                        return
                    continue
                if item is _EOF:
                    # Half-close: the far side sees end-of-stream after the
                    # last delayed byte, exactly as the sender closed it.
                    self.sink.shutdown(socket.SHUT_WR)
                    return
                release, data = item
                wait = release - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.sink.sendall(data)
                self.on_bytes(len(data))
        except OSError:
            self.closing.set()
            # Unblock the reader of this direction, which may sit in recv().
            for sock in (self.source, self.sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class LinkEmulator:
    """``with LinkEmulator(("127.0.0.1", 0), upstream, Delay(...), Delay(...)) as emu: emu.port``.

    ``forward`` delays client -> upstream bytes, ``backward`` upstream -> client.
    """

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        forward: Delay,
        backward: Delay,
        *,
        seed: int | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.listen = listen
        self.upstream = upstream
        self.forward = forward
        self.backward = backward
        self.connect_timeout = connect_timeout
        self.counters = Counters()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._server: socket.socket | None = None
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        port: int = self._server.getsockname()[1]
        return port

    def start(self) -> LinkEmulator:
        server = socket.create_server(self.listen, reuse_port=False, backlog=64)
        self._server = server
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()
        log.info(
            "link emulator on %s:%d -> %s:%d, forward %.2f±%.2f ms, backward %.2f±%.2f ms",
            self.listen[0],
            self.port,
            self.upstream[0],
            self.upstream[1],
            self.forward.latency * 1e3,
            self.forward.jitter * 1e3,
            self.backward.latency * 1e3,
            self.backward.jitter * 1e3,
        )
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            # close() alone does not wake a thread blocked in accept(); shutdown() does.
            with suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
        with self._lock:
            for sock in list(self._connections):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def serve_forever(self) -> None:
        if self._thread is None:
            self.start()
        self._stopping.wait()

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _child_rng(self) -> random.Random:
        with self._rng_lock:
            return random.Random(self._rng.getrandbits(64))

    def _serve(self, client: socket.socket) -> None:
        accepted = time.monotonic()
        try:
            upstream = socket.create_connection(self.upstream, timeout=self.connect_timeout)
        except OSError as exc:
            log.warning("cannot connect to upstream %s:%d: %s", *self.upstream, exc)
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            _no_delay(sock)
        with self._lock:
            self._connections.update((client, upstream))
            self.counters.connections += 1
        closing = threading.Event()
        # The client's SYN and our SYN-ACK would have crossed the link once each.
        handshake_done = accepted + self.forward.latency + self.backward.latency
        pipes = [
            _Pipe(
                client,
                upstream,
                self.forward,
                self._child_rng(),
                handshake_done,
                lambda n: self.counters.add(True, n),
                closing,
                self.counters.held,
            ),
            _Pipe(
                upstream,
                client,
                self.backward,
                self._child_rng(),
                0.0,
                lambda n: self.counters.add(False, n),
                closing,
                self.counters.held,
            ),
        ]
        for pipe in pipes:
            pipe.start()
        for pipe in pipes:
            pipe.join()
        with self._lock:
            self._connections.difference_update((client, upstream))
        client.close()
        upstream.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.linkemu",
        description="TCP proxy that adds a link's one-way latency and jitter in each direction "
        "(user-space stand-in for netem; bandwidth is shaped by tc, not here).",
    )
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept on")
    parser.add_argument("--connect", type=_address, required=True, help="upstream HOST:PORT")
    parser.add_argument("--profile", help="take latency and jitter from this link profile")
    parser.add_argument("--latency-ms", type=float, help="one-way delay in each direction")
    parser.add_argument("--jitter-ms", type=float, help="standard deviation of the one-way delay")
    parser.add_argument("--seed", type=int, default=None, help="seed for the jitter draws")
    parser.add_argument("-v", "--verbose", action="count", default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    from splitkd.logs import configure

    args = _parser().parse_args(argv)
    configure(args.verbose)
    latency, jitter = 0.0, 0.0
    if args.profile:
        try:
            profile = link_profile(args.profile)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
        latency, jitter = float(profile["latency_ms"]), float(profile["jitter_ms"])
    if args.latency_ms is not None:
        latency = args.latency_ms
    if args.jitter_ms is not None:
        jitter = args.jitter_ms
    delay = Delay.from_ms(latency, jitter)
    emulator = LinkEmulator(args.listen, args.connect, delay, delay, seed=args.seed)
    # SIGTERM (the testbed's teardown) ends the process through the normal exit path.
    signal.signal(signal.SIGTERM, lambda *_: emulator.stop())
    try:
        emulator.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", *args.listen, exc)
        return 1
    try:
        emulator.serve_forever()
    except KeyboardInterrupt:
        emulator.stop()
    c = emulator.counters
    log.info(
        "%d connections, %d bytes forward, %d bytes backward",
        c.connections,
        c.bytes_forward,
        c.bytes_backward,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
