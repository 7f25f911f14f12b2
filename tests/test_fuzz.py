"""Fuzzing with hypothesis: malformed input is refused with the right status, nothing else.

Three targets, more than 10,000 malformed messages in all:

1. The wire codec: generated ``Tensor`` messages (unknown dtypes, shape/byte
   mismatches, truncated payloads, huge, negative and too many dimensions,
   NaN/Inf, random bytes) are decoded to exactly the declared shape or refused
   with ``InvalidArgument``/``ResourceExhausted``, quickly and without
   allocating what a huge shape claims. Random bytes parse as every request
   type or raise ``DecodeError``.
2. A live gRPC server: random and mutated bytes on every RPC, and well-formed
   messages with bad fields (unknown sessions, bad tensors, out-of-order steps,
   bad labels, bad head weights, bad model names and offsets). Every answer is
   OK or a status in ``ALLOWED``, within a deadline, while a healthy session
   trains in a background thread and every one of its steps succeeds.
3. The HTTP APIs: random bodies on the edge's ``/v1/predict`` and random paths
   on the cloud's model routes are answered 2xx or 4xx, never 5xx.
"""

from __future__ import annotations

import json
import math
import threading
import time
import tracemalloc
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from math import prod
from typing import Any

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cloud_service.http_api import create_app as cloud_app
from cloud_service.registry import ModelRecord
from cloud_service.server import build_grpc_server
from cloud_service.service import CloudService
from cloud_service.servicer import SplitTrainingServicer
from edge_agent.http_api import create_app as edge_app
from edge_agent.model_store import ModelStore
from splitkd import codec
from splitkd.errors import InvalidArgument, ResourceExhausted
from splitkd.models import zoo
from splitkd.models.spec import ModelSpec
from splitkd.onnx_export import export_checked
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc
from tests.support import DIGITS, apply_steps, make_service

pytestmark = pytest.mark.slow

# Every answer to a malformed message is one of these (or OK when the fuzzer
# happened to build a valid one). INTERNAL, UNKNOWN or a deadline is a bug.
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}
CALL_TIMEOUT = 30.0  # seconds; a call that takes longer is a hang, not a slow machine
# One decode of a <= 4 KiB message, in this thread's CPU time: other processes on a busy
# box do not count, so only a decode that works through the claimed size reaches it.
DECODE_CPU_SECONDS = 0.5
SERVICE = pb.DESCRIPTOR.services_by_name["SplitTraining"]
# Examples per test: chosen so that the whole file refuses > 10,000 messages in
# well under 90 s on 2 cores.
CODEC_EXAMPLES = 6000
PARSE_EXAMPLES = 800
RAW_EXAMPLES = 600
FIELD_EXAMPLES = 600
HTTP_EXAMPLES = 400


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written into the checkout; a failure prints its example
        suppress_health_check=list(HealthCheck),
    )


# Messages refused (or, for HTTP, answered 4xx) per target, summed by the last test.
REFUSED: Counter[str] = Counter()
SENT: Counter[str] = Counter()
HEALTHY_STEPS = [0]

NUMPY_DTYPES = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_INT8: np.dtype("i1"),
}
FLOAT_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16)
NON_FINITE = {
    pb.DTYPE_FLOAT32: [np.float32(v).tobytes() for v in (np.nan, np.inf, -np.inf)],
    pb.DTYPE_FLOAT16: [np.float16(v).tobytes() for v in (np.nan, np.inf, -np.inf)],
}
INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
HUGE_DIMENSIONS = [2**31, 2**32, 2**40, 2**62, 2**63 - 1]
# Payloads are built from a seed, not drawn byte by byte: fast, and as random.
MAX_PAYLOAD = 4096


