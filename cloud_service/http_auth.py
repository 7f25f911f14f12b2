"""Device authentication for the cloud's HTTP API: the same credentials and rules as gRPC.

``Authorization: Bearer CREDENTIAL`` and ``X-Splitkd-Device: NAME`` headers.
With authentication on, the model and session endpoints answer a device
about its own models and sessions only (401 without valid credentials; another
device's model is answered 404 with the words of a model that does not exist,
so names and versions cannot be enumerated); ``/healthz`` and ``/metrics``
stay open for health checks and Prometheus (they carry no secrets and no
private data). The API's description (``/docs``, ``/openapi.json``) is only
served while authentication is off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request

from cloud_service.auth import (
    AUTHORIZATION_HEADER,
    DEVICE_HEADER,
    CloudLookup,
    Revoked,
    refusal_counter,
)
from cloud_service.registry import model_not_found
from cloud_service.security import CloudSecurity
from splitkd.errors import SplitKDError, Unauthenticated

log = logging.getLogger(__name__)


def caller_dependency(
    service: Any, security: CloudSecurity | None
) -> Callable[[Request], str | None]:
    """A FastAPI dependency: the calling device's name, None when authentication is off."""
    authenticator = security.authenticator if security is not None else None
    refusals = refusal_counter(service.metrics.registry) if authenticator is not None else None

    def caller(request: Request) -> str | None:
        if authenticator is None:
            return None
        device = request.headers.get(DEVICE_HEADER)
        authorization = request.headers.get(AUTHORIZATION_HEADER)
        try:
            return authenticator.authenticate(device, authorization)
        except SplitKDError as exc:
            missing = not device or not authorization
            reason = "revoked" if isinstance(exc, Revoked) else "missing" if missing else "unknown"
            if refusals is not None:
                refusals.labels(reason=reason).inc()
            host = request.client.host if request.client else "?"
            log.warning("HTTP %s refused (%s) for %s: %s", request.url.path, reason, host, exc)
            if isinstance(exc, Unauthenticated):
                raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
            raise HTTPException(403, str(exc)) from None

    return caller


def owns_model(service: Any, caller: str | None, name: str, version: int = 0) -> bool:
    """True when authentication is off, or the model was trained for ``caller``.
    A model that does not exist counts as owned, so the API answers 404 for it."""
    if caller is None:
        return True
    return CloudLookup(service).may_read_model(caller, name, version)


def require_model(service: Any, caller: str | None, name: str, version: int) -> None:
    if not owns_model(service, caller, name, version):
        refusal_counter(service.metrics.registry).labels(reason="forbidden").inc()
        raise HTTPException(404, str(model_not_found(name, version)))
