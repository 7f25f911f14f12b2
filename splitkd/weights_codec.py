"""The frugal wire of federated cohorts: a student's weights as int8 deltas.

A federated round moves the class's student down and the device's trained
student up. On the ``int8-delta`` codec neither travels whole: each is the
difference to a version both sides hold, every float32 tensor quantised to int8
per output row (dimension 0; a vector is one row) with stochastic rounding, so
the rounding is unbiased. This is ``splitkd.codecs.AffineInt8`` applied to the
tensor viewed as ``[1, rows, rest]``; on the wire it is an
``ENCODING_AFFINE_INT8`` Tensor with the dense shape and one scale and zero
point per row.

- Versions are named by a **digest** of their bytes (``digest``), so a base
  is either the exact weights the other side holds or refused.
- Downloads: the cloud sends the new student as a delta against what the device
  last received and keeps ``base + decoded delta`` as the device's version;
  both sides compute it with the same float32 numpy arithmetic, so they hold the
  same bits (the device checks the digest the cloud sends). What the rounding
  left out is in the next round's delta (the cloud always diffs against what the
  device holds), so nothing is lost for good.
- Uploads: the device sends ``trained - base`` plus what its previous upload's
  rounding left out (error feedback, kept on the device), against the base it
  trained from.

numpy and protobuf only (no torch): the cloud and an inference-only edge share it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from math import prod

import numpy as np

from splitkd import codec
from splitkd.codecs import AffineInt8, Encoded, to_dense
from splitkd.errors import InvalidArgument
from splitkd.v1 import splitkd_pb2 as pb

Weights = dict[str, np.ndarray]
FLOAT32 = "float32"
INT8_DELTA = "int8-delta"
WEIGHTS_CODECS = (FLOAT32, INT8_DELTA)
# Measured in make compare and make fleet-demo (docs/FLEETS.md, "The wire of federated cohorts").
DEFAULT_WEIGHTS_CODEC = INT8_DELTA
# In the FAILED_PRECONDITION of an update whose base the cloud does not hold:
# the device sends its whole student instead.
BASE_UNKNOWN = "weights-base-unknown"


def check_name(name: str) -> str:
    if name not in WEIGHTS_CODECS:
        raise InvalidArgument(
            f"unknown weights codec {name!r}; use one of {', '.join(WEIGHTS_CODECS)}"
        )
    return name


def digest(weights: Mapping[str, np.ndarray]) -> int:
    """A non-zero 64-bit name for these exact weights (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        value = np.ascontiguousarray(weights[name])
        h.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        h.update(value.tobytes())
    return int.from_bytes(h.digest()[:8], "little") or 1


def deltas_fit(weights: Mapping[str, np.ndarray]) -> bool:
    """Whether a student can travel as int8 deltas (every tensor float32)."""
    return all(np.asarray(v).dtype == np.float32 for v in weights.values())


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) >= 2 else 1


