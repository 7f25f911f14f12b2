"""Balanced placement behind Envoy: a solo device stays on the replica that took it.

A solo device sends ``x-splitkd-placement: balanced`` on every call. Envoy places
a call round robin over the healthy replicas and names the replica in the answer
(``x-splitkd-upstream``, its header-based stateful session); the device sends that
name back on every later call, so they all reach the replica holding its session.
When that replica is gone, Envoy ignores the name, places the call round robin
again, and the replica that answers restores the session (lease, shared
checkpoint, Resume) and is named in the answer instead (deploy/envoy/envoy.yaml).

Only successful answers move the device: an error (UNAVAILABLE from a replica
that does not hold the session's lease) says nothing about where it lives.

The name comes from the network: it is kept only when it is short, printable ASCII
(gRPC cannot send anything else as a header), and it only ever goes back to the
same load balancer, which follows it only when it names one of its healthy replicas.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from edge_agent.security import with_metadata
from splitkd.grpc_options import BALANCED, PLACEMENT_HEADER, UPSTREAM_HEADER

log = logging.getLogger(__name__)
# Envoy's value is base64 of "host:port" (an IPv6 address in brackets): ~70 characters.
MAX_UPSTREAM_CHARS = 256
_VISIBLE_ASCII = re.compile(rf"[!-~]{{1,{MAX_UPSTREAM_CHARS}}}")


def valid_upstream(value: object) -> str | None:
    """``value`` when it can be an upstream name to send back, else None."""
    if isinstance(value, str) and _VISIBLE_ASCII.fullmatch(value):
        return value
    return None


def _readable(upstream: str) -> str:
    """Envoy's base64 of host:port, decoded for a log line (else as it came)."""
    try:
        address = base64.b64decode(upstream, validate=True).decode("ascii")
    except ValueError:
        return upstream
    return address if address.isprintable() else upstream


class StickyUpstream(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """The replica this device's answers came from; an interceptor that sends it back."""

    def __init__(self) -> None:
        self._upstream: str | None = None
        self._lock = threading.Lock()

    @property
    def upstream(self) -> str | None:
        return self._upstream

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The headers of the next call: balanced placement, and the replica if known."""
        upstream = self._upstream
        named = ((UPSTREAM_HEADER, upstream),) if upstream else ()
        return ((PLACEMENT_HEADER, BALANCED), *named)

    def observe(self, metadata: Sequence[tuple[str, Any]] | None) -> None:
        """A successful answer's initial metadata: follow the replica it names."""
        values = [value for key, value in metadata or () if key == UPSTREAM_HEADER]
        if not values:
            return  # Envoy names a replica only when it is not the one the call named
        upstream = valid_upstream(values[-1])
        if upstream is None:
            log.warning("ignored a malformed %s header in the cloud's answer", UPSTREAM_HEADER)
            return
        with self._lock:
            if upstream != self._upstream:
                log.info("calls now go to cloud replica %s", _readable(upstream))
                self._upstream = upstream

    def _answered(self, outcome: Any) -> None:
        if outcome.exception() is None:
            self.observe(outcome.initial_metadata())

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        outcome = continuation(with_metadata(details, self.metadata()), request)
        outcome.add_done_callback(self._answered)  # at once when the call already ended
        return outcome

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        # Downloads follow a Finish: the replica is known by then.
        return continuation(with_metadata(details, self.metadata()), request)
