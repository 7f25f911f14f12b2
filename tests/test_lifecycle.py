"""The DiReDi loop (issue 11): feedback store, knowledge reports, guardrail, switch, privacy."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient

from cloud_service.lifecycle import Lifecycle, LifecycleSettings, StudentWeights
from cloud_service.server import build_grpc_server
from cloud_service.teacher import TeacherVersions
from edge_agent.adapt import AdaptOptions, adapt
from edge_agent.feedback import FeedbackStore
from edge_agent.http_api import create_app
from edge_agent.model_store import ModelStore
from splitkd import codec, rediredi
from splitkd.data import load_dataset
from splitkd.data.partition import cloud_split, presumed_split
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc
from tests.support import RPC_TIMEOUT, make_service, make_teacher

FAST = rediredi.LoopSettings(distil_epochs=2, adapt_epochs=2, teacher_epochs=1, probes_per_shift=10)


def make_lifecycle(tmp_path: Path, margin: float = 1.0) -> Lifecycle:
    service = make_service(tmp_path)
    service.teachers = TeacherVersions(make_teacher(), tmp_path / "teacher-versions")
    presumed = cloud_split(load_dataset("digits"), 0.4)
    return Lifecycle(
        service, presumed, StudentWeights(tmp_path / "weights"), LifecycleSettings(margin, FAST)
    )


def install_base(lifecycle: Lifecycle, models: Path) -> ModelStore:
    record = lifecycle.distil("base")
    path = lifecycle.service.registry.path("base", record.version)
    store = ModelStore(models)
    store.root.mkdir(parents=True, exist_ok=True)
    download = store.download_path("base", record.version)
    download.write_bytes(path.read_bytes())
    store.install("base", record.version, download, record.to_dict())
    return store


def user_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    dataset = load_dataset("digits")
    _, device = presumed_split(len(dataset), 0.4)
    x = np.ascontiguousarray(1.0 - dataset.x[device][:200], dtype=np.float32)
    path = tmp_path / "user.npz"
    np.savez(path, x=x, y=dataset.y[device][:200])
    return path, x


# -- feedback store ---------------------------------------------------------------------


def feedback_app(tmp_path: Path, max_records: int) -> tuple[TestClient, FeedbackStore]:
    store = install_base(make_lifecycle(tmp_path), tmp_path / "models")
    feedback = FeedbackStore(tmp_path / "feedback.sqlite3", max_records)
    return TestClient(create_app(store, feedback=feedback)), feedback


def test_feedback_with_wrong_shape_or_unknown_label_is_422_and_stores_nothing(
    tmp_path: Path,
) -> None:
    client, feedback = feedback_app(tmp_path, 10)
    sample = np.zeros((1, 8, 8)).tolist()
    for body, words in (
        ({"inputs": np.zeros((1, 4, 4)).tolist(), "label": 1}, "do not fit"),
        ({"inputs": sample, "label": 10}, "unknown label 10"),
        ({"inputs": sample, "label": -1}, "unknown label -1"),
        ({"inputs": [sample, sample], "labels": [1]}, "1 labels for 2 samples"),
        ({"inputs": sample}, "give 'label'"),
    ):
        answer = client.post("/v1/feedback", json=body)
        assert answer.status_code == 422, body
        assert words in answer.text
    assert feedback.stats().records == 0
    assert client.post("/v1/feedback", json={"inputs": sample, "label": 3}).status_code == 201
    assert client.get("/v1/feedback/stats").json()["per_label"] == {"3": 1}


def test_full_feedback_store_answers_507_and_keeps_what_it_has(tmp_path: Path) -> None:
    client, feedback = feedback_app(tmp_path, 3)
    batch = np.random.default_rng(0).random((2, 1, 8, 8)).tolist()
    assert client.post("/v1/feedback", json={"inputs": batch, "labels": [1, 2]}).status_code == 201
    full = client.post("/v1/feedback", json={"inputs": batch, "labels": [4, 5]})
    assert full.status_code == 507 and "full" in full.json()["detail"]
    assert client.get("/v1/feedback/stats").json()["records"] == 2
    feedback.close()
    # Durable: a new process (a restart, a power cut after the answer) finds them.
    reopened = FeedbackStore(tmp_path / "feedback.sqlite3", 3)
    x, y = reopened.load((1, 8, 8))
    assert y.tolist() == [1, 2] and np.allclose(x, np.asarray(batch, dtype=np.float32))


def test_feedback_needs_the_token_when_predict_does(tmp_path: Path) -> None:
    store = install_base(make_lifecycle(tmp_path), tmp_path / "models")
    feedback = FeedbackStore(tmp_path / "feedback.sqlite3", 10)
    client = TestClient(create_app(store, feedback=feedback, token="s3cret"))
    body = {"inputs": np.zeros((1, 8, 8)).tolist(), "label": 1}
    assert client.post("/v1/feedback", json=body).status_code == 401
    authorised = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/feedback", json=body, headers=authorised).status_code == 201
    assert feedback.stats().records == 1


# -- knowledge reports over gRPC ----------------------------------------------------------


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[Lifecycle, pb_grpc.LifecycleStub, ModelStore]]:
    lifecycle = make_lifecycle(tmp_path)
    store = install_base(lifecycle, tmp_path / "models")
    server, port = build_grpc_server(lifecycle.service, "127.0.0.1:0", lifecycle=lifecycle)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield lifecycle, pb_grpc.LifecycleStub(channel), store  # type: ignore[no-untyped-call]
    finally:
        channel.close()
        server.stop(0)


def _open(stub: pb_grpc.LifecycleStub, store: ModelStore) -> pb.AdaptationTask:
    model = store.current()
    request = pb.OpenAdaptationRequest(
        device_id="dev-1",
        model_name=model.name,
        model_version=model.version,
        model_sha256=model.metadata["sha256"],
    )
    task: pb.AdaptationTask = stub.OpenAdaptation(request, timeout=RPC_TIMEOUT)
    return task


def test_bad_knowledge_reports_get_a_clear_status_and_leave_the_teacher(cloud: object) -> None:
    lifecycle, stub, store = cloud  # type: ignore[misc]
    task = _open(stub, store)
    count = task.probes.shape[0]
    good = np.zeros((count, 10), np.float32)
    nan = good.copy()
    nan[0, 0] = np.nan
    cases = (
        (dict(probe_logits=codec.encode(good[:-1])), "INVALID_ARGUMENT", "shape"),
        (dict(probe_logits=codec.encode(nan)), "INVALID_ARGUMENT", "NaN"),
        (dict(probe_logits=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[count, 10], data=b"x")),
         "INVALID_ARGUMENT", "bytes"),
        (dict(probe_logits=codec.encode(good), model_version=2), "FAILED_PRECONDITION",
         "opened for base v1"),
    )  # fmt: skip
    for fields, code, words in cases:
        request = pb.KnowledgeReport(
            adaptation_id=task.adaptation_id, device_id="dev-1", model_name="base", model_version=1
        )
        for key, value in fields.items():
            if isinstance(value, pb.Tensor):
                getattr(request, key).CopyFrom(value)
            else:
                setattr(request, key, value)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ReportKnowledge(request, timeout=RPC_TIMEOUT)
        assert caught.value.code().name == code and words in (caught.value.details() or "")
    assert lifecycle.service.teachers.versions() == [1]
    wrong_file = pb.OpenAdaptationRequest(
        device_id="dev-1", model_name="base", model_version=1, model_sha256="0" * 64
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.OpenAdaptation(wrong_file, timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stranger = pb.KnowledgeReport(adaptation_id=task.adaptation_id, device_id="dev-2")
    with pytest.raises(grpc.RpcError) as caught:
        stub.ReportKnowledge(stranger, timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_guardrail_refuses_an_update_that_costs_presumed_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lifecycle = make_lifecycle(tmp_path, margin=0.02)
    # A teacher that learnt presumed digits, and an update that forgets them.
    good = rediredi.distil_on_presumed(
        make_teacher().model,
        lifecycle.service.teachers.current().spec,
        lifecycle.presumed.train.x,
        lifecycle.presumed.train.y,
        dataclasses.replace(FAST, distil_epochs=15),
    )
    lifecycle.service.teachers = TeacherVersions(
        dataclasses.replace(make_teacher(), model=good), tmp_path / "teacher-versions"
    )
    monkeypatch.setattr(rediredi, "update_teacher", lambda *args: make_teacher(seed=3).model)
    install_base(lifecycle, tmp_path / "models")
    record = lifecycle.service.registry.get("base")
    task = lifecycle.open("dev-1", "base", record.version, record.sha256)
    outcome = lifecycle.report(task, np.zeros((len(task.probes), 10), np.float32), 10)
    assert not outcome.accepted and "guardrail" in outcome.reason
    assert outcome.presumed_before - outcome.presumed_after > 0.02
    assert outcome.student is None and lifecycle.service.teachers.versions() == [1]
    assert lifecycle.updates.labels(outcome="refused")._value.get() == 1


# -- the whole loop through a recording proxy ------------------------------------------------


class RecordingProxy:
    """A TCP relay that keeps every byte the device sends towards the cloud."""

    def __init__(self, target: int) -> None:
        self.target, self.upstream = target, bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while data := source.recv(65536):
                if record:
                    self.upstream.extend(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()


def encodings(row: np.ndarray) -> dict[str, bytes]:
    """A raw input row as it would look on the wire in common encodings."""
    out = {}
    for dtype in (np.float32, np.float16, np.float64):
        raw = np.ascontiguousarray(row, dtype=dtype).tobytes()
        out[f"{dtype.__name__}"] = raw
        out[f"{dtype.__name__} base64"] = base64.b64encode(raw)
    out["json"] = json.dumps([round(float(v), 6) for v in row.ravel()[:8]])[1:-1].encode()
    return out


def test_adapt_reports_only_probe_answers_and_switches_if_better(
    tmp_path: Path, cloud: object
) -> None:
    lifecycle, _, store = cloud  # type: ignore[misc]
    server, port = build_grpc_server(lifecycle.service, "127.0.0.1:0", lifecycle=lifecycle)
    server.start()
    proxy = RecordingProxy(port)
    path, rows = user_file(tmp_path)
    try:
        report = adapt(
            AdaptOptions(
                cloud=f"127.0.0.1:{proxy.port}",
                model_dir=store.root,
                device_id="dev-1",
                report=tmp_path / "r.json",
                data=f"npz:{path}",
                loop=FAST,
            )
        )
    finally:
        server.stop(0)
        proxy.listener.close()
    assert report["accepted"] and report["teacher"] == {
        "version_before": 1, "version_after": 2, "probe_agreement": report["teacher"]["probe_agreement"]
    }  # fmt: skip
    for key in ("before", "after"):
        assert 0.0 <= report[key]["accuracy"] <= 1.0
    assert set(report["student"]) == {"name", "version", "onnx_sha256", "path"}
    assert report["traffic"]["bytes_up"] > 0 and report["guardrail"]["margin"] == 1.0
    # Switched only if better; the previous model stays for a rollback.
    assert report["switched"] == (report["after"]["accuracy"] > report["before"]["accuracy"])
    sent = bytes(proxy.upstream)
    assert len(sent) >= report["traffic"]["bytes_up"]
    for row in rows:
        for name, pattern in encodings(row).items():
            assert pattern not in sent, f"a raw row crossed as {name}"
    versions = lifecycle.service.teachers.versions()
    assert versions == [1, 2]
    provenance = json.loads((tmp_path / "teacher-versions" / "v2.json").read_text())
    assert provenance["device_id"] == "dev-1" and "presumed_accuracy_after" in provenance


def test_a_refused_update_leaves_the_device_on_its_model(tmp_path: Path, cloud: object) -> None:
    lifecycle, _, store = cloud  # type: ignore[misc]
    lifecycle.settings.margin = -1.0  # no candidate can pass: the guardrail refuses
    server, port = build_grpc_server(lifecycle.service, "127.0.0.1:0", lifecycle=lifecycle)
    server.start()
    path, _ = user_file(tmp_path)
    try:
        report = adapt(
            AdaptOptions(
                cloud=f"127.0.0.1:{port}",
                model_dir=store.root,
                device_id="dev-1",
                report=tmp_path / "r.json",
                data=f"npz:{path}",
                loop=FAST,
            )
        )
    finally:
        server.stop(0)
    assert not report["accepted"] and "guardrail" in report["reason"]
    assert report["teacher"]["version_after"] == report["teacher"]["version_before"] == 1
    assert report["student"]["name"] == "base" and store.current().name == "base"
    assert report["after"] == report["before"] and not report["switched"]


# -- faults: killed mid-update, killed mid-switch, rollback ------------------------------------

KILL_DURING_UPDATE = """
import os, signal, sys
from pathlib import Path
import cloud_service.teacher as teacher
from tests.support import make_teacher
folder = Path(sys.argv[1])
versions = teacher.TeacherVersions(make_teacher(), folder)
real = teacher.write_json_atomic
def dying(path, obj):
    if path.name == teacher.CURRENT_FILE and obj["version"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # after the weights, before the pointer
    real(path, obj)
teacher.write_json_atomic = dying
versions.update(make_teacher(seed=9).model, 0.5, {"device_id": "dev-1"})
"""


def test_cloud_killed_during_teacher_update_keeps_the_old_version(tmp_path: Path) -> None:
    folder = tmp_path / "teacher-versions"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-c", KILL_DURING_UPDATE, str(folder)], env=env)
    assert done.returncode == -signal.SIGKILL
    assert (folder / "v2.safetensors").is_file()  # the update got that far
    versions = TeacherVersions(make_teacher(), folder)
    assert versions.current().version == 1
    retried = versions.update(make_teacher(seed=9).model, 0.5, {"device_id": "dev-1"})
    assert retried.version == 3 and TeacherVersions(make_teacher(), folder).current().version == 3
    versions.rollback(1)
    assert TeacherVersions(make_teacher(), folder).current().version == 1


KILL_DURING_SWITCH = """
import os, signal, sys
from pathlib import Path
import edge_agent.model_store as model_store
store = model_store.ModelStore(Path(sys.argv[1]))
real = model_store.write_json_atomic
def dying(path, obj):
    if path.name == "CURRENT.json":
        os.kill(os.getpid(), signal.SIGKILL)  # PREVIOUS.json written, CURRENT.json not yet
    real(path, obj)
model_store.write_json_atomic = dying
store.switch(sys.argv[2], int(sys.argv[3]))
"""


def test_device_killed_during_switch_comes_back_on_a_complete_model(tmp_path: Path) -> None:
    lifecycle = make_lifecycle(tmp_path)
    store = install_base(lifecycle, tmp_path / "models")
    record = lifecycle.distil("other")
    download = store.download_path("other", 1)
    download.write_bytes(lifecycle.service.registry.path("other", 1).read_bytes())
    store.install("other", 1, download, record.to_dict(), make_current=False)
    assert store.current().name == "base"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    script = [sys.executable, "-c", KILL_DURING_SWITCH, str(store.root), "other", "1"]
    assert subprocess.run(script, env=env).returncode == -signal.SIGKILL
    assert store.current().name == "base"  # whole, checksum verified by load()
    assert store.switch("other", 1).name == "other"
    assert store.rollback().name == "base" and store.current().name == "base"
    assert store.previous().name == "other"


# -- command lines ------------------------------------------------------------------------------


def test_cloud_distill_and_teacher_list_and_rollback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud_service.cli import main

    state = tmp_path / "state"
    make_teacher().save(state / "teacher.safetensors")
    assert main(["distill", "--name", "base", "--state-dir", str(state)]) == 0
    assert "base v1: distilled from teacher v1" in capsys.readouterr().out
    versions = TeacherVersions(make_teacher(), state / "teacher-versions")
    versions.update(make_teacher(seed=4).model, 0.9, {"device_id": "dev-1", "received_at": "now",
                    "presumed_accuracy_before": 0.99, "presumed_accuracy_after": 0.98})  # fmt: skip
    assert main(["teacher", "list", "--state-dir", str(state)]) == 0
    listing = capsys.readouterr().out
    assert "* v2: from dev-1" in listing and "  v1: trained" in listing
    assert main(["teacher", "rollback", "1", "--state-dir", str(state)]) == 0
    assert TeacherVersions(make_teacher(), state / "teacher-versions").current().version == 1
    assert main(["teacher", "rollback", "7", "--state-dir", str(state)]) == 2
    assert "not kept here" in capsys.readouterr().err


def test_edge_rollback_and_adapt_without_data_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_agent.cli import main

    models = tmp_path / "models"
    assert main(["rollback", "--model-dir", str(models)]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err
    assert main(["adapt", "--cloud", "127.0.0.1:1", "--model-dir", str(models)]) == 2
    assert "give --data SPEC, --feedback, or both" in capsys.readouterr().err
    assert main(["adapt", "--cloud", "x:1", "--feedback", "--model-dir", str(models)]) == 2
    assert "no model" in capsys.readouterr().err


def test_a_running_cloud_serves_the_version_a_rollback_points_at(tmp_path: Path) -> None:
    """`splitkd-cloud teacher rollback` writes the pointer; a live cloud follows it."""
    from cloud_service.teacher import rollback_on_disk

    versions = TeacherVersions(make_teacher(), tmp_path / "teacher-versions")
    base = versions.current()
    versions.update(make_teacher(seed=8).model)
    versions.update(make_teacher(seed=9).model)
    assert versions.current().version == 3
    rollback_on_disk(tmp_path / "teacher-versions", 2)
    assert versions.current().version == 2
    assert versions.get(1) is base  # older versions stay for the sessions that use them