def random_bytes(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


# ---------------------------------------------------------------------------
# Strategies: tensors
# ---------------------------------------------------------------------------

dtype_codes = st.one_of(st.sampled_from(sorted(pb.DType.values())), INT32)
dimensions = st.one_of(
    st.integers(0, 6), st.sampled_from(HUGE_DIMENSIONS), st.integers(-(2**63), -1), INT64
)
shapes = st.one_of(
    st.lists(st.integers(0, 6), max_size=10),  # small: a payload can match (or nearly)
    st.lists(dimensions, max_size=12),  # huge, negative, rank > 8
)


# Strategies that do not depend on a drawn value are built once, here: one built inside a
# draw is built again for every example, which costs as much as a good part of the draw.
_HOW = st.sampled_from(["exact", "non-finite", "short", "long", "random"])
_SEEDS = st.integers(0, 2**32 - 1)
_RANDOM_SIZES = st.integers(0, 512)
_EXTRA_SIZES = st.integers(1, 64)
_NON_FINITE_VALUES = {dtype: st.sampled_from(values) for dtype, values in NON_FINITE.items()}


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    """Any Tensor message, mostly malformed: see the module docstring."""
    dtype = draw(dtype_codes)
    shape = draw(shapes)
    itemsize = NUMPY_DTYPES[dtype].itemsize if dtype in NUMPY_DTYPES else 4
    claimed = prod(shape) * itemsize if all(d >= 0 for d in shape) else -1
    how = draw(_HOW)
    seed = draw(_SEEDS)
    if how == "random" or not 0 <= claimed <= MAX_PAYLOAD:
        data = random_bytes(seed, draw(_RANDOM_SIZES))
    else:
        data = random_bytes(seed, claimed)
        if how == "non-finite" and dtype in NON_FINITE and data:
            index = draw(st.integers(0, len(data) // itemsize - 1)) * itemsize
            value = draw(_NON_FINITE_VALUES[dtype])
            data = data[:index] + value + data[index + itemsize :]
        elif how == "short" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif how == "long":
            data += random_bytes(seed + 1, draw(_EXTRA_SIZES))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def good_tensor(array: np.ndarray) -> pb.Tensor:
    return codec.encode(array)


@st.composite
def activations(draw: st.DrawFn, shape: tuple[int, ...], batch: int) -> pb.Tensor:
    """Activations of ``[batch, *shape]``: valid, one targeted defect, or anything."""
    kind = draw(
        st.sampled_from(
            ["valid", "non-finite", "dtype", "rank", "dimension", "bytes", "batch", "any"]
        )
    )
    if kind == "any":
        return draw(tensors())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    wire = draw(st.sampled_from(FLOAT_DTYPES))
    array = rng.standard_normal((batch, *shape)).astype(NUMPY_DTYPES[wire])
    if kind == "non-finite":
        array.flat[draw(st.integers(0, array.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
    message = good_tensor(array)
    if kind == "dtype":
        message.dtype = draw(dtype_codes.filter(lambda d: d not in FLOAT_DTYPES))
    elif kind == "rank":
        dims = list(message.shape)
        if draw(st.booleans()):
            dims.insert(draw(st.integers(0, len(dims))), 1)
        else:
            del dims[draw(st.integers(1, len(dims) - 1))]
        message.shape[:] = dims
    elif kind == "dimension":
        axis = draw(st.integers(1, len(message.shape) - 1))
        message.shape[axis] = draw(
            st.one_of(st.integers(0, 64), st.sampled_from(HUGE_DIMENSIONS), INT64).filter(
                lambda d: d != message.shape[axis]
            )
        )
    elif kind == "bytes":
        cut = draw(st.integers(-8, 8).filter(bool))
        message.data = message.data[:cut] if cut < 0 else message.data + b"\x7f" * cut
    elif kind == "batch":
        message.shape[0] = draw(
            st.one_of(st.sampled_from([0, -1, *HUGE_DIMENSIONS]), INT64).filter(
                lambda d: d != batch
            )
        )
        if message.shape[0] == 0:
            message.data = b""
    return message


@st.composite
def labels(draw: st.DrawFn, batch: int, classes: int) -> pb.Tensor:
    kind = draw(st.sampled_from(["valid", "range", "dtype", "length", "rank", "any"]))
    if kind == "any":
        return draw(tensors())
    values = draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch))
    if kind == "range":
        values[draw(st.integers(0, batch - 1))] = draw(
            st.one_of(st.integers(classes, 2**63 - 1), st.integers(-(2**63), -1))
        )
    array = np.array(values, np.int64)
    if kind == "dtype":
        array = array.astype(draw(st.sampled_from([np.float32, np.int32, np.uint8, np.float16])))
    elif kind == "length":
        array = np.resize(array, draw(st.integers(0, batch + 3).filter(lambda n: n != batch)))
    elif kind == "rank":
        array = array.reshape(batch, 1)
    return good_tensor(array)


# ---------------------------------------------------------------------------
# Strategies: any message of a type, from its descriptor
# ---------------------------------------------------------------------------

_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_ENUM: INT32,  # proto3 enums are open: unknown values parse
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: st.text(max_size=24),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
}


def message_class(descriptor: Descriptor) -> type[Message]:
    cls: type[Message] = getattr(pb, descriptor.name)
    return cls


def messages(
    descriptor: Descriptor,
    biases: dict[str, st.SearchStrategy[Any]] | None = None,
    depth: int = 0,
) -> st.SearchStrategy[Message]:
    """Any message of this type: every field optional, every value in its type's full range.

    ``biases`` maps a field name to extra values (a live session id, a
    published model name) so that some messages get past the first check.
    """
    biases = biases or {}
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if f.message_type is pb.Tensor.DESCRIPTOR:
                value: st.SearchStrategy[Any] = tensors()
            elif depth < 3:
                value = messages(f.message_type, biases, depth + 1)
            else:
                continue
        else:
            value = _SCALARS[f.type]
        if f.name in biases:
            value = st.one_of(biases[f.name], value)
        fields[f.name] = st.lists(value, max_size=4) if f.is_repeated else value
    cls = message_class(descriptor)
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: cls(**values))


def request_types() -> list[type[Message]]:
    return [message_class(m.input_type) for m in SERVICE.methods]


def served_methods() -> list[str]:
    """Every RPC of the service that the cloud's servicer implements."""
    return [
        m.name
        for m in SERVICE.methods
        if getattr(SplitTrainingServicer, m.name)
        is not getattr(pb_grpc.SplitTrainingServicer, m.name)
    ]


@st.composite
def mutated(draw: st.DrawFn, corpus: list[bytes]) -> bytes:
    """A valid serialized message, then truncated, flipped, spliced or padded."""
    data = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "splice"]))
        at = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "splice":
            other = draw(st.sampled_from(corpus))
            data[at:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


def sample_corpus(session_id: str, head: pb.ModelWeights, model_name: str) -> list[bytes]:
    """One valid message of every request type, serialized: the seeds of the mutations."""
    step = pb.StepRequest(
        session_id=session_id,
        step=0,
        student_activations=good_tensor(np.ones((2, 8, 4, 4), np.float32)),
        teacher_activations=good_tensor(np.ones((2, 32, 4, 4), np.float32)),
        labels=good_tensor(np.array([1, 2], np.int64)),
    )
    seeds: list[Message] = [
        pb.RegisterRequest(
            device_id="fuzz-seed",
            signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=10),
            profile=pb.DeviceProfile(name="laptop-x86", link="wifi", cpu_cores=2),
        ),
        step,
        pb.EvaluateRequest(session_id=session_id, student_activations=step.student_activations),
        pb.FinishRequest(session_id=session_id, student_head=head, steps=0),
        pb.DownloadModelRequest(name=model_name, version=1, offset=10),
    ]
    # Requests added to the service later get a seed too (every field defaulted but the id).
    known = {type(m) for m in seeds}
    for cls in request_types():
        if cls not in known:
            has_id = "session_id" in cls.DESCRIPTOR.fields_by_name
            seeds.append(cls(session_id=session_id) if has_id else cls())
    return [m.SerializeToString() for m in seeds]


