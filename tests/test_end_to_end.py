"""The public interface end to end: real processes, real gRPC and HTTP on loopback.

A cloud process and two edge processes train at the same time; the edges
download, verify and evaluate the ONNX student; ``predict`` and ``serve``
answer from it. A second cloud serves tabular ``npz`` data with 3 classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from splitkd.demo import free_port

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "SPLITKD_LOG_LEVEL": "WARNING"}


def http_json(url: str, body: Any = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"process exited with {process.returncode}"
        try:
            return http_json(url, timeout=1.0)
        except (OSError, ValueError):
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer in {timeout} s")


@dataclass
class Cloud:
    grpc: str
    http: str
    process: subprocess.Popen[bytes]


def start_cloud(tmp: Path, *source: str, epochs: int = 3) -> Cloud:
    grpc_port, http_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cloud_service.cli", "serve", "--host", "127.0.0.1",
         "--grpc-port", str(grpc_port), "--http-port", str(http_port), *source,
         "--state-dir", str(tmp / "cloud"), "--epochs", str(epochs)],
        env=ENV, stdout=(tmp / "cloud.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    http = f"http://127.0.0.1:{http_port}"
    try:
        # Training a teacher at start-up: on a loaded 2-core machine this takes minutes.
        wait_http(f"{http}/healthz", process, timeout=600.0)
    except BaseException:
        stop(process)  # never leave a cloud behind when the test fails here
        raise
    return Cloud(f"127.0.0.1:{grpc_port}", http, process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def edge(
    *args: str, wait: bool = True
) -> subprocess.Popen[bytes] | subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "edge_agent.cli", *args]
    if wait:
        return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def digits_cloud(
    tmp_path_factory: pytest.TempPathFactory, digits_teacher_file: Path
) -> Iterator[Cloud]:
    tmp = tmp_path_factory.mktemp("digits-cloud")
    # A briefly trained teacher from a checkpoint: the --teacher path, and fast.
    cloud = start_cloud(tmp, "--teacher", str(digits_teacher_file))
    yield cloud
    stop(cloud.process)


def test_two_edges_train_at_once_then_predict_and_serve(
    digits_cloud: Cloud, tmp_path: Path
) -> None:
    edges = {}
    for i in range(2):
        edges[f"edge-{i}"] = edge(
            "train", "--cloud", digits_cloud.grpc, "--data", "digits", "--shard", f"{i}/2",
            "--device-id", f"edge-{i}", "--report", str(tmp_path / f"edge-{i}.json"),
            "--model-dir", str(tmp_path / f"edge-{i}"), "--no-progress", "--no-plots",
            "--device-profile", "raspberry-pi-4", "--link-profile", "wifi",
            wait=False,
        )  # fmt: skip
    for name, process in edges.items():
        assert isinstance(process, subprocess.Popen)
        output = process.communicate(timeout=300)[0].decode()
        assert process.returncode == 0, f"{name}: {output}"
    for name in edges:
        report = json.loads((tmp_path / f"{name}.json").read_text())
        student = report["student"]
        assert student["accuracy"] > 0.6, report["student"]
        assert student["parameters"] == 1898
        onnx = Path(student["path"]).read_bytes()
        assert hashlib.sha256(onnx).hexdigest() == student["onnx_sha256"]
        assert student["max_abs_diff"] <= 1e-4
        assert report["steps"] == 3 * 14 and len(report["history"]) == 42
        # Activations up (student + teacher head), gradients down: never the raw inputs.
        assert report["traffic"]["bytes_up"] > report["traffic"]["bytes_down"] > 0
        assert report["energy"]["estimate_joules"]["total"] > 0
        assert report["wall_seconds"] > 0 and isinstance(student["version"], int)
    # Both sessions ran on the one cloud, and each published its own student.
    sessions = http_json(f"{digits_cloud.http}/v1/sessions")["sessions"]
    assert {s["device_id"] for s in sessions} >= {"edge-0", "edge-1"}
    models = {m["name"] for m in http_json(f"{digits_cloud.http}/v1/models")["models"]}
    assert {"student-edge-0", "student-edge-1"} <= models

    sample = np.zeros((1, 8, 8), dtype=np.float32).tolist()
    # The server starts while predict runs: two processes, two model folders.
    port = free_port()
    server = edge("serve", "--host", "127.0.0.1", "--http-port", str(port),
                  "--model-dir", str(tmp_path / "edge-1"), wait=False)  # fmt: skip
    assert isinstance(server, subprocess.Popen)
    try:
        once = edge(
            "predict", "--model-dir", str(tmp_path / "edge-0"), "--json", json.dumps(sample)
        )
        assert once.returncode == 0, once.stderr
        answer = json.loads(once.stdout)
        assert len(answer["predictions"]) == 1
        assert abs(sum(answer["predictions"][0]["probabilities"]) - 1) < 1e-4

        health = wait_http(f"http://127.0.0.1:{port}/healthz", server)
        assert health["status"] == "ok"
        served = http_json(f"http://127.0.0.1:{port}/v1/predict", {"inputs": [sample, sample]})
        assert len(served["predictions"]) == 2
        with pytest.raises(urllib.error.HTTPError) as bad:
            http_json(f"http://127.0.0.1:{port}/v1/predict", {"inputs": [[1.0, 2.0]]})
        assert bad.value.code == 400 and b"do not fit the model" in bad.value.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert 'splitkd_edge_inference_requests_total{outcome="ok"} 1.0' in text
        assert 'splitkd_edge_inference_requests_total{outcome="error"} 1.0' in text
    finally:
        stop(server)


class Background:
    """An edge command running while others do; ``result()`` waits for it, like ``edge()``."""

    def __init__(self, folder: Path, name: str, *args: str) -> None:
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        command = [sys.executable, "-m", "edge_agent.cli", *args]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(command, env=ENV, stdout=out, stderr=err)

    def result(self) -> subprocess.CompletedProcess[str]:
        code = self.process.wait(timeout=300)
        out, err = (path.read_text(errors="replace") for path in (self.out, self.err))
        return subprocess.CompletedProcess(self.process.args, code, out, err)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module", autouse=True)
def unreachable_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    """The CLI mistake that takes longest: an edge whose cloud does not answer gives up only
    after its connect timeout (10 s, whatever --timeout says). Started with the module, it
    waits while the other tests run; the CLI-mistakes test reads its answer."""
    tmp = tmp_path_factory.mktemp("unreachable-cloud")
    edge = Background(
        tmp, "unreachable", "train", "--cloud", "127.0.0.1:1", "--data", "digits",
        "--timeout", "2", "--report", str(tmp / "r.json"), "--no-progress",
    )  # fmt: skip
    yield edge
    edge.kill()


def test_cli_mistakes_print_one_line_and_exit_nonzero(
    digits_cloud: Cloud, unreachable_cloud: Background, tmp_path: Path
) -> None:
    cases = [
        (["--cloud", digits_cloud.grpc, "--data", f"npz:{tmp_path}/missing.npz"], "does not exist"),
        (["--cloud", digits_cloud.grpc, "--data", "digits", "--shard", "2/2"], "shard"),
        (
            ["--cloud", digits_cloud.grpc, "--data", "digits", "--device-profile", "toaster"],
            "toaster",
        ),
    ]
    # The cases at once, each its own process; the unreachable cloud's started with the module.
    running: list[tuple[Background, str]] = []
    try:
        for i, (args, message) in enumerate(cases):
            report = str(tmp_path / f"r{i}.json")
            running.append((Background(tmp_path, f"case-{i}", "train", *args, "--report", report,
                                       "--no-progress"), message))  # fmt: skip
        running.append((unreachable_cloud, "cannot reach the cloud"))
        for device, message in running:
            result = device.result()
            assert result.returncode != 0
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and message in lines[0], result.stderr
    finally:
        for device, _ in running:
            device.kill()


def test_tabular_npz_with_three_classes_devices_with_some_and_refused_mismatches(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 3, size=(3, 6))
    # 400 samples: the teacher trains on all but its held-out 80 (the default for a file).
    y = rng.integers(0, 3, size=400)
    x = (centres[y] + rng.normal(0, 1, size=(400, 6))).astype(np.float32)
    np.savez(tmp_path / "sensors.npz", x=x, y=y)
    _kitchen_and_alien_files(tmp_path, centres)
    cloud = start_cloud(tmp_path, "--teacher-data", f"npz:{tmp_path / 'sensors.npz'}", epochs=5)
    # Every device at once, each its own process on the one cloud; checked one by one below.
    devices = {
        "gateway": (
            "train", "--cloud", cloud.grpc, "--data", f"npz:{tmp_path / 'sensors.npz'}",
            "--shard", "1/2", "--device-id", "gateway-1", "--report", str(tmp_path / "gw.json"),
            "--model-dir", str(tmp_path / "gw"), "--no-progress", "--no-plots",
        ),
        # Digits (1x8x8, 10 classes) cannot be served by this cloud's teacher.
        "refused": ("train", "--cloud", cloud.grpc, "--data", "digits",
                    "--report", str(tmp_path / "no.json"), "--no-progress"),
        "kitchen": (
            "train", "--cloud", cloud.grpc, "--data", f"npz:{tmp_path / 'kitchen.npz'}",
            "--class-weighting", "balanced", "--device-id", "kitchen",
            "--report", str(tmp_path / "kitchen.json"), "--model-dir", str(tmp_path / "kitchen"),
            "--no-progress", "--no-plots",
        ),
        "alien": (
            "train", "--cloud", cloud.grpc, "--data", f"npz:{tmp_path / 'alien.npz'}",
            "--report", str(tmp_path / "alien.json"), "--no-progress",
        ),
    }  # fmt: skip
    running: list[Background] = []
    try:
        for name, args in devices.items():
            running.append(Background(tmp_path, name, *args))
        result, refused, kitchen, alien = (device.result() for device in running)
        assert result.returncode == 0, result.stderr
        report = json.loads((tmp_path / "gw.json").read_text())
        assert report["data"]["signature"] == "features 6, 3 classes"
        assert report["student"]["accuracy"] > 0.8
        # A user's file is used whole: the teacher all of it but its held-out part, the edge
        # its shard (half), nothing set aside; both say so.
        teacher = http_json(f"{cloud.http}/healthz")["teacher"]
        assert teacher["samples"] == {
            "train": 320,
            "heldout": 80,
            "set_aside": 0,
            "other_shards": 0,
        }
        data = report["data"]
        assert data["set_aside_samples"] == 0 and data["other_shard_samples"] == 200
        assert data["train_samples"] + data["heldout_samples"] == 200
        assert "200 in other shards" in result.stdout
        meta = http_json(f"{cloud.http}/v1/models/student-gateway-1/versions/1")
        assert meta["num_classes"] == 3 and meta["input_shape"] == [6]
        assert refused.returncode != 0
        assert "FAILED_PRECONDITION" in refused.stderr and "--teacher-data" in refused.stderr
        _devices_with_some_classes(tmp_path, kitchen, alien)
    finally:
        for device in running:
            device.kill()
        stop(cloud.process)


def _kitchen_and_alien_files(tmp_path: Path, centres: np.ndarray) -> None:
    """A device holding classes 0 and 2 of 3, imbalanced 9:1; another with a label 3."""
    rng = np.random.default_rng(4)
    y = np.array([0] * 270 + [2] * 30)
    x = (centres[y] + rng.normal(0, 1, size=(300, 6))).astype(np.float32)
    np.savez(tmp_path / "kitchen.npz", x=x, y=y)
    np.savez(tmp_path / "alien.npz", x=x, y=np.where(y == 2, 3, y))


def _devices_with_some_classes(
    tmp_path: Path,
    result: subprocess.CompletedProcess[str],
    alien: subprocess.CompletedProcess[str],
) -> None:
    """The device with classes 0 and 2 of 3 trained with balanced class weights and
    reports per-class recall; the one with a label 3 was refused at Register."""
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "kitchen.json").read_text())
    data, student = report["data"], report["student"]
    assert data["signature"] == "features 6, 3 classes" and data["classes_seen"] == [0, 2]
    assert data["train_samples"] + data["heldout_samples"] == 300 and data["set_aside_samples"] == 0
    weights = data["class_weights"]
    assert len(weights) == 3 and weights[2] > 5 * weights[0]
    assert set(student["per_class_recall"]) == {"0", "2"}
    assert student["macro_recall"] == np.mean(list(student["per_class_recall"].values()))
    assert 0.0 <= student["macro_f1"] <= 1.0
    assert alien.returncode != 0
    assert "FAILED_PRECONDITION" in alien.stderr and "labels go up to 3" in alien.stderr
