"""The standard ``grpc.health.v1.Health/Check`` call without the grpcio-health-checking package.

That package's stubs demand a protobuf as new as the grpcio it matches, which distro Pythons
(ROS 2 on Debian 12, Ubuntu 24.04) do not have. Its two messages are tiny, so they are
encoded here by hand: ``HealthCheckRequest {string service = 1}`` and
``HealthCheckResponse {ServingStatus status = 1}``.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

CHECK_METHOD = "/grpc.health.v1.Health/Check"
STATUS_NAMES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")


def encode_check_request(service: str) -> bytes:
    name = service.encode()
    return b"\x0a" + _varint(len(name)) + name if name else b""


def decode_check_response(data: bytes) -> str:
    """The status name; fields other than ``status`` (field 1, varint) are skipped."""
    status, position = 0, 0
    while position < len(data):
        key, position = _read_varint(data, position)
        wire_type = key & 7
        if wire_type == 0:
            value, position = _read_varint(data, position)
            if key >> 3 == 1:
                status = value
        elif wire_type == 2:
            length, position = _read_varint(data, position)
            position += length
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"HealthCheckResponse: unsupported wire type {wire_type}")
    if position > len(data):
        raise ValueError("HealthCheckResponse: truncated message")
    return STATUS_NAMES[status] if status < len(STATUS_NAMES) else str(status)


def check_callable(channel: grpc.Channel) -> Callable[..., str]:
    """``call(service, timeout=..., metadata=...)`` -> SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
    return channel.unary_unary(
        CHECK_METHOD, request_serializer=encode_check_request, response_deserializer=decode_check_response
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data):
            raise ValueError("HealthCheckResponse: truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
