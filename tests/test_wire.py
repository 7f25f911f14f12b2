"""The frugal wire: codecs, their strict decoding, the teacher-output cache, asked cuts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from cloud_service.server import build_grpc_server
from cloud_service.service import CloudConfig
from edge_agent.client import CloudClient
from edge_agent.trainer import EdgeTrainer, GrpcTransport
from splitkd import codec, codecs
from splitkd.data import edge_split, load_dataset
from splitkd.data.partition import DEMO_PRESUMED_FRACTION, Shard
from splitkd.errors import InvalidArgument, ResourceExhausted
from splitkd.hyper import Hyperparameters
from splitkd.messages import SessionAsk
from splitkd.names import TEACHER_CACHE_MISS
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc
from tests.support import DIGITS, make_service

RNG = np.random.default_rng(0)
ACTS = RNG.normal(size=(32, 16, 2, 2)).astype(np.float32)
SHAPE = (None, 16, 2, 2)


def roundtrip(name: str, array: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
    wire = codecs.make(name)
    encoded = codec.unpack(codec.pack(wire.encode(array, keys)), what="x", shape=SHAPE)
    wire.check(encoded, "x")
    return wire.decode(encoded)


def test_float_codecs_are_exact_or_half_precision() -> None:
    assert np.array_equal(roundtrip("float32", ACTS), ACTS)
    np.testing.assert_allclose(roundtrip("float16", ACTS), ACTS, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["int8", "int8-stochastic"])
def test_int8_error_is_within_one_step_of_each_channel_scale(name: str) -> None:
    encoded = codecs.make(name).encode(ACTS)
    assert encoded.scale is not None and encoded.scale.shape == (16,)
    error = np.abs(roundtrip(name, ACTS) - ACTS).max(axis=(0, 2, 3))
    bound = encoded.scale * (0.5 if name == "int8" else 1.0) + 1e-6
    assert (error <= bound).all()
    # One byte per element plus 5 per channel: a quarter of float32.
    assert (
        codec.pack(encoded).ByteSize()
        < 0.27 * codec.pack(codecs.make("float32").encode(ACTS)).ByteSize()
    )


def test_stochastic_rounding_is_unbiased() -> None:
    x = np.full((4096, 2), 0.3, dtype=np.float32)
    x[:, 1] = 1.0  # a channel range of [0, 1]: 0.3 falls between two levels
    decoded = roundtrip_any("int8-stochastic", x, (None, 2))
    nearest = roundtrip_any("int8", x, (None, 2))
    assert abs(decoded[:, 0].mean() - 0.3) < abs(nearest[:, 0].mean() - 0.3) + 1e-4
    assert abs(decoded[:, 0].mean() - 0.3) < 2e-4


def roundtrip_any(name: str, array: np.ndarray, shape: tuple[int | None, ...]) -> np.ndarray:
    wire = codecs.make(name)
    return wire.decode(codec.unpack(codec.pack(wire.encode(array)), what="x", shape=shape))


def test_topk_sends_the_largest_and_feeds_the_rest_back_per_sample() -> None:
    wire = codecs.make("topk", topk_ratio=0.25)
    keys = np.arange(32)
    first = wire.decode(wire.encode(ACTS, keys))
    assert (first != 0).sum(axis=(1, 2, 3)).max() == 16  # a quarter of 64 per sample
    # What was left out comes back the next time the same samples go: over many
    # rounds every element of a fixed tensor has been sent.
    total = first.copy()
    for _ in range(8):
        total += wire.decode(wire.encode(ACTS, keys))
    np.testing.assert_allclose(total / 9, ACTS, atol=0.35)
    wire.reset()
    assert not wire.residual


def _tensor(**fields: Any) -> pb.Tensor:
    base: dict[str, Any] = {
        "dtype": pb.DTYPE_INT8,
        "shape": [2, 3],
        "data": bytes(6),
        "encoding": pb.ENCODING_AFFINE_INT8,
        "scale": np.ones(3, "<f4").tobytes(),
        "zero_point": bytes(3),
    }
    return pb.Tensor(**{**base, **fields})


def _sparse(positions: list[int], shape: list[int] | None = None, **fields: Any) -> pb.Tensor:
    values = np.ones(len(positions), "<f2").tobytes()
    base: dict[str, Any] = {
        "dtype": pb.DTYPE_FLOAT16,
        "shape": shape or [2, 3],
        "data": values,
        "encoding": pb.ENCODING_SPARSE,
        "indices": np.array(positions, "<i4").tobytes(),
    }
    return pb.Tensor(**{**base, **fields})


BAD = {
    "scale NaN": _tensor(scale=np.array([1, np.nan, 1], "<f4").tobytes()),
    "scale Inf": _tensor(scale=np.array([1, np.inf, 1], "<f4").tobytes()),
    "scale zero": _tensor(scale=np.array([1, 0, 1], "<f4").tobytes()),
    "scale negative": _tensor(scale=np.array([1, -1, 1], "<f4").tobytes()),
    "too few scales": _tensor(scale=np.ones(2, "<f4").tobytes()),
    "zero points missing": _tensor(zero_point=b""),
    "int8 payload short": _tensor(data=bytes(5)),
    "int8 with indices": _tensor(indices=bytes(4)),
    "int8 as float32": _tensor(dtype=pb.DTYPE_FLOAT32, data=bytes(24)),
    "index out of range": _sparse([0, 6]),
    "index negative": _sparse([-1, 2]),
    "index repeated": _sparse([1, 1]),
    "indices unsorted": _sparse([3, 1]),
    "sparse longer than dense": _sparse(list(range(7))),
    "indices not int32": _sparse([1], indices=bytes(3)),
    "values short": _sparse([1, 2], data=bytes(2)),
    "sparse with a scale": _sparse([1], scale=bytes(4)),
    "sparse values NaN": _sparse([1], data=np.array([np.nan], "<f2").tobytes()),
    "dense with a scale": pb.Tensor(
        dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=bytes(24), scale=bytes(12)
    ),
    "unknown encoding": _tensor(encoding=7),
    "empty encoded tensor": _tensor(shape=[0, 3], data=b""),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_encoded_tensors_are_refused_with_one_line(case: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        codec.unpack(BAD[case], what="x", shape=(None, 3))
    assert "\n" not in str(refused.value) and str(refused.value).startswith("x:")


def test_an_encoded_tensor_is_refused_where_a_dense_one_is_expected() -> None:
    with pytest.raises(InvalidArgument, match="dense"):
        codec.decode(_tensor())


@settings(max_examples=400, deadline=None)
@given(
    encoding=st.sampled_from([0, 1, 2, 3]),
    dtype=st.sampled_from([*pb.DType.values(), 99]),
    shape=st.lists(st.integers(-2, 2**33), max_size=5),
    data=st.binary(max_size=64),
    scale=st.binary(max_size=24),
    zero=st.binary(max_size=8),
    indices=st.binary(max_size=40),
)
def test_fuzzed_encoded_tensors_decode_consistently_or_refuse(
    encoding: int,
    dtype: int,
    shape: list[int],
    data: bytes,
    scale: bytes,
    zero: bytes,
    indices: bytes,
) -> None:
    tensor = pb.Tensor(
        dtype=dtype,  # type: ignore[arg-type]
        shape=shape,
        data=data,
        encoding=encoding,  # type: ignore[arg-type]
        scale=scale,
        zero_point=zero,
        indices=indices,
    )
    try:
        encoded = codec.unpack(tensor, what="x", shape=[None] * len(shape), max_elements=4096)
    except (InvalidArgument, ResourceExhausted) as exc:
        assert "\n" not in str(exc)
        return
    dense = codecs.to_dense(encoded)
    assert dense.shape == tuple(shape) and np.isfinite(dense).all()


# --- over gRPC: negotiation, the cache, asked cuts -------------------------------------


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    service = make_service(tmp_path, hyper=Hyperparameters(epochs=2, batch_size=16, seed=3))
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(0)


def _split() -> Any:
    return edge_split(load_dataset("digits"), Shard(0, 2), presumed_fraction=DEMO_PRESUMED_FRACTION)


def test_a_cache_lost_mid_run_is_refilled_and_the_losses_do_not_change(
    cloud: tuple[Any, str],
) -> None:
    service, address = cloud
    split = _split()
    losses = []
    for lose_at in (None, 20):
        with CloudClient(address) as client:
            ask = SessionAsk(train_samples=len(split.train))
            session = client.register(f"edge-{lose_at}", DIGITS, ask=ask)
            trainer = EdgeTrainer(
                session, split.train, split.heldout, GrpcTransport(client, session)
            )
            cloud_session = service.sessions.get(session.session_id)

            def lose(record: Any, at: int | None = lose_at, s: Any = cloud_session) -> None:
                if record.step == at:
                    s.cache.clear()  # what a cloud restart does to the cache

            result = trainer.run(on_step=lose)
            losses.append([r.loss for r in result.history])
            assert cloud_session.cache.samples == len(split.train)
    # Step 20 is in epoch 2: its batch went up again after the miss, same arithmetic.
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
    # Reported: 2 sessions x 431 samples x (10 float32 logits + int32 label + flag).
    allocated = 2 * len(split.train) * 45
    assert service.cache_bytes() == (allocated, allocated)
    text = generate_latest(service.metrics.registry).decode()
    assert f'splitkd_cloud_teacher_cache_bytes{{kind="allocated"}} {float(allocated)}' in text


def _stub(address: str) -> pb_grpc.SplitTrainingStub:
    return pb_grpc.SplitTrainingStub(grpc.insecure_channel(address))


def _register(stub: pb_grpc.SplitTrainingStub, **ask: Any) -> pb.RegisterResponse:
    request = pb.RegisterRequest(
        device_id="edge-bad", signature=pb.DatasetSignature(input_shape=[1, 8, 8]), **ask
    )
    reply: pb.RegisterResponse = stub.Register(request)
    return reply


def _step(session: pb.RegisterResponse, step: int, **fields: Any) -> pb.StepRequest:
    rows = 4
    student = np.ones((rows, 8, 4, 4), np.float32)
    teacher = np.ones((rows, 32, 4, 4), np.float32)
    base: dict[str, Any] = {
        "session_id": session.session_id,
        "step": step,
        "student_activations": codec.encode(student),
        "teacher_activations": codec.encode(teacher),
        "labels": codec.encode(np.arange(rows, dtype=np.int64)),
    }
    base.update(fields)
    return pb.StepRequest(**{k: v for k, v in base.items() if v is not None})


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value.code(), refused.value.details()


def test_bad_wire_input_is_refused_and_the_session_goes_on(cloud: tuple[Any, str]) -> None:
    service, address = cloud
    stub = _stub(address)
    session = _register(stub, train_samples=100)
    assert session.teacher_cache_samples == 100
    ids = lambda *v: codec.encode(np.array(v, np.int32))  # noqa: E731
    cases = {
        "uncached sample": (
            _step(session, 0, teacher_activations=None, labels=None, sample_ids=ids(0, 1, 2, 3)),
            "FAILED_PRECONDITION",
            TEACHER_CACHE_MISS,
        ),
        "id out of range": (
            _step(session, 0, sample_ids=ids(0, 1, 2, 100)),
            "INVALID_ARGUMENT",
            "sample_ids",
        ),
        "id repeated": (
            _step(session, 0, sample_ids=ids(0, 1, 1, 3)),
            "INVALID_ARGUMENT",
            "repeat",
        ),
        "codec not negotiated": (
            _step(
                session,
                0,
                student_activations=codec.pack(
                    codecs.make("int8").encode(np.ones((4, 8, 4, 4), np.float32))
                ),
            ),
            "INVALID_ARGUMENT",
            "negotiated",
        ),
        "teacher without labels": (_step(session, 0, labels=None), "INVALID_ARGUMENT", "labels"),
    }
    for name, (request, status, words) in cases.items():
        code, details = _code(lambda r=request: stub.Step(r))
        assert (code.name, words in details) == (status, True), name
    assert service.sessions.get(session.session_id).next_step == 0  # nothing applied
    good = stub.Step(_step(session, 0, sample_ids=ids(0, 1, 2, 3)))
    assert good.step == 0
    cached = stub.Step(
        _step(session, 1, teacher_activations=None, labels=None, sample_ids=ids(3, 2, 1, 0))
    )
    assert cached.step == 1 and np.isfinite(cached.loss)


def test_the_cloud_negotiates_the_asked_codec_and_packs_gradients_with_it(
    cloud: tuple[Any, str],
) -> None:
    _, address = cloud
    stub = _stub(address)
    session = _register(stub, wire_codec="int8")
    assert session.hyperparameters.wire_codec == "int8"
    student = codec.pack(codecs.make("int8").encode(np.ones((4, 8, 4, 4), np.float32)))
    teacher = codec.pack(codecs.make("int8").encode(np.ones((4, 32, 4, 4), np.float32)))
    reply = stub.Step(_step(session, 0, student_activations=student, teacher_activations=teacher))
    assert reply.gradient.encoding == pb.ENCODING_AFFINE_INT8
    code, details = _code(lambda: _register(stub, wire_codec="zip"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "zip" in details


def test_the_cloud_honours_allowed_cuts_and_refuses_raw_inputs(cloud: tuple[Any, str]) -> None:
    _, address = cloud
    stub = _stub(address)
    assert _register(stub, student_cut=2).student_cut == 2
    for cut in (-1, 3, 9):
        code, details = _code(lambda c=cut: _register(stub, student_cut=c))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "cut" in details
    with CloudClient(address) as client:
        task = client.describe(DIGITS)
    assert task.student_cuts == (1, 2) and 0 not in task.teacher_cuts
    assert "int8" in task.wire_codecs and task.teacher_cache_samples > 0


def test_probe_answers_the_asked_bytes_and_refuses_more_than_4_mib(cloud: tuple[Any, str]) -> None:
    _, address = cloud
    stub = _stub(address)
    assert len(stub.Probe(pb.ProbeRequest(reply_bytes=65536)).payload) == 65536
    code, _ = _code(lambda: stub.Probe(pb.ProbeRequest(reply_bytes=5 << 20)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_caches_stay_within_the_cloud_budget(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    service.config = CloudConfig(teacher_cache_bytes=60_000, teacher_cache_samples=1000)
    first = service.register("edge-a", DIGITS, ask=SessionAsk(train_samples=1000))
    second = service.register("edge-b", DIGITS, ask=SessionAsk(train_samples=1000))
    too_many = service.register("edge-c", DIGITS, ask=SessionAsk(train_samples=1001))
    assert first.cache is not None and first.cache.reserved_bytes == 45_000
    assert second.cache is None and too_many.cache is None  # over the budget, over the cap
    assert service.cache_bytes() == (0, 45_000)  # reserved, allocated on first use
