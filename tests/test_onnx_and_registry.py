import hashlib
from pathlib import Path

import numpy as np
import pytest

from cloud_service.registry import ModelRegistry
from edge_agent.inference import Predictor
from splitkd.errors import InvalidArgument, NotFound
from splitkd.models import zoo
from splitkd.onnx_export import export_checked, parity
from splitkd.signature import DatasetSignature


@pytest.mark.parametrize(
    "signature",
    [DatasetSignature((1, 8, 8), 10), DatasetSignature((12,), 3), DatasetSignature((2, 30), 4)],
    ids=lambda s: s.kind,
)
def test_onnxruntime_matches_pytorch_for_every_family(
    tmp_path: Path, signature: DatasetSignature
) -> None:
    model = zoo.build(zoo.default_student(signature), seed=1)
    onnx_bytes, diff = export_checked(model, signature.input_shape)
    assert diff <= 1e-4
    # A batch size never seen at export time: the batch dimension is dynamic.
    x = np.random.default_rng(2).standard_normal((37, *signature.input_shape)).astype(np.float32)
    assert parity(model, onnx_bytes, x) <= 1e-4
    path = tmp_path / "m.onnx"
    path.write_bytes(onnx_bytes)
    prediction = Predictor(path, signature.input_shape).predict(x)
    assert prediction.classes.shape == (37,)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_parity_detects_a_different_model() -> None:
    signature = DatasetSignature((12,), 3)
    a, b = (
        zoo.build(zoo.default_student(signature), 1),
        zoo.build(zoo.default_student(signature), 2),
    )
    onnx_bytes, _ = export_checked(a, signature.input_shape)
    x = np.ones((4, 12), np.float32)
    assert parity(b, onnx_bytes, x) > 1e-3


def test_registry_versions_and_checksums(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    meta = {"parameters": 10, "max_abs_diff": 0.0, "input_shape": [3], "num_classes": 2}
    first = registry.publish("student-a", b"one", **meta)
    second = registry.publish("student-a", b"two!", **meta)
    assert (first.version, second.version) == (1, 2)
    assert second.sha256 == hashlib.sha256(b"two!").hexdigest() and second.size_bytes == 4
    assert registry.get("student-a").version == 2
    assert registry.path("student-a", 1).read_bytes() == b"one"
    assert registry.names() == ["student-a"]
    assert [r.version for r in ModelRegistry(tmp_path).versions("student-a")] == [
        1,
        2,
    ]  # survives a restart
    with pytest.raises(NotFound):
        registry.get("student-a", 3)
    with pytest.raises(InvalidArgument):
        registry.publish("../escape", b"x", **meta)
