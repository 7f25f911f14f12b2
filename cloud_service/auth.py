"""Who is calling, and may they touch this: device authentication and access rules.

Every call carries the device's name and credential as metadata
(``x-splitkd-device: NAME``, ``authorization: Bearer CREDENTIAL``). The
gRPC interceptor and the HTTP API both ask :class:`DeviceAuthenticator`:

* no or malformed credentials, an unknown device, a wrong credential:
  UNAUTHENTICATED (the answer does not say which, to not reveal enrolled names);
* the right credential of a revoked device: PERMISSION_DENIED;
* Register for another device than the caller: PERMISSION_DENIED;
* another device's session or model: NOT_FOUND, the very answer a session or
  model that does not exist gets, so names and versions cannot be enumerated.
  A request that names a session (any ``session_id`` field, so Step, Evaluate,
  Finish, Resume, Heartbeat and RPCs added later alike) must come from the
  session's device; a model can be downloaded only by the device it was
  trained for;
* with mutual TLS, a certificate issued to another device (its subject CN or
  a DNS SAN is not the device's name): PERMISSION_DENIED.

Authentication is on when the cloud runs with ``--require-auth`` or once any
device is enrolled; otherwise every call passes (insecure development mode,
announced at start-up and in ``/healthz``). The credential is never logged,
never put in an error message and never a metric label.
"""

from __future__ import annotations

import contextvars
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

import grpc
from prometheus_client import CollectorRegistry, Counter

from cloud_service.devices import DeviceRegistry, Verdict
from cloud_service.limits import UNKNOWN_SESSION
from cloud_service.registry import model_not_found
from splitkd import names
from splitkd.errors import NotFound, PermissionDenied, SplitKDError, Unauthenticated

log = logging.getLogger(__name__)

DEVICE_HEADER = "x-splitkd-device"
AUTHORIZATION_HEADER = "authorization"
_BEARER = "bearer "
# The longest credential accepted: ours are 43 characters; anything huge is not one.
_MAX_CREDENTIAL = 512
REASONS = ("missing", "unknown", "revoked", "forbidden")

_current_device: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "splitkd_device", default=None
)


def authenticated_device() -> str | None:
    """The device the current gRPC call was authenticated as (None when auth is off)."""
    return _current_device.get()


class Revoked(PermissionDenied):
    """The right credential of a revoked device."""


class Foreign(NotFound):
    """Another device's session or model: answered as if it did not exist."""


class SessionLookup(Protocol):
    def session_owner(self, session_id: str) -> str | None: ...
    def model_owner(self, name: str, version: int) -> str | None: ...
    def may_read_model(self, device: str, name: str, version: int) -> bool: ...


_refusal_counters: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = (
    weakref.WeakKeyDictionary()
)


def refusal_counter(registry: CollectorRegistry) -> Counter:
    """``splitkd_cloud_auth_refusals_total{reason}``: one per registry, however many servers."""
    counter = _refusal_counters.get(registry)
    if counter is None:
        counter = Counter(
            "splitkd_cloud_auth_refusals",
            "Calls refused by device authentication, by reason (missing, unknown, revoked, forbidden)",
            ["reason"],
            registry=registry,
        )
        for reason in REASONS:
            counter.labels(reason=reason)
        _refusal_counters[registry] = counter
    return counter


class DeviceAuthenticator:
    def __init__(self, devices: DeviceRegistry, *, require: bool = False) -> None:
        self.devices = devices
        self.require = require
        self._was_enabled: bool | None = None

    def enabled(self) -> bool:
        on = self.require or self.devices.has_entries()
        if self._was_enabled is not None and on != self._was_enabled:
            log.warning(
                "device authentication is now %s (%s)",
                "ON" if on else "OFF",
                f"devices enrolled in {self.devices.path}" if on else "no device enrolled",
            )
        self._was_enabled = on
        return on

    def authenticate(self, device: str | None, authorization: str | None) -> str | None:
        """The caller's device name, None when auth is off; raises when refused."""
        if not self.enabled():
            return None
        if not device or not authorization:
            raise Unauthenticated(
                "no device credentials: this cloud only serves enrolled devices; run the edge with "
                "--device-id NAME and --credential-file FILE (from 'splitkd-cloud devices add NAME')"
            )
        if not names.is_device_id(device):
            raise Unauthenticated(f"{DEVICE_HEADER} must be 1-64 letters, digits, '.', '_' or '-'")
        if authorization[: len(_BEARER)].lower() != _BEARER or len(authorization) > _MAX_CREDENTIAL:
            raise Unauthenticated("authorization must be 'Bearer <credential>'")
        credential = authorization[len(_BEARER) :].strip()
        verdict = self.devices.verify(device, credential)
        if verdict is Verdict.UNKNOWN:
            raise Unauthenticated(
                f"device {device!r} is not enrolled or its credential is wrong: check --credential, "
                f"or enroll it with 'splitkd-cloud devices add {device}'"
            )
        if verdict is Verdict.REVOKED:
            raise Revoked(
                f"device {device!r} is revoked; enroll it again with "
                f"'splitkd-cloud devices add {device} --replace'"
            )
        return device


