"""Devices that hold some of the task's classes, imbalanced ones, and per-class figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud_service.checkpoints import SessionCheckpoints
from cloud_service.teacher import Teacher, train_teacher
from edge_agent.data import LocalData
from edge_agent.run import TrainOptions
from splitkd.classes import balanced_weights, class_scores
from splitkd.data.specs import DataError
from splitkd.hyper import Hyperparameters
from tests.support import DIGITS, make_service


def test_class_scores_give_recall_per_class_and_macro_figures() -> None:
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0])
    scores = class_scores(predicted, labels)
    assert scores.accuracy == pytest.approx(9 / 12)
    assert scores.recall == {0: 1.0, 1: 0.5, 2: 0.0}
    assert scores.support == {0: 8, 1: 2, 2: 2}
    # Accuracy hides the lost class; the macro figures do not.
    assert scores.macro_recall == pytest.approx(0.5)
    f1_class_0 = 2 * (8 / 11) * 1.0 / (8 / 11 + 1.0)
    f1_class_1 = 2 * 1.0 * 0.5 / 1.5
    assert scores.macro_f1 == pytest.approx((f1_class_0 + f1_class_1 + 0.0) / 3)
    report = scores.as_report()
    assert report["per_class_recall"] == {"0": 1.0, "1": 0.5, "2": 0.0}


def test_balanced_weights_are_inverse_frequencies_of_the_classes_present() -> None:
    labels = np.array([0] * 6 + [2] * 2)
    weights = balanced_weights(labels, 4)
    # n / (k * count): 8 / (2 * 6) and 8 / (2 * 2); absent classes 1 and 3 weigh 1.
    np.testing.assert_allclose(weights, [8 / 12, 1.0, 2.0, 1.0])
    # Weighted, each present class contributes the same total to the loss.
    assert weights[0] * 6 == pytest.approx(weights[2] * 2)


def _own_file(tmp_path: Path, labels: np.ndarray) -> str:
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "kitchen.npz", x=rng.standard_normal((len(labels), 64)), y=labels)
    return f"npz:{tmp_path / 'kitchen.npz'}"


def _options(spec: str, tmp_path: Path, weighting: str = "none") -> TrainOptions:
    return TrainOptions(
        cloud="unused:1",
        data=spec,
        shard=None,
        device_id="kitchen",
        report=tmp_path / "report.json",
        model_dir=tmp_path / "models",
        class_weighting=weighting,
    )


def test_a_device_with_some_classes_says_only_its_label_range_and_reports_them(
    tmp_path: Path,
) -> None:
    labels = np.array([1, 3, 3, 3, 3, 3, 7] * 10)  # 3 of a 10-class task, imbalanced
    local = LocalData.load(_options(_own_file(tmp_path, labels), tmp_path, "balanced"))
    assert local.classes_seen == [1, 3, 7]
    assert local.signature.num_classes == 8  # max label + 1: what Register says
    assert local.split.sample_counts()["set_aside"] == 0  # a user's own file: all of it
    weights = local.class_weights
    assert len(weights) == 8 and weights[3] < min(weights[1], weights[7]) and weights[0] == 1.0
    local.check_task(10)
    report = local.report(10)
    assert report["signature"] == "features 64, 10 classes"
    assert report["classes_seen"] == [1, 3, 7]
    assert report["train_samples"] + report["heldout_samples"] == len(labels)
    assert report["set_aside_samples"] == 0 and report["class_weighting"] == "balanced"
    assert sum(report["train_class_counts"].values()) == report["train_samples"]


def test_a_device_with_a_label_outside_the_task_is_refused_on_the_device(tmp_path: Path) -> None:
    local = LocalData.load(_options(_own_file(tmp_path, np.arange(60) % 6), tmp_path))
    with pytest.raises(DataError, match=r"labels \[4, 5\] are outside the task's 4 classes"):
        local.check_task(4)


def test_a_subset_device_registers_against_a_full_teacher(tmp_path: Path) -> None:
    """Labels 0..7 against a 10-class teacher: refused before ("10 classes, but 8")."""
    service = make_service(tmp_path)
    signature = type(DIGITS)(DIGITS.input_shape, 8, "kitchen")
    session = service.register("kitchen", signature, class_weights=[2.0] * 8)
    assert session.num_classes == 10
    assert session.class_weights == (2.0,) * 8 + (1.0, 1.0)


def test_class_weights_survive_a_cloud_restart(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    session = service.register("kitchen", DIGITS, class_weights=[0.5] * 5 + [3.0] * 5)
    store = SessionCheckpoints(tmp_path / "sessions")
    store.save_meta(session)
    store.save_state(session.session_id, session.snapshots[0])
    (restored,) = store.load_all(service.teachers)
    assert restored.class_weights == session.class_weights


def test_the_teacher_uses_all_of_a_users_file_and_says_so(tmp_path: Path) -> None:
    spec = _own_file(tmp_path, np.arange(150) % 3)
    teacher = train_teacher(spec, hyper=Hyperparameters(epochs=1))
    assert teacher.samples == {"train": 120, "heldout": 30, "set_aside": 0, "other_shards": 0}
    teacher.save(tmp_path / "teacher.safetensors")
    assert Teacher.load(tmp_path / "teacher.safetensors").samples == teacher.samples
    shared = train_teacher(spec, presumed_fraction=0.4, hyper=Hyperparameters(epochs=1))
    assert shared.samples == {"train": 48, "heldout": 12, "set_aside": 90, "other_shards": 0}
