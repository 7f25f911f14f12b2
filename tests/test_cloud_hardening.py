"""Cloud defects found by the red-team pass and the review (issue 8), one test each."""

from __future__ import annotations

import gc
import json
import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cloud_service.checkpoints import SessionCheckpoints
from cloud_service.limits import RateLimiter
from cloud_service.registry import ModelRegistry
from cloud_service.server import build_grpc_server
from cloud_service.service import CloudConfig, CloudService
from cloud_service.sessions import SessionStore
from edge_agent.checkpoints import EdgeCheckpoints
from edge_agent.client import CloudClient
from edge_agent.run import _resume_saved
from splitkd import checkpoint
from splitkd.errors import FailedPrecondition, InvalidArgument, NotFound
from splitkd.hyper import Hyperparameters
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc
from tests.support import DIGITS, apply_steps, make_teacher, wait_for
from tests.test_grpc_errors import register, step_request

TEACHER = make_teacher()


def durable_service(state: Path, store: SessionStore | None = None, **hyper: int) -> CloudService:
    """A cloud with sessions on disk under ``state`` (a second one there is a restart)."""
    return CloudService(
        TEACHER,
        ModelRegistry(state / "models"),
        SessionStore() if store is None else store,
        CloudConfig(hyper=Hyperparameters(epochs=1, batch_size=16, **hyper)),
        checkpoints=SessionCheckpoints(state / "sessions"),
    )


def session_folders(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "sessions").iterdir() if not p.name.startswith("."))


# --- 1. Register floods hold no capacity and nothing on disk ---------------------------------


def test_registrations_without_a_step_hold_no_capacity_and_no_files(tmp_path: Path) -> None:
    service = durable_service(tmp_path, SessionStore(max_sessions=3, max_per_device=2))
    for i in range(300):
        service.register(f"flood-{i}", DIGITS)
    assert service.sessions.pending_count() <= service.sessions.max_pending
    assert session_folders(tmp_path) == []
    honest = service.register("pi-1", DIGITS)
    apply_steps(service, honest.session_id, 2)
    assert session_folders(tmp_path) == [honest.session_id]
    restarted = durable_service(tmp_path)
    assert [s.session_id for s in restarted.sessions.all()] == [honest.session_id]


def test_registrations_saved_by_an_older_cloud_are_not_restored(tmp_path: Path) -> None:
    service = durable_service(tmp_path)
    bare, trained = (service.register(f"pi-{i}", DIGITS) for i in range(2))
    apply_steps(service, trained.session_id, 1)
    assert service.checkpoints is not None
    service.checkpoints.save_meta(bare)  # what an older cloud wrote at every Register
    service.checkpoints.save_state(bare.session_id, bare.snapshots[0])
    meta = tmp_path / "sessions" / bare.session_id / "session.json"
    meta.write_text(
        json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "trained"})
    )
    restarted = durable_service(tmp_path)
    assert [s.session_id for s in restarted.sessions.all()] == [trained.session_id]
    assert session_folders(tmp_path) == [trained.session_id]


def test_the_edge_retries_register_while_the_cloud_is_full(tmp_path: Path) -> None:
    service = durable_service(tmp_path, SessionStore(max_sessions=1))
    occupier = service.register("busy", DIGITS)
    apply_steps(service, occupier.session_id, 1)
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    results: list[object] = []
    try:
        with CloudClient(f"127.0.0.1:{port}", retry_seconds=60) as client:
            worker = threading.Thread(
                target=lambda: results.append(client.register("pi-1", DIGITS)), daemon=True
            )
            worker.start()
            wait_for(
                "a refused Register", lambda: client.retried_calls > 0 or not worker.is_alive(), 30
            )
            service.sessions.remove(occupier.session_id)
            worker.join(60)
    finally:
        server.stop(0)
    assert len(results) == 1 and len(getattr(results[0], "session_id", "")) == 32, results


# --- 3. A device that crashed a few times is not locked out -------------------------------------