def check_access(method: str, request: Any, device: str, lookup: SessionLookup) -> None:
    """PERMISSION_DENIED unless ``device`` may make this request (see the module docstring)."""
    requested_device = getattr(request, "device_id", None)
    if isinstance(requested_device, str) and requested_device != device:
        raise PermissionDenied(
            f"device {device!r} cannot act as {requested_device!r}: --device-id must be the "
            "name the device was enrolled with"
        )
    session_id = getattr(request, "session_id", None)
    if isinstance(session_id, str) and session_id:
        owner = lookup.session_owner(session_id)
        if owner is not None and owner != device:
            raise Foreign(UNKNOWN_SESSION)
    if method == "DownloadModel" and not lookup.may_read_model(
        device, request.name, request.version
    ):
        raise Foreign(str(model_not_found(request.name, request.version)))


def check_certificate(device: str, context: grpc.ServicerContext) -> None:
    """With mutual TLS: the client certificate must name ``device`` (subject CN or DNS SAN).

    gRPC has verified the chain up to --tls-ca; this binds the certificate to
    the credential, so one device's key cannot carry another device's credential.
    """
    # Each key maps to a list of bytes values (grpc's typing says otherwise).
    auth_context = cast(dict[str, list[bytes]], context.auth_context() or {})
    names = {
        value.decode(errors="replace")
        for key in ("x509_common_name", "x509_subject_alternative_name")
        for value in auth_context.get(key, [])
    }
    if device not in names:
        raise PermissionDenied(
            f"the client certificate was not issued to device {device!r}: each device connects "
            "with its own certificate (splitkd-cloud certs --device NAME)"
        )


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key in (DEVICE_HEADER, AUTHORIZATION_HEADER) and isinstance(value, str):
            found[key] = value
    return found


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call and applies :func:`check_access` before the servicer runs.

    The check runs inside the handler (the worker thread), where the request
    is decoded: gRPC calls ``intercept_service`` on its polling thread before
    the request arrives.
    """

    def __init__(
        self,
        authenticator: DeviceAuthenticator,
        lookup: SessionLookup,
        refusals: Counter | None = None,
        *,
        bind_certificate: bool = False,
    ) -> None:
        """``bind_certificate``: mutual TLS is on, so the certificate must name the device."""
        self.authenticator = authenticator
        self.lookup = lookup
        self.refusals = refusals
        self.bind_certificate = bind_certificate

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return handler  # load balancers' probes carry no device credential; it tells nothing
        method = handler_call_details.method.rsplit("/", 1)[-1]
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guard(handler.unary_unary, method), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._guard(handler.unary_stream, method), **kwargs
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._guard(handler.stream_unary, method, streaming_request=True), **kwargs
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._guard(handler.stream_stream, method, streaming_request=True), **kwargs
            )
        return handler

    def _admit(self, method: str, request: Any, context: grpc.ServicerContext) -> str | None:
        metadata = _metadata(context)
        try:
            device = self.authenticator.authenticate(
                metadata.get(DEVICE_HEADER), metadata.get(AUTHORIZATION_HEADER)
            )
            if device is not None and self.bind_certificate:
                check_certificate(device, context)
            if device is not None and request is not None:
                check_access(method, request, device, self.lookup)
        except SplitKDError as exc:
            reason = _reason(exc, metadata)
            if self.refusals is not None:
                self.refusals.labels(reason=reason).inc()
            log.warning("%s refused (%s) for %s: %s", method, reason, context.peer(), exc)
            context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
        return device

    def _guard(
        self, behavior: Callable[..., Any], method: str, *, streaming_request: bool = False
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            device = self._admit(method, None if streaming_request else request, context)
            token = _current_device.set(device)
            try:
                result = behavior(request, context)
            finally:
                _current_device.reset(token)
            if isinstance(result, Iterator):
                return _with_device(result, device)
            return result

        return guarded


def _with_device(items: Iterator[Any], device: str | None) -> Iterator[Any]:
    """Keep the caller's identity visible while a streamed answer is produced."""
    token = _current_device.set(device)
    try:
        yield from items
    finally:
        _current_device.reset(token)


def _reason(exc: SplitKDError, metadata: dict[str, str]) -> str:
    if isinstance(exc, Unauthenticated):
        missing = DEVICE_HEADER not in metadata or AUTHORIZATION_HEADER not in metadata
        return "missing" if missing else "unknown"
    if isinstance(exc, Revoked):
        return "revoked"
    return "forbidden"  # PermissionDenied, and Foreign (answered NOT_FOUND)


class CloudLookup:
    """Owners of sessions and models from a ``CloudService``'s live state. Unknown
    sessions and models give None: the servicer then answers NOT_FOUND itself."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def session_owner(self, session_id: str) -> str | None:
        try:
            owner: str = self.service.sessions.get(session_id).device_id
        except SplitKDError:
            return None
        return owner

    def model_owner(self, name: str, version: int) -> str | None:
        try:
            record = self.service.registry.get(name, version)
        except (SplitKDError, OSError, ValueError):
            return None
        # A model published outside a session has no owner: no device may take it.
        owner: str = record.device_id or "\0nobody"
        return owner

    def may_read_model(self, device: str, name: str, version: int) -> bool:
        """A device reads its own students and the students of cohorts it is a member of.

        A model that does not exist is "readable": the servicer then answers NOT_FOUND.
        """
        try:
            record = self.service.registry.get(name, version)
        except (SplitKDError, OSError, ValueError):
            return True
        if record.cohort:
            member = getattr(self.service, "cohort_member", None)
            return bool(member is not None and member(record.cohort, device))
        return bool(record.device_id) and record.device_id == device
