"""The edge's files: it deletes only what it wrote, stays inside its folders, survives power loss.

A user's checkpoint folder may be their home directory or the model directory;
model names and versions come from a cloud that may be hostile (or a plaintext
link someone rewrites); files on an SD card must be whole after a power cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from edge_agent.checkpoints import EdgeCheckpoints
from edge_agent.client import CloudClient
from edge_agent.errors import EdgeError
from edge_agent.model_store import ModelStore
from edge_agent.pull import pull
from edge_agent.run import TrainOptions, train
from edge_agent.telemetry import TrainingTelemetry
from splitkd import atomic, checkpoint
from splitkd.models import zoo
from splitkd.onnx_export import export_checked
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc
from tests.support import DIGITS, LiveCloud


def _state(step: int) -> checkpoint.TrainingState:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return checkpoint.snapshot(step, model.state_dict(), optimizer)


def _install(store: ModelStore, name: str = "student-x", version: int = 1) -> bytes:
    model = zoo.build(zoo.default_student(DIGITS), seed=4)
    onnx_bytes, _ = export_checked(model, DIGITS.input_shape)
    store.root.mkdir(parents=True, exist_ok=True)
    download = store.root / "incoming.onnx"
    download.write_bytes(onnx_bytes)
    meta = {"sha256": hashlib.sha256(onnx_bytes).hexdigest(), "input_shape": [1, 8, 8]}
    store.install(name, version, download, {**meta, "size_bytes": len(onnx_bytes)})
    return onnx_bytes


# --- Checkpoints: only in a folder splitkd owns, only its own files deleted ---------------


def test_a_checkpoint_dir_holding_user_files_keeps_them(tmp_path: Path) -> None:
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / "session.json").write_text("the user's own file of that name")
    store = EdgeCheckpoints(folder)
    store.start({"session_id": "s1"})
    store.save_state(_state(0))
    assert store.session() == {"session_id": "s1"} and sorted(store.states()) == [0]
    store.clear()
    store.start({"session_id": "s2"})
    store.clear()
    assert (folder / "thesis.tex").read_text() == "years of work"
    assert (folder / "session.json").read_text() == "the user's own file of that name"
    assert store.folder == folder / "splitkd-checkpoints"


def test_clear_deletes_only_what_splitkd_wrote(tmp_path: Path) -> None:
    store = EdgeCheckpoints(tmp_path / "state")
    store.start({"session_id": "s1"})
    store.save_state(_state(0))
    store.save_state(_state(25))
    (store.folder / "notes.txt").write_text("added later by the user")
    (store.folder / "step-old.safetensors").write_text("not a name splitkd writes")
    store.clear()
    left = sorted(p.name for p in store.folder.iterdir())
    assert left == [".splitkd-checkpoints", "notes.txt", "step-old.safetensors"]
    assert EdgeCheckpoints(tmp_path / "state").folder == store.folder  # still ours


def test_train_with_the_model_dir_as_checkpoint_dir_keeps_the_model(
    live_cloud: LiveCloud, tmp_path: Path
) -> None:
    shared = tmp_path / "models"
    models = ModelStore(shared)
    onnx_bytes = _install(models, "student-older", 1)
    (shared / "README.txt").write_text("the user's")
    report = train(
        TrainOptions(
            cloud=live_cloud.address, data="digits", shard=None, device_id="edge-files",
            report=tmp_path / "report.json", model_dir=shared, checkpoint_dir=shared,
            progress=False, plots=False, retry_seconds=5,
        )
    )  # fmt: skip
    assert report["steps"] > 0
    assert (shared / "README.txt").read_text() == "the user's"
    older = models.load("student-older", 1)
    assert older.path.read_bytes() == onnx_bytes
    assert models.current().name == report["student"]["name"]


# --- Model names and versions from the cloud never leave the model directory --------------


@pytest.mark.parametrize(
    ("name", "version"),
    [("../../x", 1), ("a/b", 1), (".hidden", 1), ("", 1), ("ok", 0), ("ok", -3), ("ok", True)],
)
def test_bad_model_names_and_versions_are_refused_before_any_path(
    tmp_path: Path, name: str, version: int
) -> None:
    store = ModelStore(tmp_path / "models" / "inner")
    store.root.mkdir(parents=True)
    download = store.root / "x.onnx"
    download.write_bytes(b"onnx")
    meta = {"sha256": hashlib.sha256(b"onnx").hexdigest(), "input_shape": [3]}
    with pytest.raises(EdgeError, match="refusing model"):
        store.install(name, version, download, meta)
    with pytest.raises(EdgeError, match="refusing model"):
        store.download_path(name, version)
    assert download.read_bytes() == b"onnx"
    assert sorted(p.name for p in (tmp_path / "models").rglob("*")) == ["inner", "x.onnx"]


class _HostileCloud(pb_grpc.SplitTrainingServicer):
    """Finishes every session with a model whose name climbs out of the model directory."""

    def Finish(self, request: pb.FinishRequest, context: grpc.ServicerContext) -> pb.FinishResponse:
        return pb.FinishResponse(model=pb.ModelInfo(name="../../../etc/cron.d/x", version=1))


def test_a_hostile_cloud_cannot_name_a_model_outside_the_model_dir() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SplitTrainingServicer_to_server(_HostileCloud(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with (
            CloudClient(f"127.0.0.1:{port}", retry_seconds=1) as client,
            pytest.raises(EdgeError, match="refusing model name"),
        ):
            client.finish("0" * 32, {"w": np.zeros(2, np.float32)}, 1)
    finally:
        server.stop(0)


@pytest.fixture
def hostile_http() -> Iterator[str]:
    """A cloud HTTP API that lists a model whose latest version is a path."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(
                {"models": [{"name": "student-a", "latest": "1/../../../../x", "versions": [1]}]}
            ).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_pull_refuses_a_version_that_is_a_path(hostile_http: str, tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="refusing model version"):
        pull(hostile_http, "student-a", 0, ModelStore(tmp_path / "models"))
    with pytest.raises(EdgeError, match="refusing model name"):
        pull(hostile_http, "../x", 1, ModelStore(tmp_path / "models"))
    assert not (tmp_path / "models").exists()