# ---------------------------------------------------------------------------
# 1. The codec
# ---------------------------------------------------------------------------

decode_options = st.fixed_dictionaries(
    {},
    optional={
        "dtypes": st.lists(
            st.sampled_from(sorted(NUMPY_DTYPES)), min_size=1, max_size=3, unique=True
        ),
        "finite": st.booleans(),
        "max_elements": st.sampled_from([1, 16, 1024, codec.DEFAULT_MAX_ELEMENTS]),
    },
)


_OTHER_SHAPES = st.lists(st.one_of(st.none(), st.integers(0, 6)), max_size=9)


def expected_shapes(dims: list[int]) -> st.SearchStrategy[list[int | None] | None]:
    """No expectation, the tensor's own shape with a free batch, or some other shape."""
    own: list[int | None] = [None, *dims[1:]] if dims else []
    return st.one_of(st.none(), st.just(own), _OTHER_SHAPES)


@fuzz(CODEC_EXAMPLES)
@given(tensor=tensors(), options=decode_options, data=st.data())
def test_codec_decodes_exactly_the_declared_shape_or_refuses(
    tensor: pb.Tensor, options: dict[str, Any], data: st.DataObject
) -> None:
    dims = list(tensor.shape)
    shape = data.draw(expected_shapes(dims))
    if shape is not None:
        options = {**options, "shape": shape}
    limit = options.get("max_elements", codec.DEFAULT_MAX_ELEMENTS)
    huge = all(d >= 0 for d in dims) and prod(d for d in dims if d) > limit
    SENT["codec"] += 1
    if huge:
        tracemalloc.start()
    started = time.thread_time()
    try:
        array = codec.decode(tensor, **options)
    except (InvalidArgument, ResourceExhausted) as exc:
        REFUSED["codec"] += 1
        assert str(exc) and "\n" not in str(exc)
    else:
        assert array.shape == tuple(dims)
        assert array.dtype == NUMPY_DTYPES[tensor.dtype]
        assert array.tobytes() == tensor.data
        assert array.size <= limit
        if "dtypes" in options:
            assert tensor.dtype in options["dtypes"]
        if shape is not None:
            assert len(shape) == len(dims)
            assert all(e is None or e == d for d, e in zip(dims, shape, strict=True))
        if options.get("finite") and array.dtype.kind == "f":
            assert np.isfinite(array).all()
    finally:
        elapsed = time.thread_time() - started
        if huge:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            # A huge claim is refused from the shape alone: no buffer of that size.
            assert peak < 1 << 20, f"decoding a claim of shape {dims} allocated {peak} bytes"
    assert elapsed < DECODE_CPU_SECONDS, f"decode took {elapsed:.3f} s of CPU for shape {dims}"


