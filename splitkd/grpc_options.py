"""Every gRPC channel and server option in one place, each with its reason."""

from __future__ import annotations

# 16 MiB: a batch of 64 activations of 64x8x8 floats is 1 MiB; anything much
# larger is a bug or an attack and gets RESOURCE_EXHAUSTED from gRPC itself.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Cloud load balancers kill TCP connections idle for ~4 minutes; a ping every
# 210 s (Flower's value) keeps a device that waits between epochs connected.
KEEPALIVE_TIME_MS = 210_000
KEEPALIVE_TIMEOUT_MS = 20_000


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC's default reconnect backoff grows to 120 s: a device would sit
        # idle for minutes after a cloud restart. Cap it at 5 s.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Accept the clients' keepalive pings (default minimum is 5 minutes,
        # which would make the server answer our 210 s pings with GOAWAY).
        ("grpc.http2.min_ping_interval_without_data_ms", 60_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 0),
    ]


# The routing key a device sends on every call (its cohort's name, or its own id):
# Envoy hashes it (deploy/envoy/) so a cohort's calls land on the replica that
# holds it. Lower case: gRPC metadata keys are.
ROUTE_HEADER = "x-splitkd-route"
# A solo device asks Envoy for balanced placement (PLACEMENT_HEADER: BALANCED) and
# sends back the replica its answers name (UPSTREAM_HEADER, Envoy's stateful session):
# edge_agent/sticky.py, deploy/envoy/envoy.yaml.
PLACEMENT_HEADER = "x-splitkd-placement"
BALANCED = "balanced"
UPSTREAM_HEADER = "x-splitkd-upstream"
