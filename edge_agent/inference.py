"""ONNX inference with onnxruntime alone: no torch on the device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_agent.errors import EdgeError
from splitkd.errors import InvalidArgument

MAX_BATCH = 1024


@dataclass(frozen=True)
class Prediction:
    classes: np.ndarray  # int64 [N]
    probabilities: np.ndarray  # float32 [N, K]


def open_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime session on ``path``, or one line saying the file is unusable."""
    options = ort.SessionOptions()
    # One thread per request keeps latency predictable on a 4-core Pi that
    # also runs other services; raise it for throughput.
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors share no base class but Exception
        raise EdgeError(f"{path} cannot be loaded ({exc}); pull the model again") from None


class Predictor:
    def __init__(self, path: Path, input_shape: tuple[int, ...], threads: int = 1) -> None:
        self.session = open_session(path, threads)
        if len(self.session.get_inputs()) != 1:  # a language model's decoder (lm_export.py)
            raise EdgeError(
                f"{path} is a language model: it generates text (splitkd-edge generate, "
                "POST /v1/generate), it does not classify"
            )
        model_input = self.session.get_inputs()[0]
        declared = tuple(model_input.shape[1:])
        if all(isinstance(d, int) for d in declared) and declared != tuple(input_shape):
            raise EdgeError(
                f"{path} takes inputs of shape {list(declared)}, its metadata says "
                f"{list(input_shape)}; pull the model again"
            )
        self.input_name = model_input.name
        self.input_shape = input_shape

    def predict(self, inputs: np.ndarray) -> Prediction:
        """``inputs`` is one sample of ``input_shape`` or a batch of them."""
        x = np.asarray(inputs, dtype=np.float32)
        if x.shape == self.input_shape:
            x = x[None]
        if x.shape[1:] != self.input_shape:
            raise InvalidArgument(
                f"inputs of shape {list(x.shape)} do not fit the model: send one sample of shape "
                f"{list(self.input_shape)} or a batch [N, {', '.join(map(str, self.input_shape))}]"
            )
        if not 1 <= x.shape[0] <= MAX_BATCH:
            raise InvalidArgument(f"batch of {x.shape[0]} samples is outside 1..{MAX_BATCH}")
        if not np.isfinite(x).all():
            raise InvalidArgument("inputs contain NaN or Inf")
        (logits,) = self.session.run(None, {self.input_name: x})
        logits = np.asarray(logits, dtype=np.float32)
        if not np.isfinite(logits).all():
            raise InvalidArgument(
                "inputs overflow the model (non-finite outputs); scale them as in training"
            )
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        return Prediction(logits.argmax(axis=1), probabilities)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """Share of ``x`` predicted as ``y``."""
        return float((self.classes(x) == y).mean()) if len(y) else 0.0

    def classes(self, x: np.ndarray, batch: int = MAX_BATCH) -> np.ndarray:
        """The predicted class of every sample of ``x``, in batches of at most ``batch``."""
        parts = [
            self.predict(x[start : start + batch]).classes for start in range(0, len(x), batch)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
