"""The Fleet servicer, with the wire a device asks for read from its JoinCohort.

``FleetService.join`` reads the ask through ``wire.current_join_ask()`` (a context
variable, as ``auth.authenticated_device()``), so that the servicer's own
JoinCohort stays as it is. Folding this into ``fleet/servicer.py`` is one argument
(``ask=serde.cohort_ask_from_pb(request)``) once nobody else is editing it.
"""

from __future__ import annotations

import grpc

from cloud_service.fleet.servicer import FleetServicer
from cloud_service.fleet.weights import weights_ask
from cloud_service.fleet.wire import join_ask
from splitkd import serde
from splitkd.v1 import splitkd_pb2 as pb


class WireFleetServicer(FleetServicer):
    def JoinCohort(
        self, request: pb.JoinCohortRequest, context: grpc.ServicerContext
    ) -> pb.JoinCohortResponse:
        token = join_ask.set(serde.cohort_ask_from_pb(request))
        weights = weights_ask.set(request.weights_codec)  # fedwire
        try:
            reply: pb.JoinCohortResponse = super().JoinCohort(request, context)
            return reply
        finally:
            weights_ask.reset(weights)
            join_ask.reset(token)