# --- Durable writes ----------------------------------------------------------------------


def test_write_atomic_replaces_whole_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "CURRENT.json"
    (tmp_path / "CURRENT.json.tmp").write_text("a user's file with splitkd's old temp name")
    atomic.write_json_atomic(target, {"name": "a", "version": 1})
    atomic.write_bytes_atomic(target, b'{"name": "b", "version": 2}')
    assert json.loads(target.read_text()) == {"name": "b", "version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT.json", "CURRENT.json.tmp"]


def test_a_write_cut_short_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "metadata.json"
    target.write_text("old")

    def power_cut(*args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(atomic.os, "replace", power_cut)
    with pytest.raises(OSError, match="power cut"):
        atomic.write_bytes_atomic(target, b"new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metadata.json"]


def test_installing_a_model_fsyncs_the_files_and_their_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name file descriptors")
    monkeypatch.setattr(os, "fsync", spy)
    store = ModelStore(tmp_path / "models")
    _install(store, "student-x", 2)
    folder = store.root / "student-x" / "2"
    # The files are synced before their rename (under their temporary or download names),
    # the folders after it, so that the renames themselves survive.
    for written in ("incoming.onnx", "metadata.json", "CURRENT.json"):
        assert any(written in Path(p).name for p in synced), (written, synced)
    assert str(folder) in synced and str(store.root) in synced


# --- The report of a resumed run counts the earlier processes -----------------------------


def test_checkpoints_carry_the_runs_totals_to_the_next_process(tmp_path: Path) -> None:
    first = EdgeCheckpoints(tmp_path / "state")
    first.start({"session_id": "s1"})
    spent = {"bytes_up": 1000.0, "compute_joules": 2.5, "wall_seconds": 30.0, "steps_run": 70.0}
    first.totals = lambda: spent
    first.save_state(_state(25))
    first.save_state(_state(50))
    second = EdgeCheckpoints(tmp_path / "state")
    second.states()
    assert second.earlier == spent
    telemetry = TrainingTelemetry("laptop-x86", "ethernet")
    telemetry.earlier = second.earlier
    report = {
        "traffic": {"bytes_up": 10, "bytes_down": 20, "calls": 3},
        "timing": {"forward_seconds": 1.0, "network_seconds": 1.0, "backward_seconds": 1.0},
        "energy": {"estimate_joules": {"compute": 1.0, "idle": 0.5, "radio": 0.5, "total": 2.0}},
        "wall_seconds": 5.0,
        "faults": {},
    }
    telemetry.add_earlier(report)
    assert report["traffic"]["bytes_up"] == 1010 and report["wall_seconds"] == 35.0
    assert report["energy"]["estimate_joules"]["total"] == 4.5
    assert report["faults"]["steps_run"] == 70
    carried = telemetry.totals(bytes_up=10, bytes_down=20, calls=3, wall_seconds=5.0)
    assert carried["bytes_up"] == 1010 and carried["wall_seconds"] == 35.0


def test_the_demo_replaces_only_its_own_latest_symlink(tmp_path: Path) -> None:
    from splitkd.demo import point_latest

    (tmp_path / "latest").write_text("a user's file named latest")
    point_latest(tmp_path / "latest", "20260101-000000")
    assert (tmp_path / "latest").read_text() == "a user's file named latest"
    link = tmp_path / "other" / "latest"
    link.parent.mkdir()
    link.symlink_to("old")
    point_latest(link, "new")
    assert os.readlink(link) == "new"
