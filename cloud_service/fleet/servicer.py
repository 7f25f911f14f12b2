"""gRPC adapter for the ``Fleet`` service: decode, call ``FleetService``, encode.

Errors become statuses through the same decorator as the split servicer; the
device a call is authenticated as (when enrolment is on) must own the member
id it names.
"""

from __future__ import annotations

import grpc

from cloud_service.auth import authenticated_device
from cloud_service.fleet.service import FleetService
from cloud_service.servicer import rpc, session_message
from splitkd import serde
from splitkd.errors import InvalidArgument
from splitkd.messages import UpdateAnswer
from splitkd.v1 import splitkd_pb2 as pb
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc


def _require_member(member_id: str) -> None:
    if not member_id or len(member_id) > 64:
        raise InvalidArgument("member_id is empty or too long; call JoinCohort first")


class FleetServicer(pb_grpc.FleetServicer):
    def __init__(self, fleet: FleetService) -> None:
        self.fleet = fleet
        self.metrics = fleet.split.metrics

    @rpc
    def JoinCohort(
        self, request: pb.JoinCohortRequest, context: grpc.ServicerContext
    ) -> pb.JoinCohortResponse:
        answer = self.fleet.join(
            request.device_id,
            request.cohort,
            serde.signature_from_pb(request.signature),
            request.num_samples,
            profile=request.profile.name,
        )
        return serde.join_answer_to_pb(answer)

    @rpc
    def FetchRound(
        self, request: pb.FetchRoundRequest, context: grpc.ServicerContext
    ) -> pb.RoundTask:
        _require_member(request.member_id)
        task = self.fleet.fetch(
            request.member_id, request.after_round, authenticated_device(), request.held_weights
        )
        accuracy = self.fleet.split.teacher.accuracy
        session = None if task.session is None else session_message(task.session, accuracy)  # type: ignore[arg-type]
        return serde.round_task_to_pb(task, session)

    @rpc
    def SubmitUpdate(
        self, request: pb.SubmitUpdateRequest, context: grpc.ServicerContext
    ) -> pb.SubmitUpdateResponse:
        _require_member(request.member_id)
        device = authenticated_device()
        # Checked before decoding a byte of the weights: only a member's own update.
        self.fleet.check_member(request.member_id, device)
        expected = self.fleet.expected_update(request.member_id)
        update = serde.update_from_pb(request, expected)
        fresh, number = self.fleet.submit(update, device)
        return serde.update_answer_to_pb(UpdateAnswer(True, number, duplicate=not fresh))
