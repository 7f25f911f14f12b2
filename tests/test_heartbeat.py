"""Heartbeats keep a session alive through long device work; silent sessions expire."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cloud_service.server import build_grpc_server
from cloud_service.sessions import SessionStore
from edge_agent.client import CloudClient
from edge_agent.errors import CloudRefused
from tests.support import DIGITS, make_service


def test_heartbeats_keep_a_session_that_would_expire(tmp_path: Path) -> None:
    service = make_service(tmp_path, store=SessionStore(idle_timeout=1.0))
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    try:
        with CloudClient(f"127.0.0.1:{port}") as alive, CloudClient(f"127.0.0.1:{port}") as silent:
            kept = alive.register("busy-pi", DIGITS)
            lost = silent.register("quiet-pi", DIGITS)
            alive.keep_alive(kept.session_id, interval=0.2)
            time.sleep(2.0)  # "long device work": no step for twice the idle timeout
            beat = alive.heartbeat(kept.session_id)
            assert beat.next_step == 0 and beat.session_timeout_seconds == 1.0
            with pytest.raises(CloudRefused) as expired:
                silent.heartbeat(lost.session_id)
            assert expired.value.code == "NOT_FOUND" and "expired" in expired.value.details
    finally:
        server.stop(0)