@pytest.mark.parametrize(
    "dims",
    [
        [2**40],
        [2**31, 2**31],
        [2**63 - 1] * 8,
        [0, 2**62, 2**62],  # zero elements, but a size numpy cannot represent
        [1, 0, 2**63 - 1, 2**63 - 1],
        [2**40, 0],
    ],
)
def test_huge_claims_are_refused_before_allocating(dims: list[int]) -> None:
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=dims, data=b"")
    tracemalloc.start()
    started = time.thread_time()
    try:
        try:
            array = codec.decode(tensor)
        except (InvalidArgument, ResourceExhausted):
            pass
        else:
            assert array.shape == tuple(dims) and array.size == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.thread_time() - started < DECODE_CPU_SECONDS and peak < 1 << 20


_PARSE_CORPUS = sample_corpus("0" * 32, pb.ModelWeights(), "student-fuzz")


@fuzz(PARSE_EXAMPLES)
@given(payload=st.one_of(st.binary(max_size=512), mutated(_PARSE_CORPUS)))
def test_random_bytes_parse_as_every_request_or_raise_decode_error(payload: bytes) -> None:
    for cls in request_types():
        SENT["parse"] += 1
        try:
            message = cls.FromString(payload)
        except DecodeError:
            REFUSED["parse"] += 1
        else:
            # Whatever parsed is a message that serializes again.
            assert isinstance(message.SerializeToString(), bytes)


# ---------------------------------------------------------------------------
# 2. A live server, with a healthy session training meanwhile
# ---------------------------------------------------------------------------


class HealthyEdge(threading.Thread):
    """A well-behaved edge that steps its own session at a device's pace until stopped."""

    PACE_SECONDS = 0.05  # 20 steps/s: a fast device, below any per-device rate limit

    def __init__(self, address: str) -> None:
        super().__init__(name="healthy-edge", daemon=True)
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.SplitTrainingStub(self.channel)  # type: ignore[no-untyped-call]
        self.session = self.stub.Register(
            pb.RegisterRequest(
                device_id="healthy-edge",
                signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=10),
            ),
            timeout=CALL_TIMEOUT,
        )
        self.student_shape, self.teacher_shape = cut_shapes(self.session)
        self.steps = 0
        self.failures: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        rng = np.random.default_rng(11)
        while not self._halt.wait(self.PACE_SECONDS):
            batch = 16
            request = pb.StepRequest(
                session_id=self.session.session_id,
                step=self.steps,
                student_activations=good_tensor(
                    rng.standard_normal((batch, *self.student_shape)).astype(np.float32)
                ),
                teacher_activations=good_tensor(
                    rng.standard_normal((batch, *self.teacher_shape)).astype(np.float32)
                ),
                labels=good_tensor(rng.integers(0, 10, batch).astype(np.int64)),
            )
            try:
                reply = self.stub.Step(request, timeout=CALL_TIMEOUT)
            except grpc.RpcError as exc:
                self.failures.append(f"step {self.steps}: {exc.code().name} {exc.details()}")
                continue
            if reply.step != self.steps or reply.replayed or not math.isfinite(reply.loss):
                self.failures.append(f"step {self.steps}: answered {reply}")
                continue
            self.steps += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(CALL_TIMEOUT)
        self.channel.close()

    def check(self) -> None:
        assert not self.failures, self.failures[:5]
        assert self.is_alive(), "the healthy session's thread stopped"


def cut_shapes(session: pb.RegisterResponse) -> tuple[tuple[int, ...], tuple[int, ...]]:
    student = ModelSpec.from_json(session.student.family, session.student.spec_json)
    teacher = ModelSpec.from_json(session.teacher.family, session.teacher.spec_json)
    return (
        zoo.activation_shape(student, session.student_cut),
        zoo.activation_shape(teacher, session.teacher_cut),
    )


