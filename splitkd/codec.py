"""Wire codec: numpy arrays <-> ``splitkd.v1.Tensor`` (bytes + dtype + shape).

Decoding validates everything a peer could get wrong or lie about (dtype,
shape, byte length, element count, NaN/Inf) before a single byte is
interpreted, and never unpickles. numpy only: no torch here, so an
inference-only edge can use it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod

import numpy as np

from splitkd.errors import InvalidArgument, ResourceExhausted
from splitkd.v1 import splitkd_pb2 as pb

_TO_NUMPY: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_INT8: np.dtype("i1"),
}
_FROM_NUMPY: dict[str, int] = {dt.str.lstrip("<|"): code for code, dt in _TO_NUMPY.items()}

# 64 Mi elements (256 MiB as float32) is far above any activation we send; a
# larger claim is a bug or an attack, refused before allocating anything.
DEFAULT_MAX_ELEMENTS = 64 * 1024 * 1024
MAX_RANK = 8


def dtype_name(code: int) -> str:
    if code not in pb.DType.values():
        return f"unknown dtype {code}"
    return str(pb.DType.Name(pb.DType.ValueType(code)))


def encode(array: np.ndarray, dtype: int | None = None) -> pb.Tensor:
    """Encode ``array`` (optionally cast to wire ``dtype``) as a Tensor message."""
    if dtype is not None:
        array = array.astype(_TO_NUMPY[dtype], copy=False)
    key = array.dtype.str.lstrip("<|=")
    if key not in _FROM_NUMPY:
        raise InvalidArgument(
            f"dtype {array.dtype} cannot be sent; use float32, float16 or an int type"
        )
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return pb.Tensor(
        dtype=pb.DType.ValueType(_FROM_NUMPY[key]), shape=list(array.shape), data=array.tobytes()
    )


def decode(
    tensor: pb.Tensor,
    *,
    what: str = "tensor",
    dtypes: Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    finite: bool = False,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """Decode and validate a Tensor message; raise with a message naming ``what``.

    ``shape`` may use ``None`` for a free dimension (the batch). The result is a
    read-only view on the message bytes when possible (no copy).
    """
    if tensor.dtype not in _TO_NUMPY:
        raise InvalidArgument(f"{what}: {dtype_name(tensor.dtype)} is not a supported dtype")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise InvalidArgument(
            f"{what}: dtype {dtype_name(tensor.dtype)} is not allowed here (expected {allowed})"
        )
    dims = list(tensor.shape)
    if len(dims) > MAX_RANK:
        raise InvalidArgument(f"{what}: rank {len(dims)} is above the limit of {MAX_RANK}")
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"{what}: shape {dims} has a negative dimension")
    # Python ints do not overflow, so a forged shape cannot wrap around here.
    count = prod(dims)
    # A zero dimension makes the count 0, but numpy still refuses (ValueError) a
    # shape whose other dimensions multiply past its size limit: count those too.
    claimed = prod(d for d in dims if d)
    if claimed > max_elements:
        raise ResourceExhausted(f"{what}: {claimed} elements is above the limit of {max_elements}")
    if shape is not None and (
        len(dims) != len(shape)
        or any(e is not None and e != d for d, e in zip(dims, shape, strict=False))
    ):
        expected = ["B" if e is None else e for e in shape]
        raise InvalidArgument(f"{what}: shape {dims} does not match the expected {expected}")
    np_dtype = _TO_NUMPY[tensor.dtype]
    if len(tensor.data) != count * np_dtype.itemsize:
        raise InvalidArgument(
            f"{what}: {len(tensor.data)} bytes do not match shape {dims} of {dtype_name(tensor.dtype)} "
            f"({count * np_dtype.itemsize} bytes expected)"
        )
    array = np.frombuffer(tensor.data, dtype=np_dtype).reshape(dims)
    if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidArgument(f"{what}: contains NaN or Inf")
    return array


def encode_weights(state: Mapping[str, np.ndarray]) -> pb.ModelWeights:
    return pb.ModelWeights(
        tensors=[pb.NamedTensor(name=k, tensor=encode(v)) for k, v in state.items()]
    )


def decode_weights(
    weights: pb.ModelWeights,
    *,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    what: str = "weights",
) -> dict[str, np.ndarray]:
    """Decode named tensors; with ``expected``, require exactly those names and shapes."""
    out: dict[str, np.ndarray] = {}
    for named in weights.tensors:
        if named.name in out:
            raise InvalidArgument(f"{what}: tensor {named.name!r} appears twice")
        shape = None if expected is None or named.name not in expected else expected[named.name]
        out[named.name] = decode(
            named.tensor, what=f"{what}[{named.name!r}]", shape=shape, finite=True
        )
    if expected is not None:
        missing = sorted(set(expected) - set(out))
        extra = sorted(set(out) - set(expected))
        if missing or extra:
            raise InvalidArgument(f"{what}: missing tensors {missing}, unexpected tensors {extra}")
    return out
