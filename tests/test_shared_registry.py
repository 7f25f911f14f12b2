"""The model registry shared by replicas through an S3 store (issue 13).

Two registries on one bucket of moto's real S3 server play two replicas: what one
publishes, the other lists and serves, byte for byte; concurrent publishes never
share a version; a damaged object is refused, never served.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloud_service.http_api import create_app
from cloud_service.service import CloudConfig, CloudService
from cloud_service.sessions import SessionStore
from cloud_service.shared_registry import StoreRegistry
from cloud_service.storage import DirectoryStore, RetryingStore, S3Store
from splitkd.errors import NotFound, Unavailable
from tests.support import make_teacher
from tests.test_storage import BUCKET, needs_moto, s3_client, s3_server  # noqa: F401

META: dict[str, Any] = {"parameters": 1, "max_abs_diff": 0.0, "input_shape": [3], "num_classes": 2}


@pytest.fixture
def store(s3_server: tuple[str, Any], tmp_path: Path) -> RetryingStore:  # noqa: F811
    url, _ = s3_server
    # A fresh prefix per test; no backoff: a refusal here is not transient.
    return RetryingStore(S3Store(BUCKET, tmp_path.name, client=s3_client(url)), attempts=1)


def _replica(store: RetryingStore, tmp_path: Path, name: str, keep: int = 5) -> StoreRegistry:
    return StoreRegistry(store, tmp_path / f"state-{name}" / "model-cache", keep_versions=keep)


@needs_moto
def test_a_model_published_on_one_replica_is_listed_and_served_by_another(
    store: RetryingStore, tmp_path: Path
) -> None:
    a, b = _replica(store, tmp_path, "a"), _replica(store, tmp_path, "b")
    model = bytes(range(256)) * 40
    record = a.publish("student-x", model, device_id="dev-1", **META)
    assert (record.version, record.sha256) == (1, hashlib.sha256(model).hexdigest())
    assert b.names() == ["student-x"]
    assert b.get("student-x") == record and b.get("student-x", 1) == record
    assert [r.version for r in b.versions("student-x")] == [1]
    served = b.path("student-x")
    assert served.read_bytes() == model and served.is_relative_to(tmp_path / "state-b")
    assert b.publish("student-x", b"second", **META).version == 2  # b counts on from a's
    assert a.path("student-x", 2).read_bytes() == b"second"
    with pytest.raises(NotFound):
        b.get("student-x", 3)
    with pytest.raises(NotFound):
        b.path("other")


@needs_moto
def test_concurrent_publishes_of_one_name_get_distinct_versions(
    store: RetryingStore, tmp_path: Path
) -> None:
    replicas = [_replica(store, tmp_path, str(i), keep=0) for i in range(4)]
    barrier = threading.Barrier(len(replicas))
    versions: dict[int, bytes] = {}

    def publish(registry: StoreRegistry, body: bytes) -> None:
        barrier.wait()
        for n in range(3):
            data = body + bytes([n])
            versions[registry.publish("student-y", data, **META).version] = data

    threads = [
        threading.Thread(target=publish, args=(r, f"replica-{i}".encode()))
        for i, r in enumerate(replicas)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(versions) == 12  # twelve publishes, twelve distinct numbers
    listed = replicas[0].versions("student-y")
    assert sorted(versions) == [r.version for r in listed]
    for record in listed:  # each number holds the model its publisher was told it holds
        assert (
            replicas[1].path("student-y", record.version).read_bytes() == versions[record.version]
        )


@needs_moto
def test_a_damaged_or_missing_object_is_refused_not_served(
    store: RetryingStore, tmp_path: Path
) -> None:
    a, b = _replica(store, tmp_path, "a"), _replica(store, tmp_path, "b")
    a.publish("student-z", b"the real model", **META)
    store.write("models/student-z/1/model.onnx", b"the real mode!")  # same size, other bytes
    with pytest.raises(Unavailable, match="does not match its sha256"):
        b.path("student-z")
    assert not list((tmp_path / "state-b").rglob("*.onnx"))  # nothing damaged kept
    store.delete("models/student-z/1/model.onnx")
    with pytest.raises(Unavailable, match="model object is missing"):
        b.path("student-z")
    store.write("models/student-z/1/metadata.json", b"{not json")
    with pytest.raises(Unavailable, match="metadata does not parse"):
        b.get("student-z", 1)


@needs_moto
def test_half_published_versions_are_invisible_and_pruning_is_shared(
    store: RetryingStore, tmp_path: Path
) -> None:
    a, b = _replica(store, tmp_path, "a", keep=2), _replica(store, tmp_path, "b", keep=2)
    a.publish("student-w", b"v1", **META)
    assert b.path("student-w").read_bytes() == b"v1"
    # A replica that died mid-publish: its claim and model, no metadata.
    store.create("models/student-w/2/claim", b"dead")
    store.write("models/student-w/2/model.onnx", b"half")
    assert [r.version for r in b.versions("student-w")] == [1]
    with pytest.raises(NotFound):
        b.get("student-w", 2)
    assert b.publish("student-w", b"v3", **META).version == 3  # the dead claim's number stays taken
    assert a.publish("student-w", b"v4", **META).version == 4
    assert [r.version for r in b.versions("student-w")] == [3, 4]  # v1 pruned for everyone
    assert not any(k.startswith("models/student-w/1/") for k in store.list("models/"))
    assert b.path("student-w").read_bytes() == b"v4"
    assert not (tmp_path / "state-b" / "model-cache" / "student-w" / "1").exists()  # copy dropped


@needs_moto
def test_http_download_from_the_replica_that_did_not_publish(
    store: RetryingStore, tmp_path: Path
) -> None:
    a = _replica(store, tmp_path, "a")
    b = CloudService(make_teacher(), _replica(store, tmp_path, "b"), SessionStore(), CloudConfig())
    record = a.publish("student-v", b"onnx bytes here", **META)
    client = TestClient(create_app(b))
    assert client.get("/v1/models").json()["models"] == [
        {"name": "student-v", "latest": 1, "versions": [1]}
    ]
    reply = client.get("/v1/models/student-v/versions/1/model.onnx")
    assert reply.status_code == 200 and reply.content == b"onnx bytes here"
    assert reply.headers["x-model-sha256"] == record.sha256
    _, chunks = b.open_download("student-v", 1, 5)  # the gRPC download's source
    assert b"".join(chunk for _, chunk in chunks) == b"bytes here"
    store.write("models/student-v/2/model.onnx", b"tampered")
    store.write("models/student-v/2/metadata.json", _meta_of(record, version=2))
    damaged = client.get("/v1/models/student-v/versions/2/model.onnx")
    assert damaged.status_code == 503 and "sha256" in damaged.json()["detail"]


def _meta_of(record: Any, version: int) -> bytes:
    import json

    return json.dumps({**record.to_dict(), "version": version}).encode()


def test_the_folder_backend_reads_the_same_layout(tmp_path: Path) -> None:
    store = RetryingStore(DirectoryStore(tmp_path / "shared"))
    a, b = _replica(store, tmp_path, "a"), _replica(store, tmp_path, "b")
    a.publish("student-u", b"folder", **META)
    assert b.path("student-u").read_bytes() == b"folder"
    assert (tmp_path / "shared" / "models" / "student-u" / "1" / "metadata.json").is_file()


def test_a_stale_look_never_brings_back_a_pruned_version_number(tmp_path: Path) -> None:
    store = RetryingStore(DirectoryStore(tmp_path / "shared"))
    registry = _replica(store, tmp_path, "a", keep=2)
    for body in (b"v1", b"v2", b"v3"):
        registry.publish("student-t", body, **META)
    assert not store.list("models/student-t/1/")  # pruned, claim and all
    real_listing = registry._listing
    looks = iter([([], 0)])  # the first look predates every publish above

    def listing(name: str) -> tuple[list[int], int]:
        return next(looks, None) or real_listing(name)

    registry._listing = listing  # type: ignore[method-assign]
    assert registry.publish("student-t", b"v4", **META).version == 4
    assert not store.list("models/student-t/1/")  # the stale claim was given back
    assert [r.version for r in registry.versions("student-t")] == [3, 4]


def test_serve_puts_the_registry_in_an_s3_store_and_in_a_folder_store(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from cloud_service.cli import _registry
    from cloud_service.registry import ModelRegistry

    store = RetryingStore(DirectoryStore(tmp_path / "shared"))
    args = SimpleNamespace(
        store="s3://bucket/prefix", state_dir=tmp_path / "state", keep_versions=3
    )
    shared = _registry(args, SimpleNamespace(store=store))  # type: ignore[arg-type]
    assert isinstance(shared, StoreRegistry) and shared.store is store
    assert shared.root == tmp_path / "state" / "model-cache" and shared.keep_versions == 3
    args.store = str(tmp_path / "shared")
    folder = _registry(args, SimpleNamespace(store=store))  # type: ignore[arg-type]
    assert type(folder) is ModelRegistry and folder.root == tmp_path / "shared" / "models"