def _row_view(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``shape`` as AffineInt8's [1, channels, rest], the channels being output rows."""
    rows = _rows(shape)
    return (1, rows, prod(shape) // rows if rows else 0)


class DeltaQuantiser:
    """Int8 per output row, stochastic rounding; one per stream (its random stream)."""

    def __init__(self, seed: int = 0) -> None:
        self._int8 = AffineInt8("int8-stochastic", stochastic=True, seed=seed)

    def encode(self, delta: np.ndarray) -> Encoded:
        shape = tuple(delta.shape)
        packed = self._int8.encode(np.asarray(delta, np.float32).reshape(_row_view(shape)))
        return replace(packed, shape=shape)


def decode(encoded: Encoded) -> np.ndarray:
    """The float32 delta an int8 delta stands for (the same bits on every side)."""
    shape = tuple(encoded.shape)
    with np.errstate(over="ignore"):  # a forged scale may overflow: the result is checked
        return to_dense(replace(encoded, shape=_row_view(shape))).reshape(shape)


def apply(base: Mapping[str, np.ndarray], deltas: Mapping[str, np.ndarray]) -> Weights:
    """``base + delta`` per tensor, in float32 (how cloud and device both compute it)."""
    with np.errstate(over="ignore", invalid="ignore"):  # checked by the receiver
        return {k: (np.asarray(base[k], np.float32) + deltas[k]).astype(np.float32) for k in base}


class UploadEncoder:
    """A device's uploads: deltas against the round's base, with error feedback.

    What one upload's rounding left out is added to the next upload's delta, so
    over the rounds the cloud receives what the device trained, only later.
    """

    def __init__(self, seed: int) -> None:
        self.quantiser = DeltaQuantiser(seed)
        self.residual: Weights = {}

    def encode(
        self, trained: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
    ) -> dict[str, Encoded]:
        out: dict[str, Encoded] = {}
        for name, value in trained.items():
            delta = np.asarray(value, np.float32) - base[name]
            carried = self.residual.get(name)
            if carried is not None and carried.shape == delta.shape:
                delta = delta + carried
            packed = self.quantiser.encode(delta)
            self.residual[name] = delta - decode(packed)
            out[name] = packed
        return out

    def reset(self) -> None:
        """The whole student went up instead: nothing is owed."""
        self.residual.clear()


@dataclass(frozen=True)
class Download:
    """What the cloud sends a member in a round: the whole student or a delta."""

    weights: Weights  # whole (base 0) or empty
    deltas: dict[str, Encoded]  # int8 deltas against ``base`` (base != 0) or empty
    base: int
    digest: int  # of the weights the member holds once it applied this


def pack(deltas: Mapping[str, Encoded]) -> pb.ModelWeights:
    return pb.ModelWeights(
        tensors=[pb.NamedTensor(name=k, tensor=codec.pack(v)) for k, v in deltas.items()]
    )


def unpack(
    weights: pb.ModelWeights, expected: Mapping[str, tuple[int, ...]], what: str
) -> dict[str, np.ndarray]:
    """Validate int8 deltas (exactly ``expected``'s names and shapes) and decode them."""
    out: dict[str, np.ndarray] = {}
    for named in weights.tensors:
        label = f"{what}[{named.name!r}]"
        if named.name in out:
            raise InvalidArgument(f"{what}: tensor {named.name!r} appears twice")
        if named.name not in expected:
            raise InvalidArgument(f"{what}: unexpected tensor {named.name!r}")
        out[named.name] = decode(_unpack_one(named.tensor, label, expected[named.name]))
    missing = sorted(set(expected) - set(out))
    if missing:
        raise InvalidArgument(f"{what}: missing tensors {missing}")
    return out


def _unpack_one(tensor: pb.Tensor, what: str, shape: tuple[int, ...]) -> Encoded:
    if tensor.encoding != pb.ENCODING_AFFINE_INT8 or tensor.dtype != pb.DTYPE_INT8:
        raise InvalidArgument(
            f"{what}: a weight delta must be int8 per output row (ENCODING_AFFINE_INT8, "
            f"DTYPE_INT8), got encoding {tensor.encoding} and {codec.dtype_name(tensor.dtype)}"
        )
    if tensor.indices:
        raise InvalidArgument(f"{what}: an int8 delta carries no indices")
    dims = tuple(int(d) for d in tensor.shape)
    if dims != tuple(shape):
        raise InvalidArgument(
            f"{what}: shape {list(dims)} does not match the expected {list(shape)}"
        )
    count, rows = prod(dims), _rows(dims)
    if len(tensor.data) != count:
        raise InvalidArgument(f"{what}: {len(tensor.data)} bytes of int8 for {count} elements")
    if len(tensor.scale) != 4 * rows or len(tensor.zero_point) != rows:
        raise InvalidArgument(
            f"{what}: an int8 delta needs {rows} float32 scales and {rows} int8 zero points, "
            f"got {len(tensor.scale)} and {len(tensor.zero_point)} bytes"
        )
    scale = np.frombuffer(tensor.scale, dtype="<f4")
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise InvalidArgument(f"{what}: int8 delta scales must be finite and > 0")
    values = np.frombuffer(tensor.data, dtype="i1")
    zero = np.frombuffer(tensor.zero_point, dtype="i1")
    return Encoded(dims, values, "affine_int8", scale, zero)
