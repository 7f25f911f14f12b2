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

from cloud_service.metrics import CloudMetrics
from cloud_service.registry import ModelRecord
from cloud_service.service import CloudService
from cloud_service.session import Session
from splitkd import codec
from splitkd.errors import InvalidArgument, SplitKDError
from splitkd.signature import DatasetSignature
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
FLOATS = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16)
_WIRE = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16}


def _rpc(method: F) -> F:
    """Answer errors with a status and a one-line message; record latency and bytes."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: SplitTrainingServicer, request: Any, context: grpc.ServicerContext) -> Any:
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

    @_rpc
    def Register(
        self, request: pb.RegisterRequest, context: grpc.ServicerContext
    ) -> pb.RegisterResponse:
        sig = request.signature
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
        return session_message(session)

    @_rpc
    def Resume(self, request: pb.ResumeRequest, context: grpc.ServicerContext) -> pb.ResumeResponse:
        _require_session_id(request.session_id)
        if len(request.available_steps) > 10_000:
            raise InvalidArgument("available_steps lists more than 10000 steps")
        step, session = self.service.resume(request.session_id, list(request.available_steps))
        return pb.ResumeResponse(step=step, session=session_message(session))

    @_rpc
    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatResponse:
        _require_session_id(request.session_id)
        session = self.service.heartbeat(request.session_id)
        return pb.HeartbeatResponse(
            next_step=session.next_step,
            session_timeout_seconds=self.service.sessions.idle_timeout,
        )

    @_rpc
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        _require_session_id(request.session_id)
        session = self.service.sessions.get(request.session_id)
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
        result = self.service.step(
            request.session_id, request.step, student, teacher, labels, next_teacher
        )
        if result.next_teacher_accepted and not result.replayed:
            # Once the answer is sent: the teacher tail then runs while the edge works.
            context.add_callback(functools.partial(self.service.start_ahead, request.session_id))
        return pb.StepResponse(
            step=result.step,
            gradient=codec.encode(result.gradient, request.student_activations.dtype),
            loss=result.loss,
            kd_loss=result.kd_loss,
            ce_loss=result.ce_loss,
            correct=result.correct,
            replayed=result.replayed,
            next_teacher_accepted=result.next_teacher_accepted,
        )

    @_rpc
    def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.ServicerContext
    ) -> pb.EvaluateResponse:
        _require_session_id(request.session_id)
        session = self.service.sessions.get(request.session_id)
        student = codec.decode(
            request.student_activations,
            what="student_activations",
            dtypes=FLOATS,
            shape=(None, *session.student_activation_shape),
            finite=True,
        )
        logits = self.service.evaluate(request.session_id, student)
        return pb.EvaluateResponse(logits=codec.encode(logits, pb.DTYPE_FLOAT32))

    @_rpc
    def Finish(self, request: pb.FinishRequest, context: grpc.ServicerContext) -> pb.FinishResponse:
        _require_session_id(request.session_id)
        session = self.service.sessions.get(request.session_id)
        head = codec.decode_weights(
            request.student_head, expected=session.head_shapes(), what="student_head"
        )
        record = self.service.finish(request.session_id, head, request.steps)
        return pb.FinishResponse(model=model_info(record))

    @_rpc
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


def session_message(session: Session) -> pb.RegisterResponse:
    """Everything an edge needs to train a session: on Register, and again on Resume."""
    hyper = session.hyper
    return pb.RegisterResponse(
        session_id=session.session_id,
        student_cut=session.student_cut,
        teacher_cut=session.teacher_cut,
        student=pb.ModelSpec(
            family=session.student_spec.family,
            spec_json=session.student_spec.to_json(),
            num_stages=session.student_spec.num_stages,
        ),
        teacher=pb.ModelSpec(
            family=session.teacher_spec.family,
            spec_json=session.teacher_spec.to_json(),
            num_stages=session.teacher_spec.num_stages,
        ),
        student_head=codec.encode_weights(session.student.part_state(0, session.student_cut)),
        teacher_head=codec.encode_weights(session.teacher.part_state(0, session.teacher_cut)),
        hyperparameters=pb.Hyperparameters(
            optimizer=hyper.optimizer,
            learning_rate=hyper.learning_rate,
            batch_size=hyper.batch_size,
            epochs=hyper.epochs,
            kd_alpha=hyper.kd_alpha,
            kd_temperature=hyper.kd_temperature,
            seed=hyper.seed,
            wire_dtype=_WIRE[hyper.wire_dtype],
            checkpoint_every=hyper.checkpoint_every,
        ),
        next_step=session.next_step,
        model_name=session.model_name,
    )
