"""Starting, waiting for and stopping the processes of one run, each device behind a relay."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.relay import CountingRelay


class RunFailed(RuntimeError):
    """A process of a run failed; the message names its log."""


@dataclass
class Device:
    name: str
    process: subprocess.Popen[bytes]
    relay: CountingRelay
    log: Path


def start(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment)


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until ``127.0.0.1:port`` accepts a connection (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RunFailed(f"server exited with code {process.returncode}; see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RunFailed(f"server not listening on :{port} after {timeout:.0f} s; see {log}")


def wait_devices(
    devices: list[Device], servers: list[subprocess.Popen[bytes]], timeout: float
) -> float:
    """Wait until every device process exits; returns when the last one did (monotonic).
    A device or a server failing ends the wait at once: a dead server must not leave its
    clients retrying until the time-out."""
    deadline = time.monotonic() + timeout
    while any(d.process.poll() is None for d in devices):
        for device in devices:
            if device.process.poll() not in (None, 0):
                raise RunFailed(
                    f"{device.name} exited with code {device.process.returncode}; see {device.log}"
                )
        for server in servers:
            if server.poll() not in (None, 0):
                raise RunFailed(f"the server exited with code {server.returncode}")
        if time.monotonic() > deadline:
            raise RunFailed(f"devices still running after {timeout:.0f} s")
        time.sleep(0.2)
    ended = time.monotonic()
    for device in devices:
        if device.process.returncode != 0:
            raise RunFailed(
                f"{device.name} exited with code {device.process.returncode}; see {device.log}"
            )
        # The counts are final once the device's connections have closed.
        if not device.relay.wait_closed(timeout=30):
            raise RunFailed(f"{device.name}: a connection through its relay is still open")
    return ended


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextmanager
def cleanup(processes: list[subprocess.Popen[bytes]], devices: list[Device]) -> Iterator[None]:
    """Stop whatever a run started, however it ends."""
    try:
        yield
    finally:
        for device in devices:
            stop(device.process)
            device.relay.close()
        for process in processes:
            stop(process)
