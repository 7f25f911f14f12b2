"""The standard gRPC health service, fed by the replica's readiness.

Envoy's active health checks and Kubernetes' gRPC probes ask
``grpc.health.v1.Health/Check``; HTTP ``/readyz`` answers the same. A replica
is ready when its shared storage answers: one that cannot reach it would
refuse every session it does not already hold, so it is better sent none.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# "" is the whole server (what Envoy asks by default), then each service by name.
SERVICES = ("", "splitkd.v1.SplitTraining", "splitkd.v1.Fleet")
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def add_health(server: grpc.Server) -> health.HealthServicer:
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    set_serving(servicer, True)
    return servicer


def set_serving(servicer: health.HealthServicer, ready: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if ready
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in SERVICES:
        servicer.set(name, status)
