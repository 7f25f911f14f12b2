"""Fleets with real processes: a device killed mid-cohort, a cloud killed and restarted.

A cloud process and edge processes on loopback, as an operator runs them.
Faults are real signals; the cohort must complete, and no round may be
applied twice.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_service.teacher import train_teacher
from splitkd.data import load_dataset
from splitkd.demo import free_port
from splitkd.hyper import Hyperparameters
from tests.test_end_to_end import ENV, http_json, stop, wait_http

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("fleet-assets")
    teacher = folder / "teacher.safetensors"
    train_teacher("digits", hyper=Hyperparameters(epochs=4, learning_rate=0.001)).save(teacher)
    proxy = folder / "proxy.npz"
    x = load_dataset("digits").x[:200]
    np.savez(proxy, x=x, y=np.zeros(len(x), np.int64))  # labels are ignored by the cloud
    yield teacher, proxy


class FleetCloud:
    def __init__(self, folder: Path, teacher: Path, proxy: Path, **cohort: object) -> None:
        self.folder, self.teacher, self.proxy, self.cohort = folder, teacher, proxy, cohort
        self.grpc_port, self.http_port = free_port(), free_port()
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in self.cohort.items()]
        log = (self.folder / f"cloud-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cloud_service.cli", "serve", "--host", "127.0.0.1",
             "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
             "--teacher", str(self.teacher), "--proxy-data", f"npz:{self.proxy}",
             "--state-dir", str(self.folder / "state"), *flags],
            env=ENV, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.starts += 1
        wait_http(f"http://127.0.0.1:{self.http_port}/healthz", self.process)

    def cohort_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = http_json(
                f"http://127.0.0.1:{self.http_port}/v1/cohorts/fleet", timeout=2.0
            )
            return state
        except OSError:
            return {}

    def wait_round(self, closed: int, edges: list[subprocess.Popen[bytes]]) -> None:
        """Until ``closed`` rounds of the cohort closed."""
        deadline = time.monotonic() + 300
        while len(self.cohort_state().get("rounds", [])) < closed:
            assert all(e.poll() is None for e in edges), "an edge exited before the fault"
            assert time.monotonic() < deadline, f"round {closed} did not close"
            time.sleep(0.2)


def start_edge(
    folder: Path, cloud: FleetCloud, i: int, count: int, *flags: str
) -> subprocess.Popen[bytes]:
    name = f"edge-{i}"
    command = [
        sys.executable, "-m", "edge_agent.cli", "train", "--cloud", f"127.0.0.1:{cloud.grpc_port}",
        "--data", "digits", "--shard", f"{i}/{count}", "--dirichlet-alpha", "0.5",
        "--presumed-fraction", "0.4", "--cohort", "fleet", "--device-id", name,
        "--report", str(folder / f"{name}.json"), "--model-dir", str(folder / name / "models"),
        "--checkpoint-dir", str(folder / name / "checkpoints"), "--no-progress", "--no-plots",
        "--timeout", "20", "--retry-seconds", "180", *flags,
    ]  # fmt: skip
    log = (folder / f"{name}.log").open("ab")
    return subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def finished(edge: subprocess.Popen[bytes], folder: Path, i: int) -> dict[str, Any]:
    assert edge.wait(400) == 0, (folder / f"edge-{i}.log").read_text()[-3000:]
    report: dict[str, Any] = json.loads((folder / f"edge-{i}.json").read_text())
    return report


def test_a_device_killed_mid_cohort_does_not_stall_the_fleet(
    assets: tuple[Path, Path], tmp_path: Path
) -> None:
    teacher, proxy = assets
    cloud = FleetCloud(
        tmp_path, teacher, proxy, cohort_mode="federated", cohort_min_devices=3, rounds=4,
        local_epochs=1, round_timeout=8,
    )  # fmt: skip
    cloud.start()
    edges = [start_edge(tmp_path, cloud, i, 3) for i in range(3)]
    try:
        cloud.wait_round(1, edges)
        edges[2].send_signal(signal.SIGKILL)
        edges[2].wait(10)
        reports = [finished(edges[i], tmp_path, i) for i in range(2)]
        state = cloud.cohort_state()
    finally:
        for e in edges:
            stop(e)
        assert cloud.process is not None
        stop(cloud.process)
    assert state["complete"] is True
    assert [r["round"] for r in state["rounds"]] == [1, 2, 3, 4]
    assert state["rounds"][0]["devices"] == 3
    assert all(r["devices"] == 2 for r in state["rounds"][2:])  # the dead one no longer counts
    for report in reports:
        assert report["cohort"]["name"] == "fleet" and report["cohort"]["mode"] == "federated"
        assert [r["round"] for r in report["cohort"]["rounds"]] == [1, 2, 3, 4]
        assert report["student"]["name"] == "cohort-fleet"
        assert report["student"]["accuracy"] > 0.3  # chance is 0.1


def test_a_cloud_killed_mid_cohort_resumes_it_and_applies_nothing_twice(
    assets: tuple[Path, Path], tmp_path: Path
) -> None:
    teacher, proxy = assets
    cloud = FleetCloud(
        tmp_path, teacher, proxy, cohort_mode="federated", cohort_min_devices=2, rounds=3,
        local_epochs=1, round_timeout=60,
    )  # fmt: skip
    cloud.start()
    edges = [start_edge(tmp_path, cloud, i, 2) for i in range(2)]
    try:
        cloud.wait_round(1, edges)
        assert cloud.process is not None
        cloud.process.send_signal(signal.SIGKILL)
        cloud.process.wait(10)
        cloud.start()  # same ports, same state folder
        reports = [finished(edges[i], tmp_path, i) for i in range(2)]
        state = cloud.cohort_state()
    finally:
        for e in edges:
            stop(e)
        assert cloud.process is not None
        stop(cloud.process)
    assert state["complete"] is True
    assert [r["round"] for r in state["rounds"]] == [1, 2, 3]
    # One server-model update per round (KOALA), none repeated by the restart.
    assert state["server_model_version"] == 4
    for report in reports:
        assert [r["round"] for r in report["cohort"]["rounds"]] == [1, 2, 3]


def test_a_split_cohort_on_the_frugal_wire_survives_a_cloud_restart(
    assets: tuple[Path, Path], tmp_path: Path
) -> None:
    """The edges ask int8 and cut 2 on the command line; the cloud keeps each member's
    teacher outputs across rounds, loses them when killed, and the edges send them again."""
    teacher, proxy = assets
    cloud = FleetCloud(
        tmp_path, teacher, proxy, cohort_mode="split", cohort_min_devices=2, rounds=3,
        local_epochs=1, round_timeout=60,
    )  # fmt: skip
    cloud.start()
    wire = ("--wire-codec", "int8-stochastic", "--student-cut", "2")
    edges = [start_edge(tmp_path, cloud, i, 2, *wire) for i in range(2)]
    try:
        cloud.wait_round(1, edges)
        assert cloud.process is not None
        cloud.process.send_signal(signal.SIGKILL)
        cloud.process.wait(10)
        cloud.start()  # same ports, same state folder; the members' caches are gone
        reports = [finished(edges[i], tmp_path, i) for i in range(2)]
        state = cloud.cohort_state()
    finally:
        for e in edges:
            stop(e)
        assert cloud.process is not None
        stop(cloud.process)
    assert state["complete"] is True
    assert [r["round"] for r in state["rounds"]] == [1, 2, 3]
    for report in reports:
        cohort = report["cohort"]
        assert cohort["wire"] == {
            "codec": "int8-stochastic",
            "student_cut": 2,
            "teacher_cache": True,
        }
        rounds = cohort["rounds"]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        # Round 1 sent the teacher's activations; the restart made the cloud ask for them
        # again in the round it hit (2, or 3 on a slow box); the other found them cached.
        later = min(rounds[1]["bytes_up"], rounds[2]["bytes_up"])
        assert later < 0.7 * rounds[0]["bytes_up"], rounds
        assert report["student"]["accuracy"] > 0.3  # chance is 0.1
