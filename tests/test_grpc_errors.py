"""Every RPC validates its input over a real socket and answers the right status."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from cloud_service.server import build_grpc_server
from cloud_service.sessions import SessionStore
from splitkd import codec
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc
from tests.support import DIGITS, RPC_TIMEOUT, LiveCloud, make_service

B = 4


def register(
    cloud: LiveCloud, device: str = "edge-a", shape: tuple[int, ...] = (1, 8, 8), classes: int = 10
) -> pb.RegisterResponse:
    request = pb.RegisterRequest(
        device_id=device,
        signature=pb.DatasetSignature(input_shape=list(shape), num_classes=classes),
    )
    return cloud.stub.Register(request, timeout=RPC_TIMEOUT)


def step_request(
    session: pb.RegisterResponse, step: int, seed: int = 0, batch: int = B
) -> pb.StepRequest:
    rng = np.random.default_rng(seed)
    return pb.StepRequest(
        session_id=session.session_id,
        step=step,
        student_activations=codec.encode(rng.standard_normal((batch, 8, 4, 4)).astype(np.float32)),
        teacher_activations=codec.encode(rng.standard_normal((batch, 32, 4, 4)).astype(np.float32)),
        labels=codec.encode(rng.integers(0, 10, batch).astype(np.int64)),
    )


def expect(code: grpc.StatusCode, match: str, call, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=RPC_TIMEOUT)
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()


def test_a_good_step_returns_a_gradient_of_the_cut_shape(live_cloud: LiveCloud) -> None:
    session = register(live_cloud)
    assert session.student_cut == 1 and session.teacher_cut == 1
    reply = live_cloud.stub.Step(step_request(session, 0), timeout=RPC_TIMEOUT)
    gradient = codec.decode(reply.gradient)
    assert gradient.shape == (B, 8, 4, 4) and np.abs(gradient).sum() > 0
    assert reply.loss > 0 and not reply.replayed


def test_unknown_and_expired_sessions_are_not_found(tmp_path: Path) -> None:
    now = [0.0]
    service = make_service(tmp_path, store=SessionStore(idle_timeout=60, clock=lambda: now[0]))
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SplitTrainingStub(channel)  # type: ignore[no-untyped-call]
        cloud = LiveCloud(service, "", stub, channel)
        session = register(cloud)
        expect(
            grpc.StatusCode.NOT_FOUND,
            "unknown session",
            stub.Step,
            step_request(pb.RegisterResponse(session_id="f" * 32), 0),
        )
        expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            "session_id is empty",
            stub.Step,
            step_request(pb.RegisterResponse(session_id=""), 0),
        )
        now[0] = 61.0
        expect(grpc.StatusCode.NOT_FOUND, "expired", stub.Step, step_request(session, 0))
        assert len(service.sessions) == 0  # the silent session's memory is freed
    server.stop(0)


def test_wrong_dtype_shape_bytes_and_nan_are_invalid_argument(live_cloud: LiveCloud) -> None:
    session = register(live_cloud)
    stub = live_cloud.stub
    bad = step_request(session, 0)
    bad.student_activations.CopyFrom(codec.encode(np.zeros((B, 8, 4, 4), np.int32)))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "not allowed here", stub.Step, bad)
    bad = step_request(session, 0)
    bad.student_activations.CopyFrom(codec.encode(np.zeros((B, 8, 2, 8), np.float32)))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "does not match the expected", stub.Step, bad)
    bad = step_request(session, 0)
    bad.student_activations.data = bad.student_activations.data[:-3]
    expect(grpc.StatusCode.INVALID_ARGUMENT, "bytes do not match", stub.Step, bad)
    bad = step_request(session, 0)
    values = np.zeros((B, 32, 4, 4), np.float32)
    values[0, 0, 0, 0] = np.nan
    bad.teacher_activations.CopyFrom(codec.encode(values))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf", stub.Step, bad)
    bad = step_request(session, 0)
    bad.labels.CopyFrom(codec.encode(np.full(B, 10, np.int64)))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "labels must be in 0..9", stub.Step, bad)
    bad = step_request(session, 0)
    bad.labels.CopyFrom(codec.encode(np.zeros(B + 1, np.int64)))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "labels have shape", stub.Step, bad)
    bad = step_request(session, 0)
    bad.teacher_activations.CopyFrom(codec.encode(np.zeros((B + 1, 32, 4, 4), np.float32)))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "teacher activations have", stub.Step, bad)
    # None of these changed the session: step 0 is still the next one.
    assert live_cloud.stub.Step(step_request(session, 0), timeout=RPC_TIMEOUT).step == 0


def test_steps_out_of_order_and_repeats(live_cloud: LiveCloud) -> None:
    session = register(live_cloud)
    stub = live_cloud.stub
    expect(
        grpc.StatusCode.FAILED_PRECONDITION, "expects step 0", stub.Step, step_request(session, 1)
    )
    first = stub.Step(step_request(session, 0), timeout=RPC_TIMEOUT)
    state_after_first = {
        k: v.clone()
        for k, v in live_cloud.service.sessions.get(session.session_id).student.state_dict().items()
    }
    again = stub.Step(step_request(session, 0), timeout=RPC_TIMEOUT)
    assert (
        again.replayed and again.loss == first.loss and again.gradient.data == first.gradient.data
    )
    after = live_cloud.service.sessions.get(session.session_id).student.state_dict()
    assert all((after[k] == v).all() for k, v in state_after_first.items())  # not applied twice
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        "already applied with different data",
        stub.Step,
        step_request(session, 0, seed=5),
    )
    expect(grpc.StatusCode.FAILED_PRECONDITION, "out of order", stub.Step, step_request(session, 5))
    assert stub.Step(step_request(session, 1), timeout=RPC_TIMEOUT).step == 1
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        "out of order",
        stub.Step,
        step_request(session, 0, seed=9),
    )


def test_message_over_the_size_limit_is_resource_exhausted(live_cloud: LiveCloud) -> None:
    session = register(live_cloud)
    big = step_request(session, 0, batch=1)
    big.teacher_activations.data = b"\0" * (5 * 1024 * 1024)  # limit in this fixture: 4 MiB
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "", live_cloud.stub.Step, big)
    huge = step_request(session, 0)
    huge.student_activations.shape[:] = [1 << 30, 8, 4, 4]
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "above the limit", live_cloud.stub.Step, huge)
    assert live_cloud.stub.Step(step_request(session, 0), timeout=RPC_TIMEOUT).step == 0


@pytest.mark.parametrize(
    "shape,classes,match",
    [
        ((1, 28, 28), 10, "teacher serves image 1x8x8, 10 classes"),
        (
            (1, 8, 8),
            12,
            "teacher serves 10 classes (labels 0..9), but the edge's labels go up to 11",
        ),
    ],
)
def test_a_signature_the_teacher_cannot_serve_is_refused(
    live_cloud: LiveCloud, shape: tuple[int, ...], classes: int, match: str
) -> None:
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        match,
        live_cloud.stub.Register,
        pb.RegisterRequest(
            device_id="x",
            signature=pb.DatasetSignature(input_shape=list(shape), num_classes=classes),
        ),
    )


def test_a_device_holding_some_of_the_classes_is_served(live_cloud: LiveCloud) -> None:
    """Labels 0..7 of a 10-class task (or a device that does not say: 0) are compatible."""
    for classes in (8, 0):
        reply = live_cloud.stub.Register(
            pb.RegisterRequest(
                device_id="kitchen",
                signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=classes),
            ),
            timeout=10,
        )
        assert reply.student.spec_json and reply.session_id
    session = live_cloud.service.sessions.get(reply.session_id)
    assert session.num_classes == 10


@pytest.mark.parametrize(
    "weights,match",
    [
        ([1.0] * 7, "class_weights has 7 values, one per class expected (8)"),
        ([1.0] * 7 + [float("nan")], "finite"),
        ([1.0] * 7 + [0.0], "finite and >= 1e-06"),
        ([1.0] * 7 + [-2.0], "finite and >= 1e-06"),
        ([1.0] * 7 + [1e9], "<= 1e+06"),
    ],
)
def test_bad_class_weights_are_invalid_argument(
    live_cloud: LiveCloud, weights: list[float], match: str
) -> None:
    request = pb.RegisterRequest(
        device_id="kitchen",
        signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=8),
        class_weights=weights,
    )
    expect(grpc.StatusCode.INVALID_ARGUMENT, match, live_cloud.stub.Register, request)


def test_class_weights_of_some_classes_cover_the_task(live_cloud: LiveCloud) -> None:
    request = pb.RegisterRequest(
        device_id="kitchen",
        signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=3),
        class_weights=[0.5, 2.0, 4.0],
    )
    reply = live_cloud.stub.Register(request, timeout=10)
    session = live_cloud.service.sessions.get(reply.session_id)
    assert session.class_weights == (0.5, 2.0, 4.0, *[1.0] * 7)


@pytest.mark.parametrize(
    "request_,match",
    [
        (
            pb.RegisterRequest(
                device_id="", signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=10)
            ),
            "device id",
        ),
        (
            pb.RegisterRequest(
                device_id="a/b",
                signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=10),
            ),
            "device id",
        ),
        (
            pb.RegisterRequest(
                device_id="ok", signature=pb.DatasetSignature(input_shape=[], num_classes=10)
            ),
            "not supported",
        ),
        (
            pb.RegisterRequest(
                device_id="ok", signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=1)
            ),
            "classes",
        ),
        (
            pb.RegisterRequest(
                device_id="ok", signature=pb.DatasetSignature(input_shape=[0, 8], num_classes=2)
            ),
            "non-positive",
        ),
    ],
)
def test_bad_registrations_are_invalid_argument(
    live_cloud: LiveCloud, request_: pb.RegisterRequest, match: str
) -> None:
    expect(grpc.StatusCode.INVALID_ARGUMENT, match, live_cloud.stub.Register, request_)


def test_evaluate_and_finish_validate(live_cloud: LiveCloud) -> None:
    session = register(live_cloud)
    stub = live_cloud.stub
    logits = stub.Evaluate(
        pb.EvaluateRequest(
            session_id=session.session_id,
            student_activations=codec.encode(np.zeros((3, 8, 4, 4), np.float32)),
        ),
        timeout=RPC_TIMEOUT,
    )
    assert codec.decode(logits.logits).shape == (3, 10)
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "does not match",
        stub.Evaluate,
        pb.EvaluateRequest(
            session_id=session.session_id,
            student_activations=codec.encode(np.zeros((3, 9), np.float32)),
        ),
    )
    stub.Step(step_request(session, 0), timeout=RPC_TIMEOUT)
    head = session.student_head
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        "cloud applied 1",
        stub.Finish,
        pb.FinishRequest(session_id=session.session_id, student_head=head, steps=7),
    )
    wrong = pb.ModelWeights(tensors=list(head.tensors)[:1])
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "missing tensors",
        stub.Finish,
        pb.FinishRequest(session_id=session.session_id, student_head=wrong, steps=1),
    )
    done = stub.Finish(
        pb.FinishRequest(session_id=session.session_id, student_head=head, steps=1), timeout=60
    )
    assert done.model.version == 1 and done.model.max_abs_diff <= 1e-4
    # Finishing again (a retry) answers the same version; stepping a finished session is refused.
    assert (
        stub.Finish(
            pb.FinishRequest(session_id=session.session_id, student_head=head, steps=1), timeout=60
        ).model.sha256
        == done.model.sha256
    )
    expect(grpc.StatusCode.FAILED_PRECONDITION, "finished", stub.Step, step_request(session, 1))


def test_download_validates_and_streams_the_whole_file(live_cloud: LiveCloud) -> None:
    session = register(live_cloud)
    stub = live_cloud.stub
    stub.Step(step_request(session, 0), timeout=RPC_TIMEOUT)
    info = stub.Finish(
        pb.FinishRequest(session_id=session.session_id, student_head=session.student_head, steps=1),
        timeout=60,
    ).model
    data = b"".join(
        c.data
        for c in stub.DownloadModel(pb.DownloadModelRequest(name=info.name), timeout=RPC_TIMEOUT)
    )
    assert len(data) == info.size_bytes
    import hashlib

    assert hashlib.sha256(data).hexdigest() == info.sha256
    tail = b"".join(
        c.data
        for c in stub.DownloadModel(
            pb.DownloadModelRequest(name=info.name, offset=100), timeout=RPC_TIMEOUT
        )
    )
    assert tail == data[100:]
    for request, code, match in [
        (pb.DownloadModelRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "no model 'nope'"),
        (
            pb.DownloadModelRequest(name=info.name, version=9),
            grpc.StatusCode.NOT_FOUND,
            "version 9 here",
        ),
        (
            pb.DownloadModelRequest(name=info.name, offset=10**9),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside",
        ),
        (pb.DownloadModelRequest(name="../etc"), grpc.StatusCode.INVALID_ARGUMENT, "model name"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.DownloadModel(request, timeout=RPC_TIMEOUT))
        assert caught.value.code() == code and match in caught.value.details()


def test_bad_peers_do_not_harm_another_session(live_cloud: LiveCloud) -> None:
    healthy = register(live_cloud, "healthy")
    victim_target = register(live_cloud, "attacker")
    stub = live_cloud.stub
    for step in range(3):
        garbage = step_request(victim_target, step)
        garbage.student_activations.data = b"\xff" * 7
        with pytest.raises(grpc.RpcError):
            stub.Step(garbage, timeout=RPC_TIMEOUT)
        assert stub.Step(step_request(healthy, step), timeout=RPC_TIMEOUT).step == step
    assert live_cloud.service.sessions.get(healthy.session_id).next_step == 3


def test_signature_describes_digits() -> None:
    assert DIGITS.describe() == "image 1x8x8, 10 classes"
