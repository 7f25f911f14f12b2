"""An inference-only device has neither torch nor gRPC: ``predict`` and ``serve`` still work.

The subprocess blocks the imports (``sys.modules[name] = None`` makes ``import name``
fail), so any code path that needs torch or grpc fails this test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edge_agent.model_store import ModelStore
from splitkd.models import zoo
from splitkd.onnx_export import export_checked
from tests.support import DIGITS

BLOCKED = ("torch", "grpc", "google.protobuf", "safetensors", "sklearn", "onnx")


def run_without_training_stack(*args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    sys.modules[name] = None\n"
        "from edge_agent.cli import main\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_predict_and_the_http_app_need_no_torch(tmp_path: Path) -> None:
    model = zoo.build(zoo.default_student(DIGITS), seed=4)
    onnx_bytes, _ = export_checked(model, DIGITS.input_shape)
    download = tmp_path / "download.onnx"
    download.write_bytes(onnx_bytes)
    store = ModelStore(tmp_path / "models")
    store.install("student-pi", 1, download, {
        "name": "student-pi", "version": 1, "input_shape": [1, 8, 8], "num_classes": 10,
        "sha256": __import__("hashlib").sha256(onnx_bytes).hexdigest(), "size_bytes": len(onnx_bytes),
    })  # fmt: skip
    sample = np.ones((2, 1, 8, 8), dtype=np.float32)
    result = run_without_training_stack(
        "predict", "--model-dir", str(tmp_path / "models"), "--json", json.dumps(sample.tolist())
    )
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)["predictions"]
    assert len(predictions) == 2 and all(0 <= p["class"] < 10 for p in predictions)
    # `train` says what is missing in one line instead of a traceback.
    refused = run_without_training_stack("train", "--cloud", "x:1", "--data", "digits")
    assert refused.returncode != 0
    assert "[train]" in refused.stderr and "Traceback" not in refused.stderr
