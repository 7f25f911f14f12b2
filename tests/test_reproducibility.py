"""A seed fixes a run: initial weights, batches, shards and the demo's figures.

Sessions are built on gRPC worker threads while other sessions train, so the
weights a seed gives must not depend on what other threads do meanwhile.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cloud_service.teacher import train_teacher
from splitkd.data import edge_split, load_dataset, parse_shard
from splitkd.hyper import Hyperparameters
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec
from splitkd.models.staged import StagedModel
from splitkd.signature import DatasetSignature
from splitkd.training import batch_order
from tests.support import DIGITS, make_service

ROOT = Path(__file__).resolve().parent.parent
SPECS = [
    zoo.default_student(DIGITS),
    zoo.default_student(DatasetSignature((20,), 3)),
    zoo.default_student(DatasetSignature((3, 32), 4)),
]


def weights(model: StagedModel) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_same_weights(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@contextmanager
def global_rng_traffic() -> Iterator[None]:
    """Another thread reseeding and drawing from torch's global RNG, as other code may."""
    stop = threading.Event()

    def churn() -> None:
        seed = 0
        while not stop.is_set():
            torch.manual_seed(seed)
            torch.rand(64)
            seed += 1

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def run_concurrently(jobs: list[Callable[[], Any]], threads: int = 8) -> list[Any]:
    # A barrier lines every worker up so the builds really overlap.
    barrier = threading.Barrier(threads)

    def start(job: Callable[[], Any], index: int) -> Any:
        if index < threads:
            barrier.wait(timeout=60)
        return job()

    with global_rng_traffic(), ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(start, job, i) for i, job in enumerate(jobs)]
        return [f.result(timeout=120) for f in futures]


def test_concurrent_builds_give_each_seed_its_own_weights() -> None:
    cases = [(spec, seed) for spec in SPECS for seed in range(4)] * 6  # 72 builds
    want = {(spec, seed): weights(zoo.build(spec, seed)) for spec, seed in set(cases)}
    got = run_concurrently([lambda s=s, k=k: weights(zoo.build(s, k)) for s, k in cases])
    for (spec, seed), state in zip(cases, got, strict=True):
        assert_same_weights(state, want[(spec, seed)])
    # And the seed matters: two seeds of one spec start from different weights.
    first, second = want[(SPECS[0], 0)], want[(SPECS[0], 1)]
    assert any(not np.array_equal(first[k], second[k]) for k in first)


def test_sessions_registered_at_once_start_from_the_seed_weights(tmp_path: Path) -> None:
    service = make_service(tmp_path, hyper=Hyperparameters(epochs=1, seed=5))
    want = weights(zoo.build(service.student_spec, 5))
    sessions = run_concurrently(
        [lambda i=i: service.register(f"edge-{i}", DIGITS) for i in range(48)]
    )
    assert len({s.session_id for s in sessions}) == 48
    for session in sessions:
        assert_same_weights(weights(session.student), want)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
