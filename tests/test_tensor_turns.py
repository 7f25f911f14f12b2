"""Steps take turns at their tensor work (cloud_service/compute.py), and never wait holding it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cloud_service.compute import TENSOR_WORK
from cloud_service.service import CloudService
from tests.support import DIGITS, apply_steps, make_service


class Recording:
    """A lock that notes when someone had to wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waited = threading.Event()
        self.taken = 0

    def acquire(self) -> bool:
        if self.lock.locked():
            self.waited.set()
        self.lock.acquire()
        self.taken += 1
        return True

    def release(self) -> None:
        self.lock.release()

    def locked(self) -> bool:
        return self.lock.locked()


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> Recording:
    lock = Recording()
    monkeypatch.setattr(TENSOR_WORK, "_lock", lock)
    return lock


def _session(service: CloudService, device: str = "turns") -> str:
    return service.register(device, DIGITS).session_id


def test_a_step_waits_for_its_turn_then_is_applied(tmp_path: Path, recording: Recording) -> None:
    service = make_service(tmp_path)
    session_id = _session(service)
    stepper = threading.Thread(target=apply_steps, args=(service, session_id, 1))
    with TENSOR_WORK:  # another step's tensor work, as the step arrives
        stepper.start()
        assert recording.waited.wait(60), "the step never asked for its turn"
        assert service.sessions.get(session_id).next_step == 0
    stepper.join(60)
    assert service.sessions.get(session_id).next_step == 1
    assert recording.taken >= 3  # ours, then the step's: its tail forward, then loss and update


def test_parallel_tensor_work_takes_no_turns(
    tmp_path: Path, recording: Recording, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TENSOR_WORK, "enabled", False)
    service = make_service(tmp_path)
    session_id = _session(service)
    recording.lock.acquire()  # held throughout: a step that asked for a turn would hang
    try:
        apply_steps(service, session_id, 2)
    finally:
        recording.lock.release()
    assert service.sessions.get(session_id).next_step == 2
    assert recording.taken == 0 and not recording.waited.is_set()


def test_concurrent_steps_with_teacher_batches_all_finish(
    tmp_path: Path, recording: Recording
) -> None:
    """Teacher passes are batched across sessions (followers wait for a leader): nobody
    waits while holding the turn, so concurrent steps cannot deadlock on it."""
    service = make_service(tmp_path)
    sessions = [_session(service, f"turns-{i}") for i in range(6)]
    threads = [threading.Thread(target=apply_steps, args=(service, s, 4)) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [service.sessions.get(s).next_step for s in sessions] == [4] * 6
    assert not recording.locked()
