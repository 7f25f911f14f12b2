"""gRPC adapter: decode and validate messages, call CloudService, encode answers.

Every error becomes a gRPC status with a one-line message; an unexpected
exception is logged with its traceback and answered INTERNAL, never crashing
the server or touching another session.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from cloud_service.limits import MAX_SESSION_ID
from cloud_service.metrics import CloudMetrics
from cloud_service.registry import ModelRecord
from cloud_service.service import CloudService
from cloud_service.session import Session
from splitkd import codec, serde
from splitkd.errors import InvalidArgument, SplitKDError
from splitkd.signature import DatasetSignature
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
FLOATS = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16)


def rpc(method: F) -> F:
    """Answer errors with a status and a one-line message; record latency and bytes."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        code = "OK"
        response = None
        try:
            response = method(self, request, context)
            return response
        except SplitKDError as exc:
            code = exc.status
            context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
        except Exception:
            code = "INTERNAL"
            log.exception("unexpected error in %s", name)
            context.abort(
                grpc.StatusCode.INTERNAL, f"internal error in {name}; see the cloud's log"
            )
        finally:
            # A streamed answer counts its bytes chunk by chunk in _stream.
            sent = response.ByteSize() if isinstance(response, Message) else 0
            self.metrics.observe_rpc(
                name, code, time.perf_counter() - started, request.ByteSize(), sent
            )

    return wrapper  # type: ignore[return-value]


def _require_session_id(session_id: str) -> None:
    if not session_id:
        raise InvalidArgument("session_id is empty; call Register first")
    if len(session_id) > MAX_SESSION_ID:
        raise InvalidArgument(f"session_id of {len(session_id)} characters is not a session id")


def model_info(record: ModelRecord) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=record.name,
        version=record.version,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        parameters=record.parameters,
        max_abs_diff=record.max_abs_diff,
        input_shape=record.input_shape,
        num_classes=record.num_classes,
        created_at=record.created_at,
    )


class SplitTrainingServicer(pb_grpc.SplitTrainingServicer):
    def __init__(self, service: CloudService) -> None:
        self.service = service
        self.metrics: CloudMetrics = service.metrics

    @rpc
    def Register(
        self, request: pb.RegisterRequest, context: grpc.ServicerContext
    ) -> pb.RegisterResponse:
        sig = request.signature
        if len(sig.input_shape) > 3:
            raise InvalidArgument(
                f"input shape of {len(sig.input_shape)} dimensions is not supported: use features "
                "(F), sequences (C, L) or images (C, H, W)"
            )
        # 0: the device does not say; the task's classes are the teacher's (the
        # edge checks its own labels against them), so nothing about them leaks.
        classes = sig.num_classes or self.service.teacher.signature.num_classes
        signature = DatasetSignature(tuple(sig.input_shape), classes, sig.name)
        session = self.service.register(
            request.device_id,
            signature,
            requested_epochs=request.requested_epochs,
            device_profile=request.profile.name,
            link_profile=request.profile.link,
            class_weights=list(request.class_weights),
        )
        return session_message(session, self.service.teacher.accuracy)

    @rpc
    def Resume(self, request: pb.ResumeRequest, context: grpc.ServicerContext) -> pb.ResumeResponse:
        _require_session_id(request.session_id)
        if len(request.available_steps) > 10_000:
            raise InvalidArgument("available_steps lists more than 10000 steps")
        step, session = self.service.resume(request.session_id, list(request.available_steps))
        return pb.ResumeResponse(
            step=step, session=session_message(session, self.service.teacher.accuracy)
        )

    @rpc
    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatResponse:
        _require_session_id(request.session_id)
        session = self.service.heartbeat(request.session_id)
        return pb.HeartbeatResponse(
            next_step=session.next_step,
            session_timeout_seconds=self.service.sessions.idle_timeout,
        )

    @rpc
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        _require_session_id(request.session_id)
        # Lookup and rate limit first: a refused call costs no decoding.
        session = self.service.admit(request.session_id)
        student = codec.decode(
            request.student_activations,
            what="student_activations",
            dtypes=FLOATS,
            shape=(None, *session.student_activation_shape),
            finite=True,
        )
        teacher_shape = (None, *session.teacher_activation_shape)
        teacher = None
        if request.HasField("teacher_activations"):
            teacher = codec.decode(
                request.teacher_activations,
                what="teacher_activations",
                dtypes=FLOATS,
                shape=teacher_shape,
                finite=True,
            )
        next_teacher = None
        if request.HasField("next_teacher_activations"):
            next_teacher = codec.decode(
                request.next_teacher_activations,
                what="next_teacher_activations",
                dtypes=FLOATS,
                shape=teacher_shape,
                finite=True,
            )
        labels = codec.decode(
            request.labels, what="labels", dtypes=(pb.DTYPE_INT64,), shape=(None,)
        )
        kd_alpha = request.kd_alpha if request.HasField("kd_alpha") else None
        result = self.service.apply_step(
            session, request.step, student, teacher, labels, next_teacher, kd_alpha
        )
        if result.next_teacher_accepted and not result.replayed:
            # Once the answer is sent: the teacher tail then runs while the edge works.
            context.add_callback(functools.partial(self.service.start_ahead, request.session_id))
        return serde.step_outcome_to_pb(result, request.student_activations.dtype)

    @rpc
    def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.ServicerContext
    ) -> pb.EvaluateResponse:
        _require_session_id(request.session_id)
        session = self.service.admit(request.session_id)
        teacher = request.HasField("teacher_activations")
        if teacher == request.HasField("student_activations"):
            raise InvalidArgument("set exactly one of student_activations and teacher_activations")
        what = "teacher_activations" if teacher else "student_activations"
        shape = session.teacher_activation_shape if teacher else session.student_activation_shape
        activations = codec.decode(
            getattr(request, what), what=what, dtypes=FLOATS, shape=(None, *shape), finite=True
        )
        logits = self.service.apply_evaluate(session, activations, teacher=teacher)
        return pb.EvaluateResponse(logits=codec.encode(logits, pb.DTYPE_FLOAT32))

    @rpc
    def Finish(self, request: pb.FinishRequest, context: grpc.ServicerContext) -> pb.FinishResponse:
        _require_session_id(request.session_id)
        session = self.service.sessions.get(request.session_id)
        head = codec.decode_weights(
            request.student_head, expected=session.head_shapes(), what="student_head"
        )
        record = self.service.finish(request.session_id, head, request.steps)
        return pb.FinishResponse(model=model_info(record))

    @rpc
    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        if request.version < 0:
            raise InvalidArgument(f"version must be >= 0 (0 = latest), got {request.version}")
        record, chunks = self.service.open_download(request.name, request.version, request.offset)
        return _stream(record, chunks, self.metrics)


def _stream(
    record: ModelRecord, chunks: Iterator[tuple[int, bytes]], metrics: CloudMetrics
) -> Iterator[pb.ModelChunk]:
    for offset, data in chunks:
        chunk = pb.ModelChunk(
            data=data,
            offset=offset,
            total_size=record.size_bytes,
            sha256=record.sha256,
            version=record.version,
        )
        metrics.sent_bytes.labels(method="DownloadModel").inc(chunk.ByteSize())
        yield chunk


def session_message(session: Session, teacher_accuracy: float | None) -> pb.RegisterResponse:
    """Everything an edge needs to train a session: on Register, and again on Resume."""
    return serde.session_to_pb(session.info(teacher_accuracy))