def test_a_device_at_its_session_cap_gives_up_its_oldest_idle_session(tmp_path: Path) -> None:
    now = [0.0]
    store = SessionStore(max_per_device=2, clock=lambda: now[0])
    service = durable_service(tmp_path, store)
    crashed = []
    for _ in range(2):  # two runs that died after a few steps
        session = service.register("pi-1", DIGITS)
        apply_steps(service, session.session_id, 2)
        crashed.append(session.session_id)
        now[0] += 10
    fresh = service.register("pi-1", DIGITS)
    apply_steps(service, fresh.session_id, 1)
    with pytest.raises(NotFound):
        service.sessions.get(crashed[0])
    assert service.sessions.get(crashed[1]).next_step == 2
    wait_for("its files are removed", lambda: crashed[0] not in session_folders(tmp_path), 30)


def test_fresh_discards_the_saved_session_before_registering(tmp_path: Path) -> None:
    store = EdgeCheckpoints(tmp_path / "edge")
    identity = {"cloud": "c", "data": "digits", "shard": "0/1", "device_id": "pi-1"}
    store.start({**identity, "session_id": "0" * 32})
    assert _resume_saved(None, store, identity, fresh=True) == (None, None)  # type: ignore[arg-type]
    assert store.session() is None


# --- 2. Torn and mismatched cloud checkpoints ----------------------------------------------------


def trained(state: Path) -> str:
    """A session with checkpoints of steps 0, 2, 4 and 6 on disk."""
    service = durable_service(state, checkpoint_every=2)
    session = service.register("pi-1", DIGITS)
    apply_steps(service, session.session_id, 6)
    folder = state / "sessions" / session.session_id
    assert checkpoint.available_steps(folder) == [0, 2, 4, 6]
    return session.session_id


def test_a_torn_newest_checkpoint_restores_the_one_before(tmp_path: Path) -> None:
    session_id = trained(tmp_path)
    newest = checkpoint.step_path(tmp_path / "sessions" / session_id, 6)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    restarted = durable_service(tmp_path, checkpoint_every=2)
    step, _ = restarted.resume(session_id, [0, 2, 4, 6])
    assert step == 4
    apply_steps(restarted, session_id, 1, start=4)


def test_a_checkpoint_whose_content_is_another_step_does_not_make_resume_loop(
    tmp_path: Path,
) -> None:
    session_id = trained(tmp_path)
    folder = tmp_path / "sessions" / session_id
    checkpoint.step_path(folder, 6).write_bytes(checkpoint.step_path(folder, 2).read_bytes())
    restarted = durable_service(tmp_path, checkpoint_every=2)
    step, _ = restarted.resume(session_id, [0, 2, 4, 6])
    assert step == 4
    apply_steps(restarted, session_id, 1, start=step)  # the step the edge sends next is taken


def test_an_unrestorable_session_is_removed_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session_id = trained(tmp_path)
    folder = tmp_path / "sessions" / session_id
    for path in folder.iterdir():
        path.write_bytes(b"torn")
    (tmp_path / "sessions" / "notes.txt").write_text("the operator's own file")
    caplog.set_level(logging.WARNING)
    restarted = durable_service(tmp_path, checkpoint_every=2)
    assert restarted.sessions.all() == []
    assert not folder.exists()
    assert (tmp_path / "sessions" / "notes.txt").read_text() == "the operator's own file"
    lines = [r.getMessage() for r in caplog.records if session_id[:8] in r.getMessage()]
    assert len(lines) == 1 and "removed" in lines[0], lines


def test_a_foreign_file_in_a_session_folder_is_kept(tmp_path: Path) -> None:
    session_id = trained(tmp_path)
    folder = tmp_path / "sessions" / session_id
    (folder / "session.json").write_text("{")
    (folder / "mine.txt").write_text("not splitkd's")
    durable_service(tmp_path, checkpoint_every=2)
    assert [p.name for p in folder.iterdir()] == ["mine.txt"]


# --- 9. Finished sessions, deletion outside the store lock, memory held per session -------------


