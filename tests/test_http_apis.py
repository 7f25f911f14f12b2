"""The cloud's and the edge's HTTP APIs, through FastAPI's test client."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cloud_service.http_api import create_app as cloud_app
from edge_agent.cli import main as cli_main
from edge_agent.http_api import create_app as edge_app
from edge_agent.http_api import default_body_limit
from edge_agent.model_store import ModelStore
from splitkd.errors import SplitKDError
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


# --- Memory: the body and the array are bounded before they are built ---------------------


def test_a_body_larger_than_a_full_batch_is_refused_with_413(edge_store: ModelStore) -> None:
    client = TestClient(edge_app(edge_store))
    # 4000 samples of 64 values: far more than a full batch (1024) of JSON numbers.
    big = json.dumps({"inputs": [[[[0.123456789] * 8] * 8]] * 4000}).encode()
    assert len(big) > default_body_limit((1, 8, 8))
    reply = client.post("/v1/predict", content=big, headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "larger than" in reply.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for start in range(0, len(big), 1 << 16):
            yield big[start : start + (1 << 16)]

    streamed = client.post(
        "/v1/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    small = TestClient(edge_app(edge_store, max_body_bytes=200))
    one = {"inputs": np.zeros((1, 8, 8)).tolist()}
    assert small.post("/v1/predict", json=one).status_code == 413
    assert client.post("/v1/predict", json=one).status_code == 200


@pytest.mark.parametrize(
    ("inputs", "status", "match"),
    [
        # One sample wrapping 1100 samples: passes the top-level batch cap of 1024.
        ([np.zeros((1100, 1, 8, 8)).tolist()], 413, "more than 65536 values"),
        ([[[[[[0.0]]]]]], 400, "nested deeper"),
        ([[[0.0] * 8] * 8, [[0.0] * 8] * 7], 400, "unequal length"),
    ],
    ids=["nested-batch", "too-deep", "ragged"],
)
def test_nested_and_ragged_inputs_are_counted_before_numpy(
    edge_store: ModelStore, inputs: list[Any], status: int, match: str
) -> None:
    reply = TestClient(edge_app(edge_store)).post("/v1/predict", json={"inputs": inputs})
    assert reply.status_code == status and match in reply.json()["detail"]


# --- Authentication ------------------------------------------------------------------------


def test_a_token_guards_predict_but_not_health_or_metrics(edge_store: ModelStore) -> None:
    client = TestClient(edge_app(edge_store, token="s3cret-token"))
    one = {"inputs": np.zeros((1, 8, 8)).tolist()}
    missing = client.post("/v1/predict", json=one)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/v1/predict", json=one, headers={"Authorization": "Bearer s3cret-tokeX"})
    assert wrong.status_code == 401
    basic = client.post("/v1/predict", json=one, headers={"Authorization": "Basic s3cret-token"})
    assert basic.status_code == 401
    right = client.post("/v1/predict", json=one, headers={"Authorization": "Bearer s3cret-token"})
    assert right.status_code == 200 and len(right.json()["predictions"]) == 1
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_serve_reads_the_token_from_a_file(tmp_path: Path) -> None:
    from edge_agent import security
    from edge_agent.cli import PROGRAM

    token_file = tmp_path / "http.token"
    token_file.write_text("from-a-file\n")
    _, _, options = PROGRAM.parse(["serve", "--http-token-file", str(token_file)])
    assert security.http_token(options) == "from-a-file"  # type: ignore[arg-type]
    empty = tmp_path / "empty.token"
    empty.write_text("")
    _, _, options = PROGRAM.parse(["serve", "--http-token-file", str(empty)])
    with pytest.raises(SplitKDError, match="is empty"):
        security.http_token(options)  # type: ignore[arg-type]


# --- Damaged local files: 503 with a reason, and one line from the CLI ---------------------


def _garbage_model(store: ModelStore) -> None:
    model = store.current()
    model.path.write_bytes(b"not an onnx model")
    meta = {**model.metadata, "sha256": hashlib.sha256(b"not an onnx model").hexdigest()}
    (model.path.parent / "metadata.json").write_text(json.dumps(meta))


DAMAGE = {
    "truncated-model": lambda s: s.current().path.write_bytes(s.current().path.read_bytes()[:-9]),
    "garbage-model-matching-sha": _garbage_model,
    "no-metadata": lambda s: (s.current().path.parent / "metadata.json").unlink(),
    "garbage-metadata": lambda s: (s.current().path.parent / "metadata.json").write_text("{"),
    "metadata-without-shape": lambda s: (s.current().path.parent / "metadata.json").write_text(
        json.dumps({"sha256": s.current().metadata["sha256"]})
    ),
    "garbage-pointer": lambda s: (s.root / "CURRENT.json").write_text("[]"),
    "pointer-outside": lambda s: (s.root / "CURRENT.json").write_text(
        json.dumps({"name": "../..", "version": 1})
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_model_gives_503_and_one_cli_line(
    edge_store: ModelStore, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    DAMAGE[damage](edge_store)
    client = TestClient(edge_app(edge_store), raise_server_exceptions=False)
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json()["status"] == "model-unusable"
    assert "pull" in health.json()["detail"]
    reply = client.post("/v1/predict", json={"inputs": np.zeros((1, 8, 8)).tolist()})
    assert reply.status_code == 503 and "pull" in reply.json()["detail"]
    code = cli_main(["predict", "--model-dir", str(edge_store.root), "--json", "[[0.0]]"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("splitkd-edge: error:")
    assert "Traceback" not in err


def test_no_model_gives_503_no_model(tmp_path: Path) -> None:
    health = TestClient(edge_app(ModelStore(tmp_path / "none"))).get("/healthz")
    assert health.status_code == 503 and health.json()["status"] == "no-model"
