"""The cloud's and the edge's HTTP APIs, through FastAPI's test client."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cloud_service.http_api import create_app as cloud_app
from edge_agent.http_api import create_app as edge_app
from edge_agent.model_store import ModelStore
from splitkd.models import zoo
from splitkd.onnx_export import export_checked
from tests.support import DIGITS, apply_steps, make_service


def _publish(service, tmp_path: Path):  # type: ignore[no-untyped-def]
    session = service.register("edge-h", DIGITS)
    apply_steps(service, session.session_id, 1)
    head = session.student.part_state(0, session.student_cut)
    return service.finish(session.session_id, head, 1)


def test_cloud_http_api(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    client = TestClient(cloud_app(service))
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["teacher"]["parameters"] > 50 * 1000
    assert client.get("/v1/models").json() == {"models": []}
    record = _publish(service, tmp_path)
    assert client.get("/v1/models").json()["models"] == [
        {"name": record.name, "latest": 1, "versions": [1]}
    ]
    meta = client.get(f"/v1/models/{record.name}/versions/1").json()
    assert meta["sha256"] == record.sha256 and meta["input_shape"] == [1, 8, 8]
    onnx = client.get(f"/v1/models/{record.name}/versions/1/model.onnx")
    assert onnx.status_code == 200 and len(onnx.content) == record.size_bytes
    assert onnx.headers["x-model-sha256"] == record.sha256
    sessions = client.get("/v1/sessions").json()["sessions"]
    assert sessions[0]["device_id"] == "edge-h" and len(sessions[0]["session"]) == 8
    assert client.get(f"/v1/models/{record.name}/versions/2").status_code == 404
    assert "version 2 here" in client.get(f"/v1/models/{record.name}/versions/2").json()["detail"]
    assert client.get("/v1/models/nope/versions/1/model.onnx").status_code == 404
    assert client.get(f"/v1/models/{record.name}/versions/0").status_code == 422
    assert client.get(f"/v1/models/{record.name}/versions/abc").status_code == 422
    assert client.get("/v1/models/bad%20name/versions/1").status_code == 422


@pytest.fixture
def edge_store(tmp_path: Path) -> ModelStore:
    model = zoo.build(zoo.default_student(DIGITS), seed=4)
    onnx_bytes, _diff = export_checked(model, DIGITS.input_shape)
    download = tmp_path / "download.onnx"
    download.write_bytes(onnx_bytes)
    import hashlib

    store = ModelStore(tmp_path / "models")
    store.root.mkdir(parents=True)
    store.install(
        "student-x",
        3,
        download,
        {
            "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "input_shape": [1, 8, 8],
            "num_classes": 10,
            "size_bytes": len(onnx_bytes),
        },
    )
    return store


def test_edge_predict_api(edge_store: ModelStore) -> None:
    client = TestClient(edge_app(edge_store))
    assert client.get("/healthz").json() == {
        "status": "ok",
        "model": {"name": "student-x", "version": 3},
    }
    one = np.random.default_rng(0).random((1, 8, 8)).tolist()
    reply = client.post("/v1/predict", json={"inputs": one})
    assert reply.status_code == 200
    (prediction,) = reply.json()["predictions"]
    assert 0 <= prediction["class"] < 10 and abs(sum(prediction["probabilities"]) - 1) < 1e-4
    batch = np.random.default_rng(1).random((5, 1, 8, 8)).tolist()
    assert len(client.post("/v1/predict", json={"inputs": batch}).json()["predictions"]) == 5


@pytest.mark.parametrize(
    "body,status,match",
    [
        ({"inputs": [[1.0, 2.0]]}, 400, "do not fit the model"),
        ({"inputs": [["a"] * 8] * 8}, 400, "numeric"),
        ({"inputs": [[[1.0] * 8] * 8, [[1.0] * 3]]}, 400, "numeric"),
        ({"inputs": []}, 422, ""),
        ({"nothing": 1}, 422, ""),
        ({"inputs": [[[float("nan")] * 8] * 8]}, 400, ""),
    ],
)
def test_edge_predict_rejects_bad_bodies(
    edge_store: ModelStore, body: dict, status: int, match: str
) -> None:  # type: ignore[type-arg]
    client = TestClient(edge_app(edge_store))
    reply = client.post(
        "/v1/predict",
        content=json.dumps(body, allow_nan=True),
        headers={"content-type": "application/json"},
    )
    assert reply.status_code == status
    assert match in json.dumps(reply.json())


def test_edge_without_a_model_answers_503(tmp_path: Path) -> None:
    client = TestClient(edge_app(ModelStore(tmp_path / "empty")))
    assert client.get("/healthz").json()["status"] == "no-model"
    reply = client.post("/v1/predict", json={"inputs": [[0.0]]})
    assert reply.status_code == 503 and "splitkd-edge train" in reply.json()["detail"]


def test_corrupted_model_is_detected(edge_store: ModelStore) -> None:
    current = edge_store.current()
    current.path.write_bytes(current.path.read_bytes()[:-10])
    client = TestClient(edge_app(edge_store))
    assert client.post("/v1/predict", json={"inputs": [[[0.0] * 8] * 8]}).status_code == 503