def test_build_keeps_pytorchs_default_initialisation(spec: ModelSpec) -> None:
    """Same distributions and draws as torch's own init under ``torch.manual_seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        reference = StagedModel(zoo._FAMILIES[spec.family](spec))
    built = weights(zoo.build(spec, 3))
    # The input statistics are buffers that start as the identity, not random draws.
    assert all(
        k.endswith(("input_mean", "input_std")) for k in set(built) - set(weights(reference))
    )
    built = {k: v for k, v in built.items() if not k.endswith(("input_mean", "input_std"))}
    assert_same_weights(built, weights(reference))


def test_a_layer_without_a_seeded_init_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def with_bilinear(spec: ModelSpec) -> list[nn.Module]:
        return [nn.Sequential(nn.Bilinear(20, 20, 3)), nn.Linear(3, spec.num_classes)]

    monkeypatch.setitem(zoo._FAMILIES, "mlp", with_bilinear)
    with pytest.raises(TypeError, match="Bilinear"):
        zoo.build(SPECS[1], 0)


def test_batches_and_shards_are_functions_of_their_arguments() -> None:
    first = [b.tolist() for b in batch_order(100, 32, seed=4, epoch=2)]
    with global_rng_traffic():
        np.random.seed(1)
        again = [b.tolist() for b in batch_order(100, 32, seed=4, epoch=2)]
    assert first == again
    assert first != [b.tolist() for b in batch_order(100, 32, seed=4, epoch=3)]
    assert sorted(i for batch in first for i in batch) == list(range(100))
    dataset = load_dataset("digits")
    one = edge_split(dataset, parse_shard("1/3"), alpha=0.5, presumed_fraction=0.4)
    np.random.seed(99)
    two = edge_split(dataset, parse_shard("1/3"), alpha=0.5, presumed_fraction=0.4)
    np.testing.assert_array_equal(one.train.y, two.train.y)
    np.testing.assert_array_equal(one.heldout.x, two.heldout.x)


def test_teacher_training_is_a_function_of_its_seed() -> None:
    hyper = Hyperparameters(epochs=1, learning_rate=0.001, seed=2)
    spec = zoo.default_student(DIGITS)  # a small model: the loop is the teacher's own
    runs = run_concurrently(
        [lambda: train_teacher("digits", hyper=hyper, spec=spec) for _ in range(4)], threads=4
    )
    want = weights(runs[0].model)
    for teacher in runs[1:]:
        assert_same_weights(weights(teacher.model), want)
        assert teacher.accuracy == runs[0].accuracy


# Report fields that measure time (or energy, estimated from time) or name a place:
# everything else -- accuracies, losses, bytes, the ONNX file's hash -- must repeat.
NOT_FIGURES = {
    "cloud",
    "path",
    "run_dir",
    "wall_seconds",
    "training_seconds",
    "timing",
    "forward_seconds",
    "network_seconds",
    "backward_seconds",
    "energy_joules",
    "estimate_joules",
}


def figures(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: figures(v) for k, v in value.items() if k not in NOT_FIGURES}
    if isinstance(value, list):
        return [figures(v) for v in value]
    return value


def start_demo(runs: Path, seed: int, teacher: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "splitkd.demo", "--epochs", "2", "--seed", str(seed)]
    command += ["--teacher", str(teacher), "--runs", str(runs)]
    runs.mkdir(parents=True)
    with (runs / "demo.log").open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def demo_report(runs: Path, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    code = process.wait(timeout=300)
    assert code == 0, (runs / "demo.log").read_text(errors="replace")
    run_dir = runs / "latest"
    summary = json.loads((run_dir / "report.json").read_text())
    edges = {p.stem: json.loads(p.read_text()) for p in sorted(run_dir.glob("edge-*.json"))}
    return {"summary": summary, "edges": edges}


@pytest.mark.slow
def test_two_demo_runs_with_one_seed_report_the_same_figures(tmp_path: Path) -> None:
    # A teacher of two epochs: training the demo's own takes minutes on a loaded machine.
    teacher = train_teacher("digits", hyper=Hyperparameters(epochs=2, learning_rate=0.001))
    teacher.save(tmp_path / "teacher.safetensors")
    # Both runs at once: separate processes and ports, so neither can see the other, and each
    # runs under the other's load, which must not change a figure either.
    started = {run: start_demo(tmp_path / run, 0, tmp_path / "teacher.safetensors") for run in "ab"}
    try:
        runs = [demo_report(tmp_path / run, process) for run, process in started.items()]
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    first, second = figures(runs[0]), figures(runs[1])
    assert first == second
    # The comparison covers what matters: per-step losses, accuracies, bytes, the model.
    step = first["edges"]["edge-0"]["history"][-1]
    assert step["loss"] > 0 and step["bytes_up"] > 0
    assert first["edges"]["edge-1"]["student"]["onnx_sha256"]
    assert 0 < first["summary"]["student"]["accuracy"] <= 1
