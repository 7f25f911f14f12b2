"""The edge's inference API (FastAPI) over the current local student.

The model is reloaded when ``CURRENT.json`` changes, so a newly trained or
pulled version is served without a restart. No torch. ``/v1/generate`` streams
a language-model student's continuation of a prompt. ``/v1/predict`` takes
at most a body sized for a full batch of the model's inputs and, with a
token, only requests that carry it (edge_agent/http_guard.py); ``/healthz``
and ``/metrics`` stay open (docs/SECURITY.md).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from edge_agent.errors import EdgeError
from edge_agent.feedback import FeedbackStore
from edge_agent.feedback_api import FEEDBACK_PATH, add_feedback_routes
from edge_agent.generate import Generator, is_language_model
from edge_agent.http_guard import PredictGuard
from edge_agent.inference import MAX_BATCH, Predictor
from edge_agent.metrics import EdgeMetrics
from edge_agent.model_store import LocalModel, ModelStore
from splitkd import __version__
from splitkd.errors import InvalidArgument
from splitkd.telemetry import exposition

# JSON spends at most ~25 characters on a float32 ("-1.2345678e-05, " with spaces):
# 32 bytes per value leaves room for pretty-printing without room for abuse.
JSON_BYTES_PER_VALUE = 32
# Without a model every request is refused anyway; this bounds what it may send.
MIN_BODY_BYTES = 64 * 1024
# A prompt is at most a context of bytes (a few hundred); JSON escapes at most 6x that.
GENERATE_BODY_BYTES = 64 * 1024


def default_body_limit(input_shape: tuple[int, ...] | None) -> int:
    """A full batch of the model's inputs as JSON, and not much more."""
    if input_shape is None:
        return MIN_BODY_BYTES
    return max(MIN_BODY_BYTES, math.prod(input_shape) * MAX_BATCH * JSON_BYTES_PER_VALUE)


class PredictRequest(BaseModel):
    inputs: list[Any] = Field(
        ...,
        min_length=1,
        max_length=MAX_BATCH,
        description="one sample (nested lists of the model's input shape) or a list of samples",
    )


class ServedModel:
    """The current model and what runs it (a classifier's predictor or a language model's
    generator), swapped atomically when a new one lands."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._mtime = -1.0
        self._model: LocalModel | None = None
        self._runner: Predictor | Generator | None = None

    def _current(self) -> tuple[LocalModel, Predictor | Generator]:
        mtime = self.store.pointer_mtime()
        with self._lock:
            if mtime != self._mtime or self._model is None or self._runner is None:
                model = self.store.current()
                shape = tuple(int(d) for d in model.metadata["input_shape"])
                self._runner = (
                    Generator(model.path)
                    if is_language_model(model.path)
                    else Predictor(model.path, shape)
                )
                self._model, self._mtime = model, mtime
            return self._model, self._runner

    def model(self) -> LocalModel:
        return self._current()[0]

    def get(self) -> tuple[LocalModel, Predictor]:
        model, runner = self._current()
        if not isinstance(runner, Predictor):
            raise EdgeError(f"{model.name} v{model.version} is a language model: POST /v1/generate")
        return model, runner

    def generator(self) -> Generator:
        model, runner = self._current()
        if not isinstance(runner, Generator):
            raise EdgeError(f"{model.name} v{model.version} is a classifier: POST /v1/predict")
        return runner


def create_app(
    store: ModelStore,
    metrics: EdgeMetrics | None = None,
    *,
    token: str | None = None,
    max_body_bytes: int = 0,
    feedback: FeedbackStore | None = None,
) -> FastAPI:
    """``token``: required as a bearer token on /v1/predict; ``max_body_bytes``: 0 sizes the
    limit from the served model (``default_body_limit``)."""
    app = FastAPI(title="splitkd edge", version=__version__)
    served = ServedModel(store)
    metrics = metrics or EdgeMetrics(training=False)
    app.state.served = served
    app.state.metrics = metrics

    def body_limit() -> int:
        if max_body_bytes > 0:
            return max_body_bytes
        try:
            model = served.model()
        except EdgeError:
            return default_body_limit(None)
        return default_body_limit(tuple(model.metadata["input_shape"]))

    app.add_middleware(PredictGuard, path="/v1/predict", token=token, limit=body_limit)
    if feedback is not None:  # DiReDi: users' corrections, kept on the device
        app.add_middleware(PredictGuard, path=FEEDBACK_PATH, token=token, limit=body_limit)
        add_feedback_routes(app, served, feedback, metrics.registry)
    app.add_middleware(
        PredictGuard, path="/v1/generate", token=token, limit=lambda: GENERATE_BODY_BYTES
    )

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

    @app.get("/healthz", response_model=None)
    def healthz() -> dict[str, Any] | JSONResponse:
        try:
            model = served.model()
        except EdgeError as exc:
            # 503, not 200: a load balancer or a container check must not route here.
            status = "model-unusable" if store.pointer_mtime() else "no-model"
            return JSONResponse(status_code=503, content={"status": status, "detail": str(exc)})
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
        check_nesting(request.inputs, predictor.input_shape)
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

    @app.post("/v1/generate", response_model=None)
    def generate(request: GenerateRequest) -> StreamingResponse:
        """The continuation of ``prompt`` as plain UTF-8 text, streamed as it is decoded."""
        try:
            generator = served.generator()
        except EdgeError as exc:
            raise HTTPException(status_code=503, detail=str(exc)) from exc
        try:
            generator.check(request.prompt, request.max_tokens)  # 400 before any byte is sent
        except InvalidArgument as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        pieces = generator.text(
            request.prompt, request.max_tokens, request.temperature, request.seed
        )
        return StreamingResponse(pieces, media_type="text/plain; charset=utf-8")

    return app


class GenerateRequest(BaseModel):
    prompt: str = Field(max_length=GENERATE_BODY_BYTES)
    max_tokens: int = 128
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)


def check_nesting(inputs: list[Any], input_shape: tuple[int, ...]) -> None:
    """Count the values level by level before numpy builds anything (HTTPException if refused).

    One sample of ``input_shape`` or a batch of them: at most one level deeper than
    the shape, rectangular, at most MAX_BATCH samples' worth of numbers.
    """
    limit = MAX_BATCH * math.prod(input_shape)
    level: list[Any] = [inputs]
    for _depth in range(len(input_shape) + 2):
        lists = [node for node in level if isinstance(node, list)]
        if not lists:
            return  # the leaves: numpy checks that they are numbers
        if len(lists) != len(level) or len({len(node) for node in lists}) != 1:
            raise HTTPException(
                status_code=400, detail="inputs must be a numeric array (rows of unequal length)"
            )
        count = len(level) * len(lists[0])
        if count > limit:
            raise HTTPException(
                status_code=413,
                detail=f"inputs hold more than {limit} values ({MAX_BATCH} samples of "
                f"{list(input_shape)})",
            )
        level = [child for node in lists for child in node]
    raise HTTPException(
        status_code=400,
        detail=f"inputs are nested deeper than a batch [N, {', '.join(map(str, input_shape))}]"
        " and do not fit the model",
    )
