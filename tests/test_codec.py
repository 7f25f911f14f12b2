import numpy as np
import pytest

from splitkd import codec
from splitkd.errors import InvalidArgument, ResourceExhausted
from splitkd.v1 import splitkd_pb2 as pb


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int32", "uint8", "int8"])
def test_round_trip_keeps_values_dtype_and_shape(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    decoded = codec.decode(codec.encode(array))
    assert decoded.dtype == array.dtype
    assert decoded.shape == (2, 3, 4)
    np.testing.assert_array_equal(decoded, array)


def test_tensor_bytes_are_exactly_the_raw_bytes() -> None:
    array = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32)
    message = codec.encode(array)
    assert message.data == array.tobytes()
    # bytes + dtype + shape: the framing costs a handful of bytes, not a per-float tag.
    assert message.ByteSize() - array.nbytes < 32


def test_encode_casts_to_wire_dtype() -> None:
    message = codec.encode(np.ones((2, 2), np.float32), pb.DTYPE_FLOAT16)
    assert message.dtype == pb.DTYPE_FLOAT16
    assert len(message.data) == 8


def test_unsupported_dtype_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="cannot be sent"):
        codec.encode(np.ones(3, np.complex64))
    with pytest.raises(InvalidArgument, match="not a supported dtype"):
        codec.decode(pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4))
    with pytest.raises(InvalidArgument, match="not a supported dtype"):
        codec.decode(pb.Tensor(dtype=99, shape=[1], data=b"\0" * 4))


def test_dtype_not_allowed_here() -> None:
    message = codec.encode(np.ones(3, np.int64))
    with pytest.raises(InvalidArgument, match="not allowed here"):
        codec.decode(message, dtypes=(pb.DTYPE_FLOAT32,))


def test_byte_length_must_match_shape() -> None:
    message = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(InvalidArgument, match="20 bytes do not match"):
        codec.decode(message)


def test_shape_must_match_expected_with_free_batch() -> None:
    message = codec.encode(np.zeros((5, 4), np.float32))
    assert codec.decode(message, shape=(None, 4)).shape == (5, 4)
    with pytest.raises(InvalidArgument, match="does not match the expected"):
        codec.decode(message, shape=(None, 3))
    with pytest.raises(InvalidArgument, match="does not match the expected"):
        codec.decode(message, shape=(None, 4, 1))


def test_negative_and_huge_dimensions_are_refused_before_allocating() -> None:
    with pytest.raises(InvalidArgument, match="negative"):
        codec.decode(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1, 4], data=b""))
    with pytest.raises(ResourceExhausted, match="above the limit"):
        codec.decode(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1 << 40, 1 << 40], data=b""))
    with pytest.raises(InvalidArgument, match="rank"):
        codec.decode(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 9, data=b"\0" * 4))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_when_asked(bad: float) -> None:
    array = np.ones((2, 2), np.float32)
    array[1, 1] = bad
    message = codec.encode(array)
    assert codec.decode(message).shape == (2, 2)
    with pytest.raises(InvalidArgument, match="NaN or Inf"):
        codec.decode(message, finite=True)


def test_named_weights_round_trip_and_exact_names() -> None:
    state = {"a.weight": np.ones((2, 3), np.float32), "a.bias": np.zeros(2, np.float32)}
    message = codec.encode_weights(state)
    decoded = codec.decode_weights(message, expected={"a.weight": (2, 3), "a.bias": (2,)})
    np.testing.assert_array_equal(decoded["a.weight"], state["a.weight"])
    with pytest.raises(InvalidArgument, match="missing tensors"):
        codec.decode_weights(message, expected={"a.weight": (2, 3), "a.bias": (2,), "b": (1,)})
    with pytest.raises(InvalidArgument, match="does not match"):
        codec.decode_weights(message, expected={"a.weight": (3, 2), "a.bias": (2,)})
    twice = pb.ModelWeights(tensors=[*list(message.tensors), message.tensors[0]])
    with pytest.raises(InvalidArgument, match="appears twice"):
        codec.decode_weights(twice)
