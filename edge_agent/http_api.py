"""The edge's inference API (FastAPI) over the current local student.

The model is reloaded when ``CURRENT.json`` changes, so a newly trained or
pulled version is served without a restart. No torch.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from edge_agent.errors import EdgeError
from edge_agent.inference import MAX_BATCH, Predictor
from edge_agent.metrics import EdgeMetrics
from edge_agent.model_store import LocalModel, ModelStore
from splitkd import __version__
from splitkd.errors import InvalidArgument
from splitkd.telemetry import exposition


class PredictRequest(BaseModel):
    inputs: list[Any] = Field(
        ...,
        min_length=1,
        max_length=MAX_BATCH,
        description="one sample (nested lists of the model's input shape) or a list of samples",
    )


class ServedModel:
    """The current model and its predictor, swapped atomically when a new one lands."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._mtime = -1.0
        self._model: LocalModel | None = None
        self._predictor: Predictor | None = None

    def get(self) -> tuple[LocalModel, Predictor]:
        mtime = self.store.pointer_mtime()
        with self._lock:
            if mtime != self._mtime or self._model is None or self._predictor is None:
                model = self.store.current()
                shape = tuple(int(d) for d in model.metadata["input_shape"])
                self._predictor = Predictor(model.path, shape)
                self._model, self._mtime = model, mtime
            return self._model, self._predictor


def create_app(store: ModelStore, metrics: EdgeMetrics | None = None) -> FastAPI:
    app = FastAPI(title="splitkd edge", version=__version__)
    served = ServedModel(store)
    metrics = metrics or EdgeMetrics(training=False)
    app.state.served = served
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI echoes the refused input back, and a body holding NaN or
        # Infinity cannot be written as JSON (that answered 500): leave it out.
        errors = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        body, content_type = exposition(metrics.registry)
        return Response(content=body, media_type=content_type)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        try:
            model, _ = served.get()
        except EdgeError as exc:
            return {"status": "no-model", "detail": str(exc)}
        return {"status": "ok", "model": {"name": model.name, "version": model.version}}

    @app.post("/v1/predict")
    def predict(request: PredictRequest) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            answer = _predict(request)
        except HTTPException:
            metrics.observe_inference(None)
            raise
        metrics.observe_inference(time.perf_counter() - started)
        return answer

    def _predict(request: PredictRequest) -> dict[str, Any]:
        try:
            model, predictor = served.get()
        except EdgeError as exc:
            raise HTTPException(status_code=503, detail=str(exc)) from exc
        try:
            # Values beyond float32 become inf here and are refused by the predictor.
            with np.errstate(over="ignore"):
                array = np.asarray(request.inputs, dtype=np.float32)
        except (ValueError, TypeError, OverflowError) as exc:  # Overflow: a JSON int like 10**400
            raise HTTPException(
                status_code=400, detail=f"inputs must be a numeric array: {exc}"
            ) from exc
        started = time.perf_counter()
        try:
            result = predictor.predict(array)
        except InvalidArgument as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {
            "model": {"name": model.name, "version": model.version},
            "predictions": [
                {"class": int(c), "probabilities": [round(float(p), 6) for p in probs]}
                for c, probs in zip(result.classes, result.probabilities, strict=True)
            ],
            "seconds": round(time.perf_counter() - started, 6),
        }

    return app
