"""numpy arrays <-> ``bifusion.v1.Tensor`` (raw little-endian bytes with dtype and shape)."""

from __future__ import annotations

import math

import numpy as np

from .encoder_pb2 import EncodeOptions, Tensor

# Tensor dtype name -> little-endian numpy storage; every tensor on the wire uses one of these.
# numpy has no bfloat16: it travels as its 16-bit patterns (see ``bfloat16_to_float32``).
DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "float64", "int64", "int32", "uint16", "uint8", "int8", "bool")
}
DTYPES["bfloat16"] = np.dtype("<u2")
# EncodeOptions.output_dtype -> the features' Tensor dtype.
OUTPUT_DTYPES = {
    EncodeOptions.FLOAT32: "float32",
    EncodeOptions.FLOAT16: "float16",
    EncodeOptions.INT8: "int8",
    EncodeOptions.BFLOAT16: "bfloat16",
}
# Per point of a response besides features: alpha float32, valid bool, point index int64;
# world xyz float32 when asked; a float32 scale with int8 features.
FIXED_BYTES_PER_POINT = 4 + 1 + 8
WORLD_BYTES_PER_POINT = 12
SCALE_BYTES_PER_POINT = 4


def point_bytes(feature_dim: int, output_dtype: str, world: bool) -> int:
    """Tensor bytes per point of an EncodeFrameResponse."""
    per_point = feature_dim * DTYPES[output_dtype].itemsize + FIXED_BYTES_PER_POINT
    per_point += WORLD_BYTES_PER_POINT if world else 0
    return per_point + (SCALE_BYTES_PER_POINT if output_dtype == "int8" else 0)


# In a response message each tensor's data starts a multiple of 16 bytes from the message's
# start. CPython keeps a ``bytes`` object's data 16-byte aligned, so arrays that view a received
# message are aligned for every dtype (numpy does not need it; Arrow and SIMD code do).
MESSAGE_ALIGNMENT = 16
# In shared memory each output tensor (at most 6) starts on a 64-byte boundary.
OUTPUT_ALIGNMENT = 64
MAX_OUTPUT_TENSORS = 6


def shared_output_bytes(num_points: int, feature_dim: int, output_dtype: str, world: bool) -> int:
    """The most bytes a response's tensors take in a shared-memory range, alignment included."""
    return num_points * point_bytes(feature_dim, output_dtype, world) + MAX_OUTPUT_TENSORS * OUTPUT_ALIGNMENT


# No tensor of the protocol has more than 2 dimensions; a few more are allowed for other uses,
# far below numpy's own limit of 64.
MAX_RANK = 8


class FieldError(ValueError):
    """A request or response field is malformed; ``field`` is its proto path (e.g. ``depth.data``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def to_tensor(array: np.ndarray, out: Tensor | None = None) -> Tensor:
    """Fill ``out`` (or a new Tensor) with ``array``; one copy, into the message's bytes."""
    array = np.asarray(array)
    if array.dtype.name not in DTYPES:
        raise TypeError(f"dtype {array.dtype} cannot travel as a Tensor (allowed: {sorted(DTYPES)})")
    out = Tensor() if out is None else out
    out.dtype = array.dtype.name
    out.shape[:] = array.shape
    out.data = np.ascontiguousarray(array, dtype=DTYPES[array.dtype.name]).tobytes()
    return out


def from_tensor(tensor: Tensor, field: str, dtypes: tuple[str, ...] | None = None, data=None) -> np.ndarray:
    """A read-only numpy view of the tensor's bytes (no copy); errors name ``field``.

    ``tensor`` is a ``Tensor`` or a ``raw.TensorView``; ``data`` (e.g. a shared-memory range)
    replaces ``tensor.data``. bfloat16 comes back as its uint16 bit patterns."""
    if tensor.dtype not in DTYPES or (dtypes is not None and tensor.dtype not in dtypes):
        allowed = ", ".join(dtypes or sorted(DTYPES))
        raise FieldError(f"{field}.dtype", f"must be one of {allowed}, got {tensor.dtype!r}")
    dtype = DTYPES[tensor.dtype]
    shape = _checked_shape(tensor, field)
    # Python integers: the product cannot overflow, whatever the declared dimensions.
    data = tensor.data if data is None else data
    check_byte_count(f"{field}.data", math.prod(shape) * dtype.itemsize, len(data))
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _checked_shape(tensor: Tensor, field: str) -> tuple[int, ...]:
    """The header's shape, checked so that numpy only ever sees a shape it can take."""
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK:
        raise FieldError(f"{field}.shape", f"{len(shape)} dimensions, more than the {MAX_RANK} allowed")
    if any(n < 0 for n in shape):
        raise FieldError(f"{field}.shape", f"dimensions must be ≥ 0, got {list(shape)}")
    return shape


def check_byte_count(field: str, expected: int, got: int) -> None:
    if got < expected:
        raise FieldError(field, f"truncated: expected {expected} bytes, got {got}")
    if got > expected:
        raise FieldError(field, f"too long: expected {expected} bytes, got {got}")


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: bfloat16 is float32's high half, so
    each pattern goes into the high (second, little-endian) half of a zeroed float32. A
    strided copy: about 4× faster than widening to uint32 and shifting."""
    halves = np.zeros((*bits.shape, 2), "<u2")
    halves[..., 1] = bits
    return halves.view("<f4").reshape(bits.shape)
