"""``python -m benchmarks.tabular_check``: split KD on tabular data at its own scales.

For each data set, on the demo's partition (40 % presumed cloud data for the
teacher, the rest one device's train and held-out splits), prints the held-out
accuracy of: a logistic regression on standardised features (the bar a plain
method sets), the student distilled by split KD over real gRPC on loopback
(the published ONNX model, fed raw inputs), and the same student trained alone.

Data sets: scikit-learn's wine and breast cancer, and synthetic 3-class data
whose features are scaled by 1e-3 .. 1e3 (six orders of magnitude).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cloud_service.limits import RateLimiter
from cloud_service.registry import ModelRegistry
from cloud_service.server import build_grpc_server
from cloud_service.service import CloudConfig, CloudService
from cloud_service.sessions import SessionStore
from cloud_service.teacher import TEACHER_HYPER, Teacher
from edge_agent.client import CloudClient
from edge_agent.inference import Predictor
from edge_agent.trainer import EdgeTrainer, GrpcTransport
from splitkd.data import edge_split
from splitkd.data.partition import DEMO_PRESUMED_FRACTION, EdgeSplit, cloud_split
from splitkd.data.specs import Dataset
from splitkd.hyper import Hyperparameters
from splitkd.models import zoo
from splitkd.signature import DatasetSignature
from splitkd.training import accuracy_of, predict, train_supervised

STUDENT_HYPER = Hyperparameters(epochs=60, batch_size=32, seed=1)


def _dataset(x: np.ndarray, y: np.ndarray, name: str) -> Dataset:
    classes = int(y.max()) + 1
    signature = DatasetSignature((x.shape[1],), classes, name)
    return Dataset(x.astype(np.float32), y.astype(np.int64), signature)


def wine() -> Dataset:
    from sklearn.datasets import load_wine

    bunch = load_wine()
    return _dataset(bunch.data, bunch.target, "wine")


def breast_cancer() -> Dataset:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    return _dataset(bunch.data, bunch.target, "breast_cancer")


def six_orders(samples: int = 1500, features: int = 12, seed: int = 0) -> Dataset:
    """3 Gaussian classes, then feature j multiplied by 10**(-3 + 6 j / (features - 1))."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (3, features))
    y = rng.integers(0, 3, samples)
    x = centres[y] + rng.normal(0.0, 1.0, (samples, features))
    scales = 10.0 ** np.linspace(-3.0, 3.0, features)
    return _dataset(x * scales + scales, y, "six_orders")


DATASETS: dict[str, Callable[[], Dataset]] = {
    "wine": wine,
    "breast_cancer": breast_cancer,
    "six_orders": six_orders,
}


@dataclass
class Row:
    dataset: str
    heldout: int
    logistic: float
    teacher: float
    distilled: float
    alone: float


def logistic_regression(split: EdgeSplit) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(split.train.x, split.train.y)
    return float(model.score(split.heldout.x, split.heldout.y))


def distilled(teacher: Teacher, split: EdgeSplit, folder: Path) -> float:
    """Split KD over gRPC on loopback; the published ONNX model's accuracy on raw inputs."""
    # No per-device step limit: a tiny MLP on an idle machine steps faster than a device would.
    service = CloudService(
        teacher,
        ModelRegistry(folder),
        SessionStore(),
        CloudConfig(hyper=STUDENT_HYPER),
        limiter=RateLimiter(0),
    )
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    try:
        with CloudClient(f"127.0.0.1:{port}") as client:
            session = client.register("tabular-check", split.train.signature)
            transport = GrpcTransport(client, session)
            trainer = EdgeTrainer(session, split.train, split.heldout, transport)
            result = trainer.run()
            info = client.finish(session.session_id, trainer.head_state(), result.steps)
    finally:
        server.stop(0)
    predictor = Predictor(service.registry.path(info.name, info.version), (split.train.x.shape[1],))
    return predictor.accuracy(split.heldout.x, split.heldout.y)


def check(name: str, folder: Path) -> Row:
    data = DATASETS[name]()
    cloud = cloud_split(data, DEMO_PRESUMED_FRACTION)
    split = edge_split(data, presumed_fraction=DEMO_PRESUMED_FRACTION)
    teacher_spec = zoo.default_teacher(data.signature)
    teacher_model = train_supervised(teacher_spec, cloud.train, TEACHER_HYPER)
    teacher = Teacher(teacher_spec, teacher_model, None, name)
    student_spec = zoo.default_student(data.signature)
    alone = train_supervised(student_spec, split.train, STUDENT_HYPER)
    return Row(
        dataset=name,
        heldout=len(split.heldout),
        logistic=logistic_regression(split),
        teacher=accuracy_of(predict(teacher_model, split.heldout.x), split.heldout.y),
        distilled=distilled(teacher, split, folder / name),
        alone=accuracy_of(predict(alone, split.heldout.x), split.heldout.y),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="*", help=f"any of {', '.join(DATASETS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.datasets) - set(DATASETS))
    if unknown:
        parser.error(f"unknown data sets {unknown}; known: {', '.join(DATASETS)}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    header = f"{'dataset':<14} {'held-out':>8} {'logreg(std)':>11} {'teacher':>8} {'distilled':>9} {'alone':>7}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets or DATASETS:
            r = check(name, Path(tmp))
            print(
                f"{r.dataset:<14} {r.heldout:>8} {r.logistic:>11.3f} {r.teacher:>8.3f} "
                f"{r.distilled:>9.3f} {r.alone:>7.3f}"
            )


if __name__ == "__main__":
    main()