@dataclass
class FuzzCloud:
    service: CloudService
    channel: grpc.Channel
    target: pb.RegisterResponse  # the session the fuzzer attacks with its own id
    model: ModelRecord  # a published model to attack downloads of
    healthy: HealthyEdge
    methods: list[str]
    calls: dict[str, Callable[[bytes], Any]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def fuzz_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzCloud]:
    service = make_service(tmp_path_factory.mktemp("fuzz-cloud"))
    publisher = service.register("fuzz-publisher", DIGITS)
    apply_steps(service, publisher.session_id, 1)
    model = service.finish(
        publisher.session_id, publisher.student.part_state(0, publisher.student_cut), 1
    )
    server, port = build_grpc_server(service, "127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.SplitTrainingStub(channel)  # type: ignore[no-untyped-call]
    target = stub.Register(
        pb.RegisterRequest(
            device_id="fuzz-target",
            signature=pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=10),
        ),
        timeout=CALL_TIMEOUT,
    )
    # Trained once, so it is an active session: fuzzed Registers cannot evict it.
    apply_steps(service, target.session_id, 1)
    healthy = HealthyEdge(address)
    healthy.start()
    cloud = FuzzCloud(service, channel, target, model, healthy, served_methods())
    for method in SERVICE.methods:
        path = f"/{SERVICE.full_name}/{method.name}"
        # No serializers: the payload goes on the wire exactly as given.
        if method.server_streaming:
            stream = channel.unary_stream(path)
            cloud.calls[method.name] = lambda data, s=stream: list(s(data, timeout=CALL_TIMEOUT))
        else:
            unary = channel.unary_unary(path)
            cloud.calls[method.name] = lambda data, u=unary: u(data, timeout=CALL_TIMEOUT)
    try:
        yield cloud
    finally:
        healthy.stop()
        channel.close()
        server.stop(0)
    assert not healthy.failures, healthy.failures[:5]


def answer(cloud: FuzzCloud, method: str, payload: bytes, kind: str) -> str:
    """Send raw bytes to ``method``; return the status name, failing on any status not allowed."""
    SENT[kind] += 1
    SENT[f"{kind}:{method}"] += 1
    try:
        cloud.calls[method](payload)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        assert code in ALLOWED, f"{method} answered {code.name}: {details}"
        assert details and "\n" not in details, f"{method}: {code.name} without a one-line reason"
        REFUSED[kind] += 1
        return str(code.name)
    return "OK"


def test_undecodable_bytes_are_invalid_argument_on_every_rpc(fuzz_cloud: FuzzCloud) -> None:
    # Regression: gRPC answered these INTERNAL ("Exception deserializing request!").
    for method in fuzz_cloud.methods:
        for payload in (b"\xff\xff\xff", b"\x0a\x02\xff\xfe"):  # a bad tag; a string not UTF-8
            if method == "Probe" and payload[0] == 0x0A:
                continue  # Probe's field 1 is bytes: any bytes are a valid payload there
            with pytest.raises(grpc.RpcError) as caught:
                fuzz_cloud.calls[method](payload)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "not a valid protobuf message" in (caught.value.details() or "")


