"""numpy arrays <-> ``bifusion.v1.Tensor`` (raw little-endian bytes with dtype and shape)."""

from __future__ import annotations

import math

import numpy as np

from .encoder_pb2 import Tensor

# numpy name -> little-endian dtype; every tensor on the wire uses one of these.
DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "float64", "int64", "int32", "uint16", "uint8", "bool")
}
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


def from_tensor(tensor: Tensor, field: str, dtypes: tuple[str, ...] | None = None) -> np.ndarray:
    """A read-only numpy view of the tensor's bytes (no copy); errors name ``field``."""
    if tensor.dtype not in DTYPES or (dtypes is not None and tensor.dtype not in dtypes):
        allowed = ", ".join(dtypes or sorted(DTYPES))
        raise FieldError(f"{field}.dtype", f"must be one of {allowed}, got {tensor.dtype!r}")
    dtype = DTYPES[tensor.dtype]
    shape = _checked_shape(tensor, field)
    # Python integers: the product cannot overflow, whatever the declared dimensions.
    check_byte_count(f"{field}.data", math.prod(shape) * dtype.itemsize, len(tensor.data))
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


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
