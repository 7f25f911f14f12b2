"""A byte-counting TCP relay on loopback, shared by the benchmarks.

Put between a client and a server, it counts every byte that crosses the
socket in each direction (TLS, HTTP/2 frames, headers, pings: whatever the
peers send), per accepted connection. ``make bench`` uses one relay for the
wire bytes of a split step; ``make compare`` gives each device its own relay,
so a device's bytes are the relay's totals whatever number of connections its
client opens.

The relay runs an asyncio loop in a daemon thread, so a blocking caller (a
benchmark driving subprocesses, a test) can use it without an event loop.
A chunk is counted before it is forwarded: once a peer has received N bytes,
the relay has counted at least N.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from types import TracebackType

CHUNK = 1 << 20  # read size: large messages cross in few chunks; counts do not depend on it


@dataclass
class Connection:
    """Bytes of one accepted connection: ``up`` client to server, ``down`` back."""

    up: int = 0
    down: int = 0
    open: bool = True


class CountingRelay:
    """Listens on ``127.0.0.1:port`` (``port`` chosen free) and relays to ``host:target_port``."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.connections: list[Connection] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        started.wait()
        assert self._server is not None
        self.port: int = self._server.sockets[0].getsockname()[1]

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", 0)
        )
        started.set()
        self._loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = Connection()
        with self._changed:
            self.connections.append(connection)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.close()  # nothing to relay to: the client sees the connection close
                return
            await asyncio.gather(
                self._pump(reader, up_writer, connection, up=True),
                self._pump(up_reader, writer, connection, up=False),
            )
        finally:
            with self._changed:
                connection.open = False
                self._changed.notify_all()
            self._tasks.discard(task)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        connection: Connection,
        up: bool,
    ) -> None:
        try:
            while data := await source.read(CHUNK):
                with self._changed:
                    if up:
                        connection.up += len(data)
                    else:
                        connection.down += len(data)
                    self._changed.notify_all()
                sink.write(data)
                await sink.drain()
        except OSError:
            pass  # a peer reset: the other pump ends when its side closes too
        finally:
            # Closing (not half-closing) mirrors what a peer sees when the other side goes away.
            sink.close()

    @property
    def up(self) -> int:
        return self.snapshot()[0]

    @property
    def down(self) -> int:
        return self.snapshot()[1]

    def snapshot(self) -> tuple[int, int]:
        """(bytes up, bytes down) over every connection so far."""
        with self._lock:
            return (
                sum(c.up for c in self.connections),
                sum(c.down for c in self.connections),
            )

    def wait_closed(self, timeout: float) -> bool:
        """Block until at least one connection was relayed and every one has ended
        (the counts are then final). Returns False on time-out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (self.connections and not any(c.open for c in self.connections)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def wait_for_bytes(self, up: int, down: int, timeout: float) -> bool:
        """Block until at least ``up`` and ``down`` bytes have been counted."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                total_up = sum(c.up for c in self.connections)
                total_down = sum(c.down for c in self.connections)
                if total_up >= up and total_down >= down:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)

    def close(self) -> None:
        """Stop listening and drop the relayed connections."""
        if not self._loop.is_running():
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> CountingRelay:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
