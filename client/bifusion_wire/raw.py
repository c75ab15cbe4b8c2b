"""Protobuf wire format by hand, for the big tensors only: writing a ``Tensor`` field's header
so its bytes can follow straight from a numpy buffer, and finding a ``Tensor``'s bytes inside
a received message so numpy can view them in place. Everything small still goes through
protobuf itself (protobuf accepts fields in any order and merges repeated message fields).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from .encoder_pb2 import SharedMemoryRef, Tensor

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
TENSOR_DTYPE, TENSOR_SHAPE, TENSOR_DATA, TENSOR_SHARED_MEMORY, TENSOR_PADDING = 1, 2, 3, 4, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(field_number: int, wire_type: int) -> bytes:
    return varint(field_number << 3 | wire_type)


def tensor_field_header(
    field_number: int, dtype: str, shape: tuple[int, ...], data_bytes: int, at: int = 0, align: int = 1
) -> bytes:
    """The bytes of a length-delimited ``Tensor`` field up to its ``data``; exactly
    ``data_bytes`` raw bytes must follow to complete it. Written at offset ``at`` of a
    message, a ``padding`` field makes the data start at a multiple of ``align`` (≤ 64)."""
    described = Tensor(dtype=dtype, shape=shape).SerializeToString()
    data_key = tag(TENSOR_DATA, LENGTH_DELIMITED) + varint(data_bytes)
    # No padding, then padding fields of 2, 3, ... bytes: one of them lands on the boundary
    # (the outer length's varint may grow by a byte on the way, hence twice the range).
    padding_key = tag(TENSOR_PADDING, LENGTH_DELIMITED)
    paddings = (padding_key + varint(n) + bytes(n) for n in range(2 * align))
    for padding in itertools.chain([b""], paddings):
        inner = described + padding + data_key
        header = tag(field_number, LENGTH_DELIMITED) + varint(len(inner) + data_bytes) + inner
        if (at + len(header)) % align == 0:
            return header
    raise ValueError(f"cannot align to {align} bytes")  # only for align > 64


def read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError("malformed varint (over 10 bytes)")
    raise WireError("truncated varint")


def fields(
    buf: memoryview, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field_number, wire_type, field_start, value_start, value_end)`` of each field in
    ``buf[start:end]``; for a varint the value is ``read_varint(buf, value_start, value_end)``."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        field_start = pos
        key, pos = read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            _, after = read_varint(buf, pos, end)
        elif wire_type == LENGTH_DELIMITED:
            length, pos = read_varint(buf, pos, end)
            after = pos + length
        elif wire_type == FIXED64:
            after = pos + 8
        elif wire_type == FIXED32:
            after = pos + 4
        else:
            raise WireError(f"unsupported wire type {wire_type} (field {number})")
        if after > end or number == 0:
            raise WireError(f"field {number} runs past the end of its message")
        yield number, wire_type, field_start, pos, after
        pos = after


class TensorView:
    """A ``Tensor`` read in place: dtype and shape parsed, ``data`` a slice of the message."""

    __slots__ = ("data", "dtype", "shape", "shared_memory")

    def __init__(self) -> None:
        self.dtype = ""
        self.shape: list[int] = []
        self.data: memoryview = memoryview(b"")
        self.shared_memory: SharedMemoryRef | None = None

    @classmethod
    def parse(cls, buf: memoryview, start: int, end: int, into: TensorView | None = None) -> TensorView:
        """Parse ``buf[start:end]``; a repeated field merges into ``into`` as protobuf does."""
        view = into or cls()
        for number, wire_type, _, lo, hi in fields(buf, start, end):
            if number == TENSOR_DTYPE and wire_type == LENGTH_DELIMITED:
                view.dtype = bytes(buf[lo:hi]).decode()
            elif number == TENSOR_SHAPE and wire_type == LENGTH_DELIMITED:  # packed
                pos = lo
                while pos < hi:
                    value, pos = read_varint(buf, pos, hi)
                    view.shape.append(_signed(value))
            elif number == TENSOR_SHAPE and wire_type == VARINT:
                view.shape.append(_signed(read_varint(buf, lo, hi)[0]))
            elif number == TENSOR_DATA and wire_type == LENGTH_DELIMITED:
                view.data = buf[lo:hi]
            elif number == TENSOR_SHARED_MEMORY and wire_type == LENGTH_DELIMITED:
                ref = view.shared_memory or SharedMemoryRef()
                ref.MergeFromString(bytes(buf[lo:hi]))
                view.shared_memory = ref
        return view


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value
