"""gRPC adapter for the ``Lifecycle`` service (DiReDi): decode, call ``Lifecycle``, encode."""

from __future__ import annotations

import grpc

from cloud_service.lifecycle import Lifecycle, Outcome
from cloud_service.servicer import model_info, rpc
from splitkd import codec, serde
from splitkd.errors import InvalidArgument
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc

MAX_ID = 64


class LifecycleServicer(pb_grpc.LifecycleServicer):
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.metrics = lifecycle.service.metrics

    @rpc
    def OpenAdaptation(
        self, request: pb.OpenAdaptationRequest, context: grpc.ServicerContext
    ) -> pb.AdaptationTask:
        task = self.lifecycle.open(
            request.device_id, request.model_name, request.model_version, request.model_sha256
        )
        return pb.AdaptationTask(
            adaptation_id=task.adaptation_id,
            student=serde.spec_to_pb(task.spec),
            weights=codec.encode_weights(task.state),
            probes=codec.encode(task.probes),
            teacher_version=task.teacher_version,
        )

    @rpc
    def ReportKnowledge(
        self, request: pb.KnowledgeReport, context: grpc.ServicerContext
    ) -> pb.KnowledgeOutcome:
        if not request.adaptation_id or len(request.adaptation_id) > MAX_ID:
            raise InvalidArgument("adaptation_id is empty or too long; call OpenAdaptation first")
        if request.num_samples < 0:
            raise InvalidArgument(f"num_samples must be >= 0, got {request.num_samples}")
        task = self.lifecycle.task(request.adaptation_id, request.device_id)
        logits = codec.decode(
            request.probe_logits, what="probe_logits", dtypes=(pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16)
        )
        self.lifecycle.check_report(task, request.model_name, request.model_version, logits)
        cohort = (
            self.lifecycle.cohort_students(request.device_id, request.cohort)
            if request.cohort
            else []
        )
        return outcome_to_pb(self.lifecycle.report(task, logits, request.num_samples, cohort))


def outcome_to_pb(outcome: Outcome) -> pb.KnowledgeOutcome:
    message = pb.KnowledgeOutcome(
        accepted=outcome.accepted,
        reason=outcome.reason,
        teacher_version_before=outcome.teacher_before,
        teacher_version_after=outcome.teacher_after,
        guardrail=pb.Guardrail(
            presumed_accuracy_before=outcome.presumed_before,
            presumed_accuracy_after=outcome.presumed_after,
            margin=outcome.margin,
            heldout_samples=outcome.heldout_samples,
        ),
        probe_agreement=outcome.probe_agreement,
    )
    if outcome.student is not None:
        message.student.CopyFrom(model_info(outcome.student))
    message.cohort_students.extend(model_info(r) for r in outcome.cohort_students)
    return message
