"""The standard ``grpc.health.v1.Health/Check`` call without the grpcio-health-checking package.

That package's stubs demand a protobuf as new as the grpcio it matches, which distro Pythons
(ROS 2 on Debian 12, Ubuntu 24.04) do not have. Its two messages are tiny, so they are
encoded here by hand: ``HealthCheckRequest {string service = 1}`` and
``HealthCheckResponse {ServingStatus status = 1}``.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from .raw import LENGTH_DELIMITED, VARINT, WireError, fields, read_varint, tag, varint

CHECK_METHOD = "/grpc.health.v1.Health/Check"
STATUS_NAMES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")


def encode_check_request(service: str) -> bytes:
    name = service.encode()
    return tag(1, LENGTH_DELIMITED) + varint(len(name)) + name if name else b""


def decode_check_response(data: bytes) -> str:
    """The status name; fields other than ``status`` (field 1, varint) are skipped."""
    status = 0
    buf = memoryview(data)
    try:
        for number, wire_type, _, start, end in fields(buf):
            if number == 1 and wire_type == VARINT:
                status, _ = read_varint(buf, start, end)
    except WireError as error:
        raise ValueError(f"HealthCheckResponse: {error}") from None
    return STATUS_NAMES[status] if status < len(STATUS_NAMES) else str(status)


def check_callable(channel: grpc.Channel) -> Callable[..., str]:
    """``call(service, timeout=..., metadata=...)`` -> SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
    return channel.unary_unary(
        CHECK_METHOD, request_serializer=encode_check_request, response_deserializer=decode_check_response
    )
