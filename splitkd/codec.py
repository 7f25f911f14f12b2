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

from splitkd.codecs import Encoded, channels
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
    if tensor.encoding != pb.ENCODING_DENSE or tensor.scale or tensor.zero_point or tensor.indices:
        raise InvalidArgument(f"{what}: must be a dense tensor (no encoding, scale or indices)")
    return _dense(tensor, what, dtypes, shape, finite, max_elements)


def _check_shape(
    tensor: pb.Tensor, what: str, shape: Sequence[int | None] | None, max_elements: int
) -> list[int]:
    """The (dense) shape a tensor claims: rank, signs, element limit and ``shape``."""
    dims = list(tensor.shape)
    if len(dims) > MAX_RANK:
        raise InvalidArgument(f"{what}: rank {len(dims)} is above the limit of {MAX_RANK}")
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"{what}: shape {dims} has a negative dimension")
    # Python ints do not overflow, so a forged shape cannot wrap around here.
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
    return dims


def _dense(
    tensor: pb.Tensor,
    what: str,
    dtypes: Sequence[int] | None,
    shape: Sequence[int | None] | None,
    finite: bool,
    max_elements: int,
) -> np.ndarray:
    if tensor.dtype not in _TO_NUMPY:
        raise InvalidArgument(f"{what}: {dtype_name(tensor.dtype)} is not a supported dtype")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise InvalidArgument(
            f"{what}: dtype {dtype_name(tensor.dtype)} is not allowed here (expected {allowed})"
        )
    dims = _check_shape(tensor, what, shape, max_elements)
    count = prod(dims)
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


def pack(encoded: Encoded) -> pb.Tensor:
    """An ``Encoded`` (a wire codec's output) as a Tensor message."""
    if encoded.encoding == "dense":
        return encode(encoded.values)
    message = encode(encoded.values)
    del message.shape[:]
    message.shape.extend(encoded.shape)
    if encoded.encoding == "affine_int8":
        assert encoded.scale is not None and encoded.zero_point is not None
        message.encoding = pb.ENCODING_AFFINE_INT8
        message.scale = encoded.scale.astype("<f4").tobytes()
        message.zero_point = encoded.zero_point.astype("i1").tobytes()
    else:
        assert encoded.indices is not None
        message.encoding = pb.ENCODING_SPARSE
        message.indices = encoded.indices.astype("<i4").tobytes()
    return message


def unpack(
    tensor: pb.Tensor,
    *,
    what: str,
    shape: Sequence[int | None],
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Encoded:
    """Decode and validate an activation or gradient in any encoding.

    Which encoding the session allows is the codec's check (``WireCodec.check``);
    here every field must be consistent with the dense ``shape`` it claims.
    """
    if tensor.encoding == pb.ENCODING_DENSE:
        if tensor.scale or tensor.zero_point or tensor.indices:
            raise InvalidArgument(f"{what}: a dense tensor carries no scale, zero point or indices")
        values = _dense(tensor, what, _FLOATS, shape, True, max_elements)
        return Encoded(tuple(values.shape), values)
    dims = _check_dims(tensor, what, shape, max_elements)
    if tensor.encoding == pb.ENCODING_AFFINE_INT8:
        return _unpack_affine(tensor, what, dims)
    if tensor.encoding == pb.ENCODING_SPARSE:
        return _unpack_sparse(tensor, what, dims)
    raise InvalidArgument(f"{what}: unknown encoding {tensor.encoding}")


_FLOATS = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16)


def _check_dims(
    tensor: pb.Tensor, what: str, shape: Sequence[int | None], max_elements: int
) -> tuple[int, ...]:
    """The dense shape an encoded tensor claims, checked like a dense one's."""
    dims = tuple(_check_shape(tensor, what, shape, max_elements))
    if prod(dims) == 0:
        raise InvalidArgument(f"{what}: an encoded tensor must have at least one element")
    return dims


def _unpack_affine(tensor: pb.Tensor, what: str, dims: tuple[int, ...]) -> Encoded:
    if tensor.indices:
        raise InvalidArgument(f"{what}: an int8 tensor carries no indices")
    if tensor.dtype != pb.DTYPE_INT8:
        raise InvalidArgument(
            f"{what}: int8 encoding needs DTYPE_INT8, got {dtype_name(tensor.dtype)}"
        )
    count, chans = prod(dims), channels(dims)
    if len(tensor.data) != count:
        raise InvalidArgument(f"{what}: {len(tensor.data)} bytes of int8 for {count} elements")
    if len(tensor.scale) != 4 * chans or len(tensor.zero_point) != chans:
        raise InvalidArgument(
            f"{what}: int8 encoding needs {chans} float32 scales and {chans} int8 zero points, "
            f"got {len(tensor.scale)} and {len(tensor.zero_point)} bytes"
        )
    scale = np.frombuffer(tensor.scale, dtype="<f4")
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise InvalidArgument(f"{what}: int8 scales must be finite and > 0")
    values = np.frombuffer(tensor.data, dtype="i1")
    zero = np.frombuffer(tensor.zero_point, dtype="i1")
    return Encoded(dims, values, "affine_int8", scale, zero)


def _unpack_sparse(tensor: pb.Tensor, what: str, dims: tuple[int, ...]) -> Encoded:
    if tensor.scale or tensor.zero_point:
        raise InvalidArgument(f"{what}: a sparse tensor carries no scale or zero point")
    if tensor.dtype not in _FLOATS:
        raise InvalidArgument(f"{what}: sparse values must be float16 or float32")
    if len(tensor.indices) % 4:
        raise InvalidArgument(f"{what}: indices are {len(tensor.indices)} bytes, not int32s")
    k, count = len(tensor.indices) // 4, prod(dims)
    if k > count:
        raise InvalidArgument(f"{what}: {k} sparse values for a dense shape of {count} elements")
    itemsize = _TO_NUMPY[tensor.dtype].itemsize
    if len(tensor.data) != k * itemsize:
        raise InvalidArgument(f"{what}: {len(tensor.data)} bytes of values for {k} indices")
    indices = np.frombuffer(tensor.indices, dtype="<i4")
    if k and (indices[0] < 0 or indices[-1] >= count or (np.diff(indices) <= 0).any()):
        raise InvalidArgument(
            f"{what}: sparse indices must be strictly increasing, in 0..{count - 1}"
        )
    values = np.frombuffer(tensor.data, dtype=_TO_NUMPY[tensor.dtype])
    if not np.isfinite(values).all():
        raise InvalidArgument(f"{what}: contains NaN or Inf")
    return Encoded(dims, values, "sparse", indices=indices)


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