def test_a_finished_session_leaves_no_checkpoints_and_is_not_restored(tmp_path: Path) -> None:
    service = durable_service(tmp_path)
    session = service.register("pi-1", DIGITS)
    apply_steps(service, session.session_id, 2)
    head = session.student.part_state(0, session.student_cut)
    service.finish(session.session_id, head, 2)
    assert session_folders(tmp_path) == []
    assert durable_service(tmp_path).sessions.all() == []


def test_expired_sessions_are_removed_outside_the_store_lock(tmp_path: Path) -> None:
    now = [0.0]
    store = SessionStore(idle_timeout=10, clock=lambda: now[0])
    service = durable_service(tmp_path, store)
    session = service.register("pi-1", DIGITS)
    apply_steps(service, session.session_id, 1)
    lock_free_during_removal: list[bool] = []
    remove = service.checkpoints.remove  # type: ignore[union-attr]

    def spy(session_id: str) -> None:
        free = store._lock.acquire(blocking=False)
        if free:
            store._lock.release()
        lock_free_during_removal.append(free)
        remove(session_id)

    service.checkpoints.remove = spy  # type: ignore[union-attr,method-assign]
    now[0] = 100
    assert store.all() == []
    assert lock_free_during_removal == [True]
    assert session_folders(tmp_path) == []


def test_a_session_keeps_no_view_on_its_request(tmp_path: Path) -> None:
    service = durable_service(tmp_path)
    session = service.register("pi-1", DIGITS)
    shapes = (session.student_activation_shape, session.teacher_activation_shape)
    sizes = [4 * int(np.prod(s)) for s in shapes]
    request = np.random.default_rng(0).standard_normal(sizes[0] + 2 * sizes[1] + 4)
    request = request.astype(np.float32)
    alive = weakref.ref(request)
    student = request[: sizes[0]].reshape(4, *shapes[0])
    teacher = request[sizes[0] : sizes[0] + sizes[1]].reshape(4, *shapes[1])
    ahead = request[sizes[0] + sizes[1] : sizes[0] + 2 * sizes[1]].reshape(4, *shapes[1])
    labels = np.zeros(4, dtype=np.int64)
    result = service.step(session.session_id, 0, student, teacher, labels, ahead)
    assert result.next_teacher_accepted
    del request, student, teacher, ahead
    gc.collect()
    assert alive() is None, "the session still holds the request's memory"
    # A retry of the step is still recognised, from what the session kept.
    student, teacher = _split_again(sizes, shapes)
    again = service.step(
        session.session_id, 0, student, teacher, labels, ahead_again(sizes, shapes)
    )
    assert again.replayed


def _split_again(
    sizes: list[int], shapes: tuple[tuple[int, ...], ...]
) -> tuple[np.ndarray, np.ndarray]:
    request = np.random.default_rng(0).standard_normal(sizes[0] + 2 * sizes[1] + 4)
    request = request.astype(np.float32)
    student = request[: sizes[0]].reshape(4, *shapes[0])
    teacher = request[sizes[0] : sizes[0] + sizes[1]].reshape(4, *shapes[1])
    return student, teacher


def ahead_again(sizes: list[int], shapes: tuple[tuple[int, ...], ...]) -> np.ndarray:
    request = np.random.default_rng(0).standard_normal(sizes[0] + 2 * sizes[1] + 4)
    start = sizes[0] + sizes[1]
    return request.astype(np.float32)[start : start + sizes[1]].reshape(4, *shapes[1])


def test_activations_sent_ahead_are_kept_only_for_a_batch_of_the_sessions_size(
    tmp_path: Path,
) -> None:
    service = durable_service(tmp_path)  # batch size 16
    session = service.register("pi-1", DIGITS)
    rng = np.random.default_rng(0)
    big = 64
    result = service.step(
        session.session_id,
        0,
        rng.standard_normal((big, *session.student_activation_shape)).astype(np.float32),
        rng.standard_normal((big, *session.teacher_activation_shape)).astype(np.float32),
        rng.integers(0, 10, big),
        rng.standard_normal((big, *session.teacher_activation_shape)).astype(np.float32),
    )
    assert not result.next_teacher_accepted


