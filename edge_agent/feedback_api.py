"""``POST /v1/feedback`` and ``GET /v1/feedback/stats`` on the edge's HTTP API.

A correction is one sample (or a batch) of the served model's input shape and
the right label(s). Wrong shape or an unknown label: 422 and nothing stored; a
full store: 507 and it keeps what it has. The records never leave the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from prometheus_client import Counter
from pydantic import BaseModel, Field

from edge_agent.errors import EdgeError
from edge_agent.feedback import FeedbackStore, StoreFull
from edge_agent.inference import MAX_BATCH

FEEDBACK_PATH = "/v1/feedback"


class FeedbackRequest(BaseModel):
    inputs: list[Any] = Field(
        ..., min_length=1, max_length=MAX_BATCH, description="one sample or a batch of samples"
    )
    label: int | None = Field(None, description="the right label of one sample")
    labels: list[int] | None = Field(
        None, max_length=MAX_BATCH, description="the right label of each sample of a batch"
    )


def _refuse(detail: str) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


def _checked(request: FeedbackRequest, shape: tuple[int, ...], classes: int) -> tuple[Any, Any]:
    """The corrections as arrays, or 422 naming what is wrong."""
    try:
        with np.errstate(over="ignore"):
            x = np.asarray(request.inputs, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise _refuse("inputs must be a numeric array") from None
    if x.shape == shape:
        x = x[None]
    if x.shape[1:] != shape or not 1 <= len(x) <= MAX_BATCH:
        raise _refuse(
            f"inputs of shape {list(x.shape)} do not fit the model: one sample of shape "
            f"{list(shape)} or a batch [N, {', '.join(map(str, shape))}]"
        )
    if not np.isfinite(x).all():
        raise _refuse("inputs contain NaN or Inf")
    if (request.label is None) == (request.labels is None):
        raise _refuse("give 'label' (one sample) or 'labels' (one per sample)")
    labels = [request.label] if request.label is not None else list(request.labels or [])
    if len(labels) != len(x):
        raise _refuse(f"{len(labels)} labels for {len(x)} samples")
    unknown = [label for label in labels if not 0 <= label < classes]
    if unknown:
        raise _refuse(f"unknown label {unknown[0]}: the model knows labels 0..{classes - 1}")
    return x, np.asarray(labels, dtype=np.int64)


def add_feedback_routes(app: FastAPI, served: Any, store: FeedbackStore, registry: Any) -> None:
    """Mount the feedback routes; ``served`` is the app's ServedModel (its shape and labels)."""
    records = Counter(
        "splitkd_edge_feedback_records",
        "User corrections stored in the device's feedback store",
        registry=registry,
    )

    @app.post(FEEDBACK_PATH, status_code=201)
    def feedback(request: FeedbackRequest) -> dict[str, Any]:
        try:
            model, predictor = served.get()
        except EdgeError as exc:
            raise HTTPException(status_code=503, detail=str(exc)) from exc
        classes = int(model.metadata.get("num_classes", 0))
        if classes < 1:
            raise HTTPException(
                status_code=503, detail="the served model does not state its labels"
            )
        x, y = _checked(request, tuple(predictor.input_shape), classes)
        try:
            total = store.add(x, y)
        except StoreFull as exc:
            raise HTTPException(status_code=507, detail=str(exc)) from exc
        records.inc(len(y))
        return {"stored": len(y), "records": total, "max_records": store.max_records}

    @app.get(FEEDBACK_PATH + "/stats")
    def feedback_stats() -> dict[str, Any]:
        stats = store.stats()
        return {
            "records": stats.records,
            "max_records": stats.max_records,
            "per_label": {str(k): v for k, v in sorted(stats.per_label.items())},
            "oldest": stats.oldest,
            "newest": stats.newest,
        }
