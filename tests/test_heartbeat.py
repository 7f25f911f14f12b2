"""Heartbeats keep a session alive through long device work; silent sessions expire.

The cloud's clock is the test's: it moves on only after a heartbeat of the busy
edge has landed, so neither a slow machine nor a fast one changes what happens.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_service.server import build_grpc_server
from cloud_service.sessions import SessionStore
from edge_agent.client import CloudClient
from edge_agent.errors import CloudRefused
from tests.support import DIGITS, make_service, wait_for

IDLE_TIMEOUT = 1.0


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_heartbeats_keep_a_session_that_would_expire(tmp_path: Path) -> None:
    clock = ManualClock()
    store = SessionStore(idle_timeout=IDLE_TIMEOUT, clock=clock)
    service = make_service(tmp_path, store=store)
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    try:
        with CloudClient(f"127.0.0.1:{port}") as alive, CloudClient(f"127.0.0.1:{port}") as silent:
            kept = alive.register("busy-pi", DIGITS)
            lost = silent.register("quiet-pi", DIGITS)
            busy = service.sessions.get(kept.session_id)
            alive.keep_alive(kept.session_id, interval=0.1)
            # "Long device work": no step for three idle timeouts of cloud time, in half
            # timeout strides, each taken once the busy edge's next heartbeat has landed.
            for stride in range(1, 7):
                clock.now = stride * IDLE_TIMEOUT / 2
                wait_for(f"a heartbeat at {clock.now} s", lambda: busy.last_seen == clock.now)
            beat = alive.heartbeat(kept.session_id)
            assert beat.next_step == 0 and beat.session_timeout_seconds == IDLE_TIMEOUT
            with pytest.raises(CloudRefused) as expired:
                silent.heartbeat(lost.session_id)
            assert expired.value.code == "NOT_FOUND" and "expired" in expired.value.details
    finally:
        server.stop(0)


def test_without_heartbeats_the_same_session_expires(tmp_path: Path) -> None:
    """The counterpart: what keeps the busy session above is its heartbeats, not the clock."""
    clock = ManualClock()
    service = make_service(tmp_path, store=SessionStore(idle_timeout=IDLE_TIMEOUT, clock=clock))
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    try:
        with CloudClient(f"127.0.0.1:{port}") as edge:
            session = edge.register("busy-pi", DIGITS)
            clock.now = IDLE_TIMEOUT / 2
            assert edge.heartbeat(session.session_id).next_step == 0
            clock.now += IDLE_TIMEOUT * 1.01
            with pytest.raises(CloudRefused) as expired:
                edge.heartbeat(session.session_id)
            assert expired.value.code == "NOT_FOUND"
    finally:
        server.stop(0)
