"""Build and run the cloud process: one gRPC server and one HTTP server."""

from __future__ import annotations

import functools
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import Any

import grpc
import uvicorn
from google.protobuf.message import DecodeError

from cloud_service.fleet.service import FleetService
from cloud_service.fleet.wire_servicer import WireFleetServicer
from cloud_service.health import add_health, set_serving
from cloud_service.http_api import create_app
from cloud_service.lifecycle import Lifecycle
from cloud_service.lifecycle_servicer import LifecycleServicer
from cloud_service.replicas import Replica
from cloud_service.security import CloudSecurity
from cloud_service.service import CloudService
from cloud_service.servicer import SplitTrainingServicer
from splitkd.grpc_options import DEFAULT_MAX_MESSAGE_BYTES, server_options
from splitkd.v1 import splitkd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
_UNDECODABLE = object()


class RefuseUndecodable(grpc.ServerInterceptor):
    """Answer a request that is not a valid protobuf message with INVALID_ARGUMENT.

    gRPC itself answers INTERNAL ("Exception deserializing request!"), which
    blames the cloud for a peer's garbage. First in the chain, so nothing
    after it (authentication, the servicer) ever sees an unparsed request.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError:
                return _UNDECODABLE

        def guard(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                if request is _UNDECODABLE:
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{method}: the request is not a valid protobuf message",
                    )
                return behavior(request, context)

            return call

        kwargs = {
            "request_deserializer": deserialize,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary), **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream), **kwargs)
        return handler


class MemoizedInterceptors(grpc.ServerInterceptor):
    """Run ``interceptors`` once per method, not once per call.

    gRPC calls ``intercept_service`` for every call on its one polling thread,
    and each of ours builds a new wrapped handler there: at hundreds of steps a
    second that thread (and the GIL it holds) became a queue of its own. Ours
    depend on the method and its handler only, never on the call's metadata
    (the checks run inside the wrapped handler, per call), so the wrapped
    handler is kept by method and reused while gRPC returns the same handler.
    """

    def __init__(self, interceptors: list[grpc.ServerInterceptor]) -> None:
        self.interceptors = interceptors
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler | None]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped: grpc.RpcMethodHandler | None = handler
        # Innermost first, so the first interceptor of the list sees the call first.
        for interceptor in reversed(self.interceptors):
            wrapped = interceptor.intercept_service(
                functools.partial(_fixed, wrapped), handler_call_details
            )
        # A race stores the same value twice: harmless, and dict writes are atomic.
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _fixed(
    handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails
) -> grpc.RpcMethodHandler | None:
    return handler


def build_grpc_server(
    service: CloudService,
    address: str,
    *,
    max_workers: int = 16,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    security: CloudSecurity | None = None,
    fleet: FleetService | None = None,
    lifecycle: Lifecycle | None = None,
    health: bool = False,
) -> tuple[grpc.Server, int]:
    """A started-ready gRPC server bound to ``address``; returns it and the bound port.

    ``security`` adds TLS (a certificate given) and device authentication;
    ``health`` the standard health service (``server.health``, cloud_service/health.py).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=server_options(max_message_bytes),
        interceptors=[
            MemoizedInterceptors(
                [
                    RefuseUndecodable(),
                    *(security.interceptors(service) if security is not None else []),
                ]
            )
        ],
    )
    pb_grpc.add_SplitTrainingServicer_to_server(SplitTrainingServicer(service), server)
    if fleet is not None:
        # The Fleet servicer, reading what a joining device asks of its wire (splitwire).
        pb_grpc.add_FleetServicer_to_server(WireFleetServicer(fleet), server)
    if lifecycle is not None:
        pb_grpc.add_LifecycleServicer_to_server(LifecycleServicer(lifecycle), server)
    if health:
        server.health = add_health(server)  # type: ignore[attr-defined]
    credentials = security.grpc_credentials() if security is not None else None
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address} (port in use?)")
    return server, port


@dataclass
class ServeOptions:
    host: str = "0.0.0.0"
    grpc_port: int = 50051
    http_port: int = 8000
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grpc_workers: int = 16
    grace_seconds: float = 5.0
    security: CloudSecurity | None = None
    fleet: FleetService | None = None
    lifecycle: Lifecycle | None = None
    replica: Replica | None = None
    # How often a replica asks its shared store whether it answers (readiness).
    probe_seconds: float = 2.0


def serve(service: CloudService, options: ServeOptions) -> None:
    """Run until SIGINT/SIGTERM; then stop taking calls and let running ones finish."""
    # torch, the teacher and everything built so far live as long as the process.
    # Left to the collector, its oldest generation walks these ~300,000 objects again
    # and again, each time holding the GIL (every call waits) for 0.3-1 s on a busy
    # 2-core box: most of make loadtest's p99. Frozen, they are never walked again.
    gc.freeze()
    security = options.security or CloudSecurity()
    grpc_server, grpc_port = build_grpc_server(
        service,
        f"{options.host}:{options.grpc_port}",
        max_workers=options.grpc_workers,
        max_message_bytes=options.max_message_bytes,
        security=security,
        fleet=options.fleet,
        lifecycle=options.lifecycle,
        health=True,
    )
    grpc_server.start()
    config = uvicorn.Config(
        create_app(service, security, options.fleet),
        host=options.host,
        port=options.http_port,
        log_level="warning",
        access_log=False,
        **security.uvicorn_options(),
    )
    http_server = uvicorn.Server(config)
    # uvicorn installs no signal handlers outside the main thread, so the main
    # thread owns SIGTERM/SIGINT and stops both servers together.
    http_thread = threading.Thread(target=http_server.run, name="http", daemon=True)
    http_thread.start()
    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: draining (%.0f s grace)", signum, options.grace_seconds)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    security.announce()
    log.info(
        "cloud ready: gRPC on %s:%d (TLS %s), HTTP on %s://%s:%d",
        options.host,
        grpc_port,
        security.status()["tls"],
        security.scheme,
        options.host,
        options.http_port,
    )
    probed = 0.0
    while not stopping.wait(0.5):
        if options.fleet is not None:
            options.fleet.poke_all()  # rounds whose deadline passed close even if nobody calls
        if options.replica is not None and time.monotonic() - probed >= options.probe_seconds:
            probed = time.monotonic()
            set_serving(grpc_server.health, options.replica.store.probe())  # type: ignore[attr-defined]
        if not http_thread.is_alive():
            grpc_server.stop(0)
            raise OSError(f"the HTTP server stopped (is port {options.http_port} in use?)")
    # Not serving first: load balancers stop sending new calls while running ones finish.
    set_serving(grpc_server.health, False)  # type: ignore[attr-defined]
    http_server.should_exit = True
    grpc_server.stop(options.grace_seconds).wait()
    # Nothing runs any more: the live state of every session goes to disk, so
    # a restarted cloud resumes exactly where this one stopped.
    if options.fleet is not None:
        options.fleet.close()
    saved = service.checkpoint_all()
    log.info("checkpointed %d unfinished sessions", saved)
    if options.replica is not None:
        # Released leases let another replica take these sessions at once.
        log.info("released %d session leases", options.replica.release_all())
    http_thread.join(options.grace_seconds)
    log.info("cloud stopped")