def test_a_head_tensor_claiming_a_huge_empty_shape_is_resource_exhausted(
    fuzz_cloud: FuzzCloud,
) -> None:
    # Regression: [0, 2**62, 2**62] holds no element, so it passed the element
    # limit, and numpy's reshape raised ValueError: Finish answered INTERNAL.
    target = fuzz_cloud.target
    extra = pb.NamedTensor(
        name="extra", tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0, 2**62, 2**62])
    )
    request = pb.FinishRequest(
        session_id=target.session_id,
        student_head=pb.ModelWeights(tensors=[*target.student_head.tensors, extra]),
    )
    stub = pb_grpc.SplitTrainingStub(fuzz_cloud.channel)  # type: ignore[no-untyped-call]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Finish(request, timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    # Regression: a tensor's name went into the error unquoted, newlines and all.
    extra.name, extra.tensor.shape[:] = "forged\nline", [3]
    request.student_head.tensors[-1].CopyFrom(extra)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Finish(request, timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "\n" not in (caught.value.details() or "") and "forged\\nline" in caught.value.details()


def test_the_servicer_implements_every_rpc_of_the_service() -> None:
    assert {"Register", "Step", "Evaluate", "Finish", "DownloadModel"} <= set(served_methods())


@fuzz(RAW_EXAMPLES)
@given(data=st.data())
def test_random_bytes_on_every_rpc_get_an_allowed_status(
    fuzz_cloud: FuzzCloud, data: st.DataObject
) -> None:
    corpus = _live_corpus(fuzz_cloud)
    payload = data.draw(st.one_of(st.binary(max_size=512), mutated(corpus)))
    for method in fuzz_cloud.methods:
        answer(fuzz_cloud, method, payload, "grpc-bytes")
    fuzz_cloud.healthy.check()


_CORPUS_CACHE: dict[str, list[bytes]] = {}


def _live_corpus(cloud: FuzzCloud) -> list[bytes]:
    key = cloud.target.session_id
    if key not in _CORPUS_CACHE:
        _CORPUS_CACHE[key] = sample_corpus(key, cloud.target.student_head, cloud.model.name)
    return _CORPUS_CACHE[key]


def field_strategies(cloud: FuzzCloud) -> dict[str, st.SearchStrategy[Message]]:
    """For each RPC: well-formed requests with bad fields, aimed at its checks."""
    target = cloud.target
    student_shape, teacher_shape = cut_shapes(target)
    session_ids = st.one_of(
        st.just(target.session_id),
        st.sampled_from(["", "0" * 32, target.session_id[:-1] + "x", target.session_id.upper()]),
        st.text(max_size=40),
    )
    name = cloud.model.name
    biases: dict[str, st.SearchStrategy[Any]] = {
        "session_id": session_ids,
        "name": st.sampled_from([name, name + "\n", name.upper(), "../" + name]),
        "device_id": st.from_regex(r"fuzz-[a-z0-9]{0,8}", fullmatch=True),
    }
    steps = st.one_of(st.integers(0, 3), INT64)

    @st.composite
    def step(draw: st.DrawFn) -> pb.StepRequest:
        batch = draw(st.integers(1, 4))
        return pb.StepRequest(
            session_id=draw(session_ids),
            step=draw(steps),
            student_activations=draw(activations(student_shape, batch)),
            teacher_activations=draw(
                activations(teacher_shape, draw(st.sampled_from([batch, batch + 1])))
            ),
            labels=draw(labels(batch, 10)),
        )

    @st.composite
    def evaluate(draw: st.DrawFn) -> pb.EvaluateRequest:
        return pb.EvaluateRequest(
            session_id=draw(session_ids),
            student_activations=draw(activations(student_shape, draw(st.integers(1, 4)))),
        )

    @st.composite
    def finish(draw: st.DrawFn) -> pb.FinishRequest:
        # Every defect below makes the head invalid: no fuzzed Finish ever exports a model.
        head = [pb.NamedTensor(name=t.name, tensor=t.tensor) for t in target.student_head.tensors]
        victim = draw(st.integers(0, len(head) - 1))
        defect = draw(
            st.sampled_from(
                ["drop", "duplicate", "rename", "extra", "shape", "non-finite", "bytes"]
            )
        )
        tensor = head[victim].tensor
        if defect == "drop":
            del head[victim]
        elif defect == "duplicate":
            head.append(head[victim])
        elif defect == "rename":
            head[victim].name = draw(st.text(max_size=30).filter(lambda n: n != head[victim].name))
        elif defect == "extra":
            head.append(pb.NamedTensor(name=draw(st.text(max_size=30)), tensor=draw(tensors())))
        elif defect == "shape":
            tensor.shape.append(1)
        elif defect == "non-finite" and tensor.dtype == pb.DTYPE_FLOAT32 and tensor.data:
            tensor.data = NON_FINITE[pb.DTYPE_FLOAT32][0] + tensor.data[4:]
        else:
            tensor.data = tensor.data[:-1]
        return pb.FinishRequest(
            session_id=draw(session_ids),
            student_head=pb.ModelWeights(tensors=head),
            steps=draw(steps),
        )

    download = st.builds(
        pb.DownloadModelRequest,
        name=st.one_of(
            biases["name"], st.text(max_size=40), st.sampled_from(["", ".", "..", "a/b"])
        ),
        version=st.one_of(st.integers(-2, 3), INT32),
        offset=st.one_of(
            st.sampled_from([-1, 0, cloud.model.size_bytes, cloud.model.size_bytes + 1]), INT64
        ),
    )
    register = st.builds(
        pb.RegisterRequest,
        device_id=st.one_of(biases["device_id"], st.text(max_size=80)),
        signature=st.one_of(
            st.just(pb.DatasetSignature(input_shape=[1, 8, 8], num_classes=10)),
            messages(pb.DatasetSignature.DESCRIPTOR),
        ),
        profile=messages(pb.DeviceProfile.DESCRIPTOR),
        requested_epochs=INT32,
    )
    targeted: dict[str, st.SearchStrategy[Message]] = {
        "Register": register,
        "Step": step(),
        "Evaluate": evaluate(),
        "Finish": finish(),
        "DownloadModel": download,
    }
    out: dict[str, st.SearchStrategy[Message]] = {}
    for method in SERVICE.methods:
        generic = messages(method.input_type, biases)
        # A new RPC without a targeted strategy still gets every field fuzzed.
        out[method.name] = (
            st.one_of(targeted[method.name], targeted[method.name], generic)
            if method.name in targeted
            else generic
        )
    return out


_FIELD_STRATEGIES: dict[str, dict[str, st.SearchStrategy[Message]]] = {}


@fuzz(FIELD_EXAMPLES)
@given(data=st.data())
def test_bad_fields_on_every_rpc_get_an_allowed_status(
    fuzz_cloud: FuzzCloud, data: st.DataObject
) -> None:
    key = fuzz_cloud.target.session_id
    if key not in _FIELD_STRATEGIES:
        _FIELD_STRATEGIES[key] = field_strategies(fuzz_cloud)
    for method in fuzz_cloud.methods:
        request = data.draw(_FIELD_STRATEGIES[key][method], label=method)
        answer(fuzz_cloud, method, request.SerializeToString(), "grpc-fields")
    fuzz_cloud.healthy.check()


def test_the_live_server_was_fuzzed_on_every_rpc_and_the_healthy_session_trained(
    fuzz_cloud: FuzzCloud,
) -> None:
    if not SENT["grpc-bytes"] or not SENT["grpc-fields"]:
        pytest.skip("runs after the live fuzz tests")
    for kind in ("grpc-bytes", "grpc-fields"):
        for method in fuzz_cloud.methods:
            assert SENT[f"{kind}:{method}"] >= 500, (kind, method)
    assert REFUSED["grpc-bytes"] + REFUSED["grpc-fields"] >= 5000
    # One step every PACE_SECONDS at most, minus the cloud's own time.
    assert fuzz_cloud.healthy.steps >= 100 and not fuzz_cloud.healthy.failures
    HEALTHY_STEPS[0] = fuzz_cloud.healthy.steps


# ---------------------------------------------------------------------------
# 3. The HTTP APIs
# ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=40,
)


