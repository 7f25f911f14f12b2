"""Shared storage for replicas (issue 13): both backends against real servers, leases, faults.

The S3 backend talks to moto's standalone S3 server, started here as its own
process on loopback: real HTTP, real conditional writes, real Content-MD5 checks.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_service.checkpoints import SessionCheckpoints
from cloud_service.leases import Leases
from cloud_service.registry import ModelRegistry
from cloud_service.replicas import Replica
from cloud_service.service import CloudConfig, CloudService
from cloud_service.sessions import SessionStore
from cloud_service.storage import DirectoryStore, RetryingStore, S3Store, StoreError
from splitkd.errors import FailedPrecondition, Unavailable
from splitkd.hyper import Hyperparameters
from tests.support import DIGITS, apply_steps, make_teacher, wait_for

TEACHER = make_teacher()
META: dict[str, Any] = {"parameters": 1, "max_abs_diff": 0.0, "input_shape": [3], "num_classes": 2}
BUCKET = "splitkd-test"
MOTO = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which(
    "moto_server"
)
needs_moto = pytest.mark.skipif(
    MOTO is None, reason="moto[server] is not installed (pip install -e '.[s3]')"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def s3_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    assert MOTO is not None
    port = _free_port()
    server = subprocess.Popen(
        [MOTO, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("moto's S3 server", lambda: _up(url + "/moto-api/"))
        s3_client(url).create_bucket(Bucket=BUCKET)
        yield url, server
    finally:
        os.kill(server.pid, signal.SIGCONT)  # a test may have paused it
        server.terminate()
        server.wait(30)


def s3_client(url: str, timeout: float = 5.0) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1}),
    )


@pytest.fixture(params=["directory", pytest.param("s3", marks=needs_moto)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RetryingStore:
    if request.param == "directory":
        return RetryingStore(DirectoryStore(tmp_path / "shared"))
    url, _ = request.getfixturevalue("s3_server")
    # A fresh prefix per test: the module's server is shared.
    return RetryingStore(S3Store(BUCKET, tmp_path.name, client=s3_client(url)))


def test_both_backends_read_write_list_delete_and_create_once(store: RetryingStore) -> None:
    assert store.read("a/b.json") is None
    store.write("a/b.json", b"one")
    store.write("a/b.json", b"two")
    assert store.read("a/b.json") == b"two"
    assert store.create("a/lease-1", b"x") is True
    assert store.create("a/lease-1", b"y") is False  # conditional: the first writer won
    assert store.read("a/lease-1") == b"x"
    assert store.list("a/") == ["a/b.json", "a/lease-1"]
    store.delete("a/b.json")
    assert store.list("a/") == ["a/lease-1"]


def test_of_many_replicas_racing_for_a_new_session_exactly_one_wins(
    store: RetryingStore,
) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(6)

    def contend(name: str) -> None:
        leases = Leases(store, name, 30.0)
        barrier.wait()
        results.append(leases.holds("0" * 32))

    threads = [threading.Thread(target=contend, args=(f"r{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 5 + [True]


def test_a_lease_moves_only_after_it_expires_and_the_old_holder_then_steps_down(
    store: RetryingStore,
) -> None:
    now = [1000.0]
    a = Leases(store, "a", 10.0, clock=lambda: now[0])
    b = Leases(store, "b", 10.0, clock=lambda: now[0])
    session = "1" * 32
    assert a.holds(session)
    assert not b.holds(session)
    now[0] += 6  # past half: a renews
    assert a.holds(session)
    now[0] += 9  # a's renewed lease (to 1016) still runs
    assert not b.holds(session)
    now[0] += 5  # 1020: expired; a, silent since, is taken over
    assert b.holds(session)
    assert not a.holds(session)
    assert not a.held(session)
    b.release(session)  # a clean stop: a may take it at once
    assert a.holds(session)


def test_a_failed_write_leaves_the_old_checkpoint_whole(tmp_path: Path) -> None:
    store = RetryingStore(DirectoryStore(tmp_path), attempts=1)
    store.write("s/step", b"old")
    original = os.replace

    def torn(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    os.replace = torn  # type: ignore[assignment]
    try:
        with pytest.raises(Unavailable):
            store.write("s/step", b"new" * 1000)
    finally:
        os.replace = original
    assert store.read("s/step") == b"old"
    assert store.list("s/") == ["s/step"]
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["step"]  # no temporary left


@needs_moto
def test_every_s3_write_is_one_put_carrying_its_md5(
    s3_server: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """An S3 PUT publishes a whole object or none; its Content-MD5 lets S3 and MinIO
    refuse a body that arrived torn (moto does not check it, so we check it is sent)."""
    import base64
    import hashlib

    url, _ = s3_server
    client = s3_client(url)
    sent: list[tuple[str, str]] = []
    client.meta.events.register(
        "before-send.s3.PutObject",
        lambda request, **_: sent.append((request.method, request.headers.get("Content-MD5"))),
    )
    data = b"checkpoint" * 1000
    RetryingStore(S3Store(BUCKET, tmp_path.name, client=client)).write("s/step", data)
    digest = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
    assert sent == [("PUT", digest.encode())]


@needs_moto
def test_a_store_that_is_down_or_hangs_is_retried_with_backoff_then_reported_not_ready(
    s3_server: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    url, server = s3_server
    delays: list[float] = []
    store = RetryingStore(
        S3Store(BUCKET, tmp_path.name, client=s3_client(url, timeout=0.5)),
        attempts=3,
        sleep=delays.append,
    )
    store.write("k", b"v")
    os.kill(server.pid, signal.SIGSTOP)  # the store hangs: every call times out
    try:
        with pytest.raises(Unavailable, match="does not answer"):
            store.read("k")
        assert len(delays) == 2  # three attempts, backoff between them
        assert not store.ready
        assert not store.probe()
    finally:
        os.kill(server.pid, signal.SIGCONT)
    wait_for("the store to answer again", store.probe)
    assert store.ready and store.read("k") == b"v"

    down = RetryingStore(
        S3Store(BUCKET, "", client=s3_client(f"http://127.0.0.1:{_free_port()}")),
        attempts=2,
        sleep=delays.append,
    )
    with pytest.raises(Unavailable):
        down.write("k", b"v")
    assert not down.ready


def test_store_errors_are_transient_and_others_are_not(tmp_path: Path) -> None:
    calls: list[int] = []

    class Flaky(DirectoryStore):
        def read(self, key: str) -> bytes | None:
            calls.append(1)
            if len(calls) < 3:
                raise StoreError("EIO")
            return super().read(key)

    store = RetryingStore(Flaky(tmp_path), sleep=lambda _: None)
    assert store.read("missing") is None and len(calls) == 3 and store.ready


def test_replicas_publishing_into_one_shared_registry_never_clash(tmp_path: Path) -> None:
    registries = [ModelRegistry(tmp_path / "models") for _ in range(2)]  # two processes' views
    barrier = threading.Barrier(8)

    def publish(index: int) -> None:
        barrier.wait()
        for round_ in range(3):
            registries[index % 2].publish("student-pi", f"{index}-{round_}".encode(), **META)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shared = ModelRegistry(tmp_path / "models", keep_versions=0)
    records = shared.versions("student-pi")
    assert [r.version for r in records][-5:] == list(range(20, 25))  # 24 published, 5 kept
    contents = {shared.path("student-pi", r.version).read_bytes() for r in records}
    assert len(contents) == len(records)  # each version is one publish, whole
    assert not [p for p in (tmp_path / "models" / "student-pi").iterdir() if p.name.startswith(".")]


# --- two replicas over one store -----------------------------------------------------------


def replica(store: RetryingStore, name: str, clock: list[float]) -> CloudService:
    service = CloudService(
        TEACHER,
        ModelRegistry(Path(store.description).parent / f"models-{name}")
        if isinstance(store.inner, DirectoryStore)
        else ModelRegistry(Path(os.environ.get("TMPDIR", "/tmp")) / f"models-{name}"),
        SessionStore(),
        CloudConfig(hyper=Hyperparameters(epochs=1, batch_size=16, checkpoint_every=2)),
        checkpoints=SessionCheckpoints(store, prefix="sessions/"),
        restore_at_start=False,
    )
    Replica(service, Leases(store, name, 10.0, prefix="sessions/", clock=lambda: clock[0]))
    return service


def one_step(service: CloudService, session_id: str, step: int) -> None:
    apply_steps(service, session_id, 1, start=step)


def test_a_dead_replicas_session_resumes_on_another_and_no_step_is_applied_twice(
    store: RetryingStore,
) -> None:
    clock = [1000.0]
    a, b = replica(store, "a", clock), replica(store, "b", clock)
    session_id = a.register("pi-1", DIGITS).session_id
    apply_steps(a, session_id, 5)  # checkpoints at 0, 2, 4; live at 5
    # Without the routing key the call lands on b: a still holds the lease.
    with pytest.raises(Unavailable, match="another replica"):
        one_step(b, session_id, 5)
    assert a.sessions.get(session_id).next_step == 5
    clock[0] += 11  # a dies: its lease runs out
    with pytest.raises(FailedPrecondition, match="expects step 4"):
        one_step(b, session_id, 5)  # b restored the newest shared checkpoint
    step, session = b.resume(session_id, [0, 2, 4])
    assert step == 4 and session.next_step == 4
    apply_steps(b, session_id, 3, start=4)
    # a comes back (a paused process): it must not apply a step b owns now.
    with pytest.raises(Unavailable, match="moved to another replica"):
        one_step(a, session_id, 5)
    assert a.sessions.peek(session_id) is None
    assert b.sessions.get(session_id).next_step == 7
    b.sessions.get(session_id)  # still b's
    assert store.read(f"sessions/{session_id}/step-000000006.safetensors") is not None


def test_a_replica_that_gets_a_session_back_restores_it_instead_of_its_stale_memory(
    store: RetryingStore,
) -> None:
    clock = [1000.0]
    a, b = replica(store, "a", clock), replica(store, "b", clock)
    session_id = a.register("pi-1", DIGITS).session_id
    apply_steps(a, session_id, 3)  # a remembers step 3 (checkpoint at 2)
    clock[0] += 11  # a is paused past its lease; b takes the session over
    with pytest.raises(FailedPrecondition):
        one_step(b, session_id, 3)
    b.resume(session_id, [0, 2])
    apply_steps(b, session_id, 4, start=2)  # b's lineage: steps 2..5, checkpoints 4 and 6
    b.checkpoint_all()
    for session in b.sessions.all():
        b.leases.release(session.session_id)  # type: ignore[union-attr]  # b stops cleanly
    with pytest.raises(Unavailable, match="being restored"):
        one_step(a, session_id, 6)  # a takes the lease back, but not its stale step 3
    assert a.sessions.get(session_id).next_step == 6  # b's work, from the shared store
    one_step(a, session_id, 6)


def test_a_session_unknown_everywhere_is_not_found_and_leaves_no_lease(
    store: RetryingStore,
) -> None:
    from splitkd.errors import NotFound

    b = replica(store, "b", [0.0])
    with pytest.raises(NotFound):
        b.sessions.get("f" * 32)
    with pytest.raises(NotFound):
        b.sessions.get("../../etc")
    assert store.list("sessions/") == []


def test_a_replica_whose_store_is_down_refuses_with_unavailable_and_is_not_ready(
    tmp_path: Path,
) -> None:
    class Broken(DirectoryStore):
        down = False

        def read(self, key: str) -> bytes | None:
            if self.down:
                raise StoreError("connection refused")
            return super().read(key)

        def ping(self) -> None:
            if self.down:
                raise StoreError("connection refused")

    inner = Broken(tmp_path / "shared")
    store = RetryingStore(inner, attempts=2, sleep=lambda _: None)
    service = replica(store, "a", [0.0])
    assert service.ready()
    inner.down = True
    with pytest.raises(Unavailable):
        service.sessions.get("a" * 32)
    assert not service.ready()
    inner.down = False
    assert store.probe() and service.ready()
    np.testing.assert_equal(store.list("sessions/"), [])


def test_a_first_step_while_the_store_is_down_is_refused_and_applied_once_it_is_back(
    tmp_path: Path,
) -> None:
    class Broken(DirectoryStore):
        down = False

        def write(self, key: str, data: bytes) -> None:
            if self.down:
                raise StoreError("connection reset")
            super().write(key, data)

    inner = Broken(tmp_path / "shared")
    store = RetryingStore(inner, attempts=2, sleep=lambda _: None)
    service = replica(store, "a", [0.0])
    session_id = service.register("pi-1", DIGITS).session_id
    inner.down = True
    with pytest.raises(Unavailable):
        one_step(service, session_id, 0)
    assert service.sessions.get(session_id).next_step == 0  # nothing applied
    inner.down = False
    one_step(service, session_id, 0)  # the edge's retry
    assert service.sessions.get(session_id).next_step == 1
    assert store.read(f"sessions/{session_id}/session.json") is not None
