"""Limits answer RESOURCE_EXHAUSTED with a reason, for the offender only."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cloud_service.limits import RateLimiter
from cloud_service.server import build_grpc_server
from cloud_service.session import Session
from cloud_service.sessions import SessionStore
from splitkd.errors import ResourceExhausted
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc
from tests.support import DIGITS, RPC_TIMEOUT, apply_steps, make_service
from tests.test_grpc_errors import register, step_request


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=10, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.acquire("pi-1")
    with pytest.raises(ResourceExhausted, match="pi-1 sends more than 10 steps"):
        limiter.acquire("pi-1", "steps")
    limiter.acquire("pi-2")  # another device has its own bucket
    now[0] = 0.1  # one token back after 1/rate seconds
    limiter.acquire("pi-1")
    with pytest.raises(ResourceExhausted):
        limiter.acquire("pi-1")
    RateLimiter(rate=0).acquire("anyone")  # 0 = unlimited


def test_a_flooding_device_is_refused_and_another_trains_on(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    # The limiter's clock stands still: however slowly a loaded machine sends the
    # steps, no token comes back, so the fourth is over the limit.
    service.limiter = RateLimiter(rate=1, burst=3, clock=lambda: 0.0)
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SplitTrainingStub(channel)  # type: ignore[no-untyped-call]
            cloud = type("C", (), {"stub": stub})
            flood = register(cloud, "flooder")  # type: ignore[arg-type]
            calm = register(cloud, "calm")  # type: ignore[arg-type]
            for step in range(3):
                stub.Step(step_request(flood, step), timeout=RPC_TIMEOUT)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Step(step_request(flood, 3), timeout=RPC_TIMEOUT)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "flooder" in refused.value.details()
            assert stub.Step(step_request(calm, 0), timeout=RPC_TIMEOUT).step == 0
    finally:
        server.stop(0)


def test_sessions_per_device_and_in_total(tmp_path: Path) -> None:
    service = make_service(tmp_path, store=SessionStore(max_per_device=2, max_sessions=3))

    def trained(device: str) -> Session:
        session = service.register(device, DIGITS)
        apply_steps(service, session.session_id, 1)  # only a session that trained holds capacity
        return session

    first = trained("pi-1")
    second = trained("pi-1")
    service.finish(first.session_id, first.student.part_state(0, first.student_cut), 1)
    # At its cap, a device gives up its finished, then its least recently seen session.
    third = trained("pi-1")
    assert {s.session_id for s in service.sessions.all()} == {second.session_id, third.session_id}
    trained("pi-2")
    with pytest.raises(ResourceExhausted, match="already serves 3 sessions"):
        service.register("pi-3", DIGITS)


def test_absurd_but_finite_activations_do_not_poison_the_session(tmp_path: Path) -> None:
    import numpy as np

    from splitkd.errors import InvalidArgument

    service = make_service(tmp_path)
    session = service.register("pi-1", DIGITS)
    rng = np.random.default_rng(0)
    student = np.full((4, 8, 4, 4), 3e38, dtype=np.float32)
    teacher = rng.standard_normal((4, 32, 4, 4)).astype(np.float32)
    labels = np.zeros(4, dtype=np.int64)
    before = {k: v.clone() for k, v in session.student.state_dict().items()}
    with pytest.raises(InvalidArgument, match="non-finite"):
        service.step(session.session_id, 0, student, teacher, labels)
    after = session.student.state_dict()
    assert all(bool((before[k] == after[k]).all()) for k in before)
    assert session.next_step == 0
    good = rng.standard_normal((4, 8, 4, 4)).astype(np.float32)
    assert np.isfinite(service.step(session.session_id, 0, good, teacher, labels).loss)