@pytest.fixture
def grpc_cloud(tmp_path: Path) -> Iterator[tuple[CloudService, pb_grpc.SplitTrainingStub]]:
    service = durable_service(tmp_path)
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield service, pb_grpc.SplitTrainingStub(channel)  # type: ignore[no-untyped-call]
    finally:
        channel.close()
        server.stop(0)


def test_the_rate_limit_refuses_before_any_tensor_is_decoded(
    grpc_cloud: tuple[CloudService, pb_grpc.SplitTrainingStub],
) -> None:
    service, stub = grpc_cloud
    service.limiter = RateLimiter(rate=0.001, burst=1)
    session = register(type("C", (), {"stub": stub}), "flooder")  # type: ignore[arg-type]
    stub.Step(step_request(session, 0), timeout=10)
    garbage = step_request(session, 1)
    garbage.student_activations.data = b"\x00" * 3  # would be INVALID_ARGUMENT once decoded
    with pytest.raises(grpc.RpcError) as refused:
        stub.Step(garbage, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- 4. Free strings in requests are bounded --------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("profile", "x" * 1_000_000),
        ("profile", "raspberry pi\n4"),
        ("link", "l" * 65),
        ("signature", "n" * 100_000),
        ("shape", ""),
    ],
)
def test_free_strings_in_a_registration_are_bounded(
    grpc_cloud: tuple[CloudService, pb_grpc.SplitTrainingStub], field: str, value: str
) -> None:
    _, stub = grpc_cloud
    request = pb.RegisterRequest(
        device_id="pi-1",
        signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=10, name="digits"),
        profile=pb.DeviceProfile(name="raspberry-pi-4", link="wifi"),
    )
    if field == "profile":
        request.profile.name = value
    elif field == "link":
        request.profile.link = value
    elif field == "signature":
        request.signature.name = value
    else:
        request.signature.input_shape[:] = [1] * 100_000
    with pytest.raises(grpc.RpcError) as refused:
        stub.Register(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(refused.value.details() or "") < 300


def test_session_ids_are_bounded_too(
    grpc_cloud: tuple[CloudService, pb_grpc.SplitTrainingStub],
) -> None:
    _, stub = grpc_cloud
    with pytest.raises(grpc.RpcError) as refused:
        stub.Heartbeat(pb.HeartbeatRequest(session_id="s" * 100_000), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- 7. Untrained students are not published; old versions are pruned --------------------------


def test_finish_without_a_step_is_refused(tmp_path: Path) -> None:
    service = durable_service(tmp_path)
    session = service.register("pi-1", DIGITS)
    with pytest.raises(FailedPrecondition, match="no training step"):
        service.finish(session.session_id, session.student.part_state(0, session.student_cut), 0)
    assert service.registry.names() == []


def test_the_registry_keeps_the_newest_versions_and_only_deletes_its_own_files(
    tmp_path: Path,
) -> None:
    registry = ModelRegistry(tmp_path / "models", keep_versions=2)
    meta = {"parameters": 1, "max_abs_diff": 0.0, "input_shape": [4], "num_classes": 2}
    registry.publish("m", b"one", **meta)
    (tmp_path / "models" / "m" / "1" / "README.txt").write_text("the operator's note")
    for data in (b"two", b"three", b"four"):
        registry.publish("m", data, **meta)
    assert [r.version for r in registry.versions("m")] == [3, 4]
    assert not (tmp_path / "models" / "m" / "2").exists()
    assert sorted(p.name for p in (tmp_path / "models" / "m" / "1").iterdir()) == ["README.txt"]
    assert registry.path("m").read_bytes() == b"four"
    unlimited = ModelRegistry(tmp_path / "unlimited", keep_versions=0)
    for data in (b"1", b"2", b"3"):
        unlimited.publish("m", data, **meta)
    assert [r.version for r in unlimited.versions("m")] == [1, 2, 3]
    with pytest.raises(InvalidArgument):
        ModelRegistry(tmp_path / "bad", keep_versions=-1)