def nested(shape: tuple[int, ...], values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    strategy = values
    for size in reversed(shape):
        strategy = st.lists(strategy, min_size=size, max_size=size)
    return strategy


finite_pixels = st.floats(-1e6, 1e6, allow_nan=False)
any_pixels = st.one_of(
    st.floats(), st.integers(), st.sampled_from([1e39, -1e39, 10**400]), st.text(max_size=3)
)
valid_inputs = st.one_of(
    nested((1, 8, 8), finite_pixels),
    st.integers(1, 3).flatmap(lambda n: nested((n, 1, 8, 8), finite_pixels)),
)
near_inputs = st.sampled_from(
    [(1, 8, 8), (8, 8), (1, 8, 7), (2, 1, 8, 8), (1, 1, 1, 8, 8), (0, 1, 8, 8), (64,)]
).flatmap(lambda shape: nested(shape, any_pixels))
bodies = st.one_of(
    st.tuples(st.just("valid"), valid_inputs.map(lambda x: {"inputs": x})),
    st.tuples(st.just("near"), near_inputs.map(lambda x: {"inputs": x})),
    st.tuples(st.just("json"), json_values),
    st.tuples(st.just("json"), st.fixed_dictionaries({"inputs": json_values})),
    st.tuples(st.just("bytes"), st.binary(max_size=200)),
)


def well_formed(inputs: Any) -> bool:
    """Whether ``inputs`` is one sample or a batch of finite numbers of shape [1, 8, 8]."""
    try:
        array = np.asarray(inputs, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        return False
    if array.shape == (1, 8, 8):
        array = array[None]
    with np.errstate(over="ignore"):  # beyond float32 is inf, and inf is not acceptable
        finite = bool(np.isfinite(array.astype(np.float32)).all())
    return (
        array.ndim == 4 and array.shape[1:] == (1, 8, 8) and 1 <= array.shape[0] <= 1024 and finite
    )


@pytest.fixture(scope="module")
def edge_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    import hashlib

    root = tmp_path_factory.mktemp("fuzz-edge")
    onnx_bytes, _ = export_checked(
        zoo.build(zoo.default_student(DIGITS), seed=4), DIGITS.input_shape
    )
    download = root / "download.onnx"
    download.write_bytes(onnx_bytes)
    store = ModelStore(root / "models")
    store.root.mkdir(parents=True)
    store.install(
        "student-fuzz",
        1,
        download,
        {
            "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "input_shape": [1, 8, 8],
            "num_classes": 10,
            "size_bytes": len(onnx_bytes),
        },
    )
    # A server error must show up as a 5xx answer, which the property then catches.
    with TestClient(edge_app(store), raise_server_exceptions=False) as client:
        yield client


@fuzz(HTTP_EXAMPLES)
@given(body=bodies)
# Regression: an integer too large for a float raised OverflowError, answered 500.
@example(body=("near", {"inputs": [10**400]}))
# Regression: FastAPI echoed NaN/Infinity back in its 422 answer, which cannot be JSON: 500.
@example(body=("json", math.inf))
@example(body=("json", {"inputs": math.nan}))
def test_edge_predict_answers_4xx_to_bad_bodies(
    edge_client: TestClient, body: tuple[str, Any]
) -> None:
    kind, value = body
    content = value if kind == "bytes" else json.dumps(value).encode()  # NaN/Infinity too
    SENT["http-edge"] += 1
    response = edge_client.post(
        "/v1/predict", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code < 500, response.text
    inputs = value.get("inputs") if isinstance(value, dict) else None
    valid = kind in ("valid", "near", "json") and isinstance(value, dict) and well_formed(inputs)
    if response.status_code == 200:
        assert valid, f"accepted a bad body: {content[:200]!r}"
        batch = np.asarray(inputs, dtype=np.float64).reshape(-1, 64).shape[0]
        assert len(response.json()["predictions"]) == batch
    else:
        assert 400 <= response.status_code < 500 and "detail" in response.json()
        assert not valid, f"refused a good body: {response.text}"
        REFUSED["http-edge"] += 1


path_segments = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["..", ".", "%2e%2e", "student-fuzz-publisher", "a" * 200, "-x", "x\n"]),
)


@fuzz(HTTP_EXAMPLES)
@given(
    name=path_segments,
    version=st.one_of(st.integers(), path_segments),
    suffix=st.sampled_from(["", "/model.onnx"]),
)
@example(name="student-fuzz-publisher", version=1, suffix="/model.onnx")  # the one good path
def test_cloud_model_routes_answer_4xx_to_bad_paths(
    fuzz_cloud: FuzzCloud, name: str, version: int | str, suffix: str
) -> None:
    client = _cloud_client(fuzz_cloud)
    path = (
        f"/v1/models/{urllib.parse.quote(name, safe='')}"
        f"/versions/{urllib.parse.quote(str(version), safe='')}{suffix}"
    )
    SENT["http-cloud"] += 1
    response = client.get(path)
    assert response.status_code < 500, (path, response.text)
    if response.status_code == 200 and response.request.url.path != path:
        # The client resolved "." or ".." segments: some other route answered.
        pass
    elif response.status_code == 200:
        assert name == fuzz_cloud.model.name, path
        if suffix:
            assert response.headers["x-model-sha256"] == fuzz_cloud.model.sha256
        else:
            assert response.json()["version"] == 1
    else:
        assert 400 <= response.status_code < 500
        REFUSED["http-cloud"] += 1


_CLOUD_CLIENTS: dict[int, TestClient] = {}


def _cloud_client(cloud: FuzzCloud) -> TestClient:
    key = id(cloud.service)
    if key not in _CLOUD_CLIENTS:
        _CLOUD_CLIENTS.clear()
        _CLOUD_CLIENTS[key] = TestClient(cloud_app(cloud.service), raise_server_exceptions=False)
    return _CLOUD_CLIENTS[key]


# ---------------------------------------------------------------------------
# The count
# ---------------------------------------------------------------------------


def test_the_file_refused_at_least_10000_malformed_messages() -> None:
    kinds = ["codec", "parse", "grpc-bytes", "grpc-fields", "http-edge", "http-cloud"]
    if not all(SENT[k] for k in kinds):
        pytest.skip("counts the whole file: run every test of it")
    print(
        "fuzzed: "
        + ", ".join(f"{k} {REFUSED[k]} refused of {SENT[k]}" for k in kinds)
        + f"; {sum(REFUSED[k] for k in kinds)} refused in all; the healthy session trained "
        + f"{HEALTHY_STEPS[0]} steps meanwhile"
    )
    assert REFUSED["codec"] >= 5000
    assert REFUSED["grpc-bytes"] + REFUSED["grpc-fields"] >= 5000
    assert sum(REFUSED[k] for k in kinds) >= 10_000
