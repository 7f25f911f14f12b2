"""Wire codecs: how a session's activations and gradients are packed.

Each codec is a small object behind one interface (``WireCodec``): ``encode``
turns a float array into an ``Encoded`` value (numpy arrays only, no protobuf),
``decode`` turns one back. ``splitkd.codec`` maps ``Encoded`` to and from the
``splitkd.v1.Tensor`` message and validates every field a peer sends.

- ``float32`` / ``float16``: dense, the array cast to that dtype.
- ``int8`` / ``int8-stochastic``: per-channel affine int8 (channel = dimension
  1), nearest or stochastic rounding: 1 byte per element plus 5 per channel.
- ``topk``: the ``ratio`` largest magnitudes as float16 with their int32
  positions; what is left out is added back to the same sample's tensor the
  next time it is sent (error feedback, keyed by the sample ids the step
  carries), so nothing is lost for good, only delayed.

A codec instance belongs to one session and one direction (its error-feedback
memory and its random stream are that stream's own).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from splitkd.errors import InvalidArgument

Encoding = Literal["dense", "affine_int8", "sparse"]
CODECS = ("float32", "float16", "int8", "int8-stochastic", "topk")
DEFAULT_TOPK_RATIO = 0.25


@dataclass(frozen=True)
class Encoded:
    """A tensor as a codec packed it: the dense ``shape`` and the parts that travel."""

    shape: tuple[int, ...]
    values: np.ndarray  # dense: every element; affine: int8 per element; sparse: k values
    encoding: Encoding = "dense"
    scale: np.ndarray | None = None  # affine: float32 per channel
    zero_point: np.ndarray | None = None  # affine: int8 per channel
    indices: np.ndarray | None = None  # sparse: int32 flat positions, increasing


def channels(shape: tuple[int, ...]) -> int:
    """Channels of per-channel scales: dimension 1, or one for a vector."""
    return shape[1] if len(shape) >= 2 else 1


class WireCodec(ABC):
    name: str

    @abstractmethod
    def encode(self, array: np.ndarray, keys: np.ndarray | None = None) -> Encoded:
        """Pack ``array`` ([B, ...]); ``keys`` are the batch's sample ids, when known."""

    def decode(self, encoded: Encoded) -> np.ndarray:
        """The float32 array ``encoded`` stands for (its fields already validated)."""
        return to_dense(encoded)

    def check(self, encoded: Encoded, what: str) -> None:
        """Refuse a tensor packed by another codec than this session's."""
        if encoded.encoding != self.encoding or encoded.values.dtype != self.dtype:
            raise InvalidArgument(
                f"{what}: packed as {describe(encoded)}, but this session negotiated the "
                f"{self.name!r} codec ({self.encoding}, {self.dtype})"
            )

    encoding: Encoding = "dense"
    dtype: np.dtype = np.dtype("<f4")

    def reset(self) -> None:  # noqa: B027 - most codecs keep no state
        """Forget stream state (error feedback) after a rollback."""


def describe(encoded: Encoded) -> str:
    return f"{encoded.encoding}, {encoded.values.dtype}"


def to_dense(encoded: Encoded) -> np.ndarray:
    if encoded.encoding == "dense":
        return np.array(encoded.values, dtype=np.float32).reshape(encoded.shape)
    if encoded.encoding == "affine_int8":
        assert encoded.scale is not None and encoded.zero_point is not None
        q = encoded.values.reshape(_channel_view(encoded.shape)).astype(np.float32)
        scale = encoded.scale.astype(np.float32).reshape(1, -1, 1)
        zero = encoded.zero_point.astype(np.float32).reshape(1, -1, 1)
        return (scale * (q - zero)).reshape(encoded.shape)
    assert encoded.indices is not None
    dense = np.zeros(int(np.prod(encoded.shape)), dtype=np.float32)
    dense[encoded.indices] = encoded.values
    return dense.reshape(encoded.shape)


