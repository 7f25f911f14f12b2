"""The cloud's HTTP API (FastAPI): health, model registry, sessions."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Path, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from cloud_service.http_auth import caller_dependency, owns_model, require_model
from cloud_service.security import CloudSecurity
from cloud_service.service import CloudService
from splitkd import __version__, names
from splitkd.errors import SplitKDError
from splitkd.telemetry import exposition

_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,  # the shared store does not answer, or holds a damaged model
}
NAME = Path(pattern=names.MODEL_NAME_PATTERN, description="model name, e.g. student-edge-0")
VERSION = Path(ge=1, le=1_000_000, description="model version, from 1")


def _http_error(exc: SplitKDError) -> HTTPException:
    return HTTPException(status_code=_HTTP_STATUS.get(exc.status, 500), detail=str(exc))


def create_app(
    service: CloudService, security: CloudSecurity | None = None, fleet: Any = None
) -> FastAPI:
    """``fleet``: a ``FleetService`` (cohorts), or None when the cloud runs none."""
    # The description is served by hand, below: only while authentication is off.
    app = FastAPI(
        title="splitkd cloud", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
    )
    started = time.time()
    # The calling device (None with authentication off): see cloud_service/http_auth.py.
    caller = Depends(caller_dependency(service, security))
    security_status = security.status if security is not None else CloudSecurity().status

    def describe_only_without_auth() -> None:
        if security is not None and security.auth_enabled():
            raise HTTPException(status_code=404, detail="Not Found")

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_: None = Depends(describe_only_without_auth)) -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    def docs(_: None = Depends(describe_only_without_auth)) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        body, content_type = exposition(service.metrics.registry)
        return Response(content=body, media_type=content_type)

    @app.get("/readyz", response_model=None)
    def readyz() -> dict[str, Any] | JSONResponse:
        """200 when this cloud can serve; 503 while its shared storage does not answer."""
        if service.ready():
            return {"status": "ready"}
        return JSONResponse({"status": "not ready: the shared store does not answer"}, 503)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        teacher = service.teacher
        return {
            "status": "ok",
            "uptime_seconds": round(time.time() - started, 3),
            "teacher": {
                "spec": teacher.spec.describe(),
                "parameters": teacher.parameters,
                "accuracy": teacher.accuracy,
                "signature": teacher.signature.describe(),
                "samples": teacher.samples,
            },
            "sessions": len(service.sessions),
            "teacher_cache_bytes": dict(
                zip(("allocated", "reserved"), service.cache_bytes(), strict=True)
            ),
            **security_status(),
        }

    @app.get("/v1/models")
    def list_models(device: str | None = caller) -> dict[str, Any]:
        models = []
        for name in service.registry.names():
            versions = service.registry.versions(name)
            if versions and owns_model(service, device, name):
                models.append(
                    {
                        "name": name,
                        "latest": versions[-1].version,
                        "versions": [v.version for v in versions],
                    }
                )
        return {"models": models}

    @app.get("/v1/models/{name}/versions/{version}")
    def model_metadata(
        name: str = NAME, version: int = VERSION, device: str | None = caller
    ) -> dict[str, object]:
        require_model(service, device, name, version)
        try:
            return service.registry.get(name, version).to_dict()
        except SplitKDError as exc:
            raise _http_error(exc) from exc

    @app.get("/v1/models/{name}/versions/{version}/model.onnx")
    def model_file(
        name: str = NAME, version: int = VERSION, device: str | None = caller
    ) -> FileResponse:
        require_model(service, device, name, version)
        try:
            record = service.registry.get(name, version)
            path = service.registry.path(name, version)
        except SplitKDError as exc:
            raise _http_error(exc) from exc
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=f"{name}-v{version}.onnx",
            headers={"X-Model-SHA256": record.sha256},
        )

    @app.get("/v1/sessions")
    def list_sessions(device: str | None = caller) -> dict[str, Any]:
        return {
            "sessions": [
                {
                    # A prefix only: the full id is the session's bearer secret.
                    "session": s.session_id[:8],
                    "device_id": s.device_id,
                    "steps": s.next_step,
                    "student_cut": s.student_cut,
                    "teacher_cut": s.teacher_cut,
                    "model_name": s.model_name,
                    "finished_version": s.finished_version,
                    "device_profile": s.device_profile,
                    "link_profile": s.link_profile,
                    "wire_codec": s.hyper.wire_codec,
                    "teacher_cache": None
                    if s.cache is None
                    else {
                        "capacity": s.cache.capacity,
                        "samples": s.cache.samples,
                        "bytes": s.cache.nbytes,
                    },
                }
                for s in service.sessions.all()
                if device is None or s.device_id == device
            ]
        }

    _cohort_routes(app, fleet, caller)
    return app


COHORT = Path(pattern=names.COHORT_NAME_PATTERN, description="cohort name")


def _cohort_routes(app: FastAPI, fleet: Any, caller: Any) -> None:
    """``/v1/cohorts``: members, rounds and figures of each cohort (a device sees its own)."""

    def visible(name: str, device: str | None) -> bool:
        return fleet is not None and (device is None or fleet.is_member(name, device))

    @app.get("/v1/cohorts")
    def list_cohorts(device: str | None = caller) -> dict[str, Any]:
        cohorts = [] if fleet is None else fleet.cohorts()
        return {"cohorts": [c for c in cohorts if visible(str(c["name"]), device)]}

    @app.get("/v1/cohorts/{name}")
    def cohort_detail(name: str = COHORT, device: str | None = caller) -> dict[str, Any]:
        if not visible(name, device):
            raise HTTPException(status_code=404, detail="no such cohort")
        try:
            detail: dict[str, Any] = fleet.describe(name)
        except SplitKDError as exc:
            raise _http_error(exc) from exc
        return detail
