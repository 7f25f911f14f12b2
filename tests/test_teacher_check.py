"""A teacher weaker than its student: measured on the device's data, reported, and weighted."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.tabular_check import six_orders
from cloud_service.server import build_grpc_server
from cloud_service.teacher import TEACHER_HYPER, Teacher
from edge_agent import teacher_check
from edge_agent.run import TrainOptions, train
from splitkd import codec
from splitkd.data.partition import DEMO_PRESUMED_FRACTION, cloud_split
from splitkd.hyper import Hyperparameters
from splitkd.models import zoo
from splitkd.training import train_supervised
from splitkd.v1 import splitkd_pb2 as pb
from tests.support import LiveCloud, make_service, make_teacher
from tests.test_grpc_errors import expect, register, step_request


def test_auto_alpha_keeps_a_good_teachers_weight_and_falls_to_zero_at_chance() -> None:
    labels = np.array([0, 0, 1, 2])  # the majority class is half: chance 0.5
    assert teacher_check.chance_accuracy(labels) == 0.5
    assert teacher_check.auto_alpha(0.9, 0.95, 0.5) == 0.9  # quality 0.9 >= trusted 0.8
    assert teacher_check.auto_alpha(0.9, 0.5, 0.5) == 0.0
    assert teacher_check.auto_alpha(0.9, 0.3, 0.5) == 0.0  # worse than chance: no KD at all
    assert teacher_check.auto_alpha(0.9, 0.7, 0.5) == pytest.approx(0.9 * 0.4 / 0.8)


def _run(tmp_path: Path, teacher: Teacher, data_path: Path) -> dict:  # type: ignore[type-arg]
    hyper = Hyperparameters(epochs=2, batch_size=32, seed=1)
    service = make_service(tmp_path / "cloud", hyper=hyper, teacher=teacher)
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    try:
        options = TrainOptions(
            cloud=f"127.0.0.1:{port}",
            data=f"npz:{data_path}",
            shard=None,
            device_id="edge-t",
            report=tmp_path / "report.json",
            model_dir=tmp_path / "models",
            progress=False,
            plots=False,
            checkpoint_dir=tmp_path / "ckpt",
            kd_alpha="auto",
        )
        return train(options)
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = six_orders(samples=900)
    path = tmp_path_factory.mktemp("data") / "six.npz"
    np.savez(path, x=data.x, y=data.y)
    return path


def test_an_untrained_teacher_is_flagged_and_its_kd_weight_lowered(
    tmp_path: Path, data_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.teacher_check")
    data = six_orders(samples=900)
    report = _run(tmp_path, make_teacher(data.signature), data_path)
    check = report["teacher_check"]
    assert check["cloud_reported_accuracy"] is None  # the untrained teacher has no figure
    assert check["device_heldout_accuracy"] < 0.6 and check["weak"]
    assert check["kd_alpha_used"] < 0.5 * check["cloud_kd_alpha"]
    assert "the teacher is weak on this device's data" in caplog.text
    assert "less accurate than the student it taught" in caplog.text
    alpha = check["kd_alpha_used"]
    for step in report["history"]:  # the cloud trained with the edge's weight
        expected = alpha * step["kd_loss"] + (1 - alpha) * step["ce_loss"]
        assert step["loss"] == pytest.approx(expected, rel=1e-4)


def test_a_good_teacher_keeps_its_kd_weight_and_its_reported_accuracy(
    tmp_path: Path, data_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.teacher_check")
    data = six_orders(samples=900)
    spec = zoo.default_teacher(data.signature)
    model = train_supervised(spec, cloud_split(data, DEMO_PRESUMED_FRACTION).train, TEACHER_HYPER)
    report = _run(tmp_path, Teacher(spec, model, 0.91, "six"), data_path)
    check = report["teacher_check"]
    assert check["cloud_reported_accuracy"] == pytest.approx(0.91)
    assert check["device_heldout_accuracy"] >= 0.85 and not check["weak"]
    assert check["kd_alpha_used"] == check["cloud_kd_alpha"]
    assert "teacher is weak" not in caplog.text


def test_teacher_evaluation_and_kd_alpha_are_validated(live_cloud: LiveCloud) -> None:
    session = register(live_cloud)
    stub, sid = live_cloud.stub, session.session_id
    teacher_act = codec.encode(np.zeros((3, 32, 4, 4), np.float32))
    logits = stub.Evaluate(pb.EvaluateRequest(session_id=sid, teacher_activations=teacher_act))
    assert codec.decode(logits.logits).shape == (3, 10)
    student_act = codec.encode(np.zeros((3, 8, 4, 4), np.float32))
    both = pb.EvaluateRequest(
        session_id=sid, student_activations=student_act, teacher_activations=teacher_act
    )
    expect(grpc.StatusCode.INVALID_ARGUMENT, "exactly one", stub.Evaluate, both)
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "exactly one",
        stub.Evaluate,
        pb.EvaluateRequest(session_id=sid),
    )
    wrong = pb.EvaluateRequest(session_id=sid, teacher_activations=student_act)
    expect(grpc.StatusCode.INVALID_ARGUMENT, "does not match", stub.Evaluate, wrong)
    bad = step_request(session, 0)
    bad.kd_alpha = 1.5
    expect(grpc.StatusCode.INVALID_ARGUMENT, "kd_alpha must be in [0, 1]", stub.Step, bad)
    plain = step_request(session, 0)
    plain.kd_alpha = 0.0  # set, and zero: cross-entropy only
    reply = stub.Step(plain, timeout=10)
    assert reply.loss == pytest.approx(reply.ce_loss) and reply.kd_loss > 0


def test_finish_refuses_head_statistics_that_divide_by_zero(live_cloud: LiveCloud) -> None:
    session = register(live_cloud)
    live_cloud.stub.Step(step_request(session, 0), timeout=10)
    head = codec.decode_weights(session.student_head)
    head["stages.0.input_std"] = np.zeros_like(head["stages.0.input_std"])
    request = pb.FinishRequest(
        session_id=session.session_id, student_head=codec.encode_weights(head), steps=1
    )
    expect(
        grpc.StatusCode.INVALID_ARGUMENT, "input_std must be > 0", live_cloud.stub.Finish, request
    )