def _channel_view(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``shape`` as [before channels, channels, after] for per-channel arithmetic."""
    if len(shape) < 2:
        return (1, 1, int(np.prod(shape)))
    return (shape[0], shape[1], int(np.prod(shape[2:])))


class Dense(WireCodec):
    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        self.dtype = np.dtype(dtype)

    def encode(self, array: np.ndarray, keys: np.ndarray | None = None) -> Encoded:
        return Encoded(tuple(array.shape), np.ascontiguousarray(array, dtype=self.dtype))


class AffineInt8(WireCodec):
    """Per-channel affine int8; each channel's range maps onto the 256 levels."""

    encoding: Encoding = "affine_int8"
    dtype = np.dtype("i1")

    def __init__(self, name: str, *, stochastic: bool, seed: int = 0) -> None:
        self.name = name
        self.stochastic = stochastic
        self.rng = np.random.default_rng(seed)

    def encode(self, array: np.ndarray, keys: np.ndarray | None = None) -> Encoded:
        x = np.asarray(array, dtype=np.float32).reshape(_channel_view(array.shape))
        low = np.minimum(x.min(axis=(0, 2)), 0.0)
        high = np.maximum(x.max(axis=(0, 2)), 0.0)
        # An all-zero channel still gets a positive scale (the decoder refuses 0).
        scale = np.maximum((high - low) / 255.0, np.float32(1e-12)).astype(np.float32)
        zero = np.clip(np.round(-128.0 - low / scale), -128, 127).astype(np.int8)
        scaled = x / scale.reshape(1, -1, 1) + zero.reshape(1, -1, 1).astype(np.float32)
        if self.stochastic:
            scaled = np.floor(scaled + self.rng.random(scaled.shape, dtype=np.float32))
        else:
            scaled = np.round(scaled)
        q = np.clip(scaled, -128, 127).astype(np.int8)
        return Encoded(tuple(array.shape), q.reshape(-1), "affine_int8", scale, zero)


class TopK(WireCodec):
    """The largest magnitudes per sample, float16, with error feedback per sample id."""

    encoding: Encoding = "sparse"
    dtype = np.dtype("<f2")

    def __init__(self, name: str, *, ratio: float) -> None:
        if not 0.0 < ratio <= 1.0:
            raise InvalidArgument(f"topk ratio must be in (0, 1], got {ratio}")
        self.name = name
        self.ratio = ratio
        self.residual: dict[int, np.ndarray] = {}

    def encode(self, array: np.ndarray, keys: np.ndarray | None = None) -> Encoded:
        x = np.array(array, dtype=np.float32).reshape(array.shape[0], -1)
        if keys is not None:
            for row, key in enumerate(keys.tolist()):
                carried = self.residual.get(key)
                if carried is not None and carried.shape == x[row].shape:
                    x[row] += carried
        per_row = max(1, round(self.ratio * x.shape[1]))
        top = np.argpartition(-np.abs(x), per_row - 1, axis=1)[:, :per_row]
        top.sort(axis=1)
        flat = (top + np.arange(x.shape[0])[:, None] * x.shape[1]).reshape(-1)
        values = x.reshape(-1)[flat].astype(np.float16)
        if keys is not None:
            sent = np.zeros_like(x).reshape(-1)
            sent[flat] = values.astype(np.float32)
            left = x - sent.reshape(x.shape)
            for row, key in enumerate(keys.tolist()):
                self.residual[key] = left[row]
        return Encoded(tuple(array.shape), values, "sparse", indices=flat.astype(np.int32))

    def reset(self) -> None:
        self.residual.clear()


_FACTORIES: dict[str, Callable[[int, float], WireCodec]] = {
    "float32": lambda seed, ratio: Dense("float32", "<f4"),
    "float16": lambda seed, ratio: Dense("float16", "<f2"),
    "int8": lambda seed, ratio: AffineInt8("int8", stochastic=False),
    "int8-stochastic": lambda seed, ratio: AffineInt8(
        "int8-stochastic", stochastic=True, seed=seed
    ),
    "topk": lambda seed, ratio: TopK("topk", ratio=ratio),
}


def make(name: str, *, seed: int = 0, topk_ratio: float = DEFAULT_TOPK_RATIO) -> WireCodec:
    """A fresh codec (one per session and direction)."""
    return _FACTORIES[check_name(name)](seed, topk_ratio)


def check_name(name: str) -> str:
    if name not in _FACTORIES:
        raise InvalidArgument(f"unknown wire codec {name!r}; use one of {', '.join(CODECS)}")
    return name


def evaluation_codec(name: str) -> str:
    """Evaluation sends every sample once per call: no error feedback to spread the
    loss of ``topk`` over later steps, so evaluation packs with float16 instead."""
    return "float16" if name == "topk" else name
