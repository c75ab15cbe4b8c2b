"""Bearer-token check for the encoder RPCs (health and reflection stay open for probes)."""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

from bifusion_wire import SERVICE_NAME

BEARER = "bearer "


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls to ``bifusion.v1.BiFusionEncoder`` without ``authorization: Bearer <token>``."""

    def __init__(self, token: str, on_reject: Callable[[str, str], None] | None = None):
        """``on_reject(rpc, peer)`` is called for every call refused."""
        self._token = token.encode()
        self._prefix = f"/{SERVICE_NAME}/"
        self._on_reject = on_reject

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler
        return _rejecting(handler, problem, method.rsplit("/", 1)[-1], self._on_reject)

    def _problem(self, metadata) -> str | None:
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return "missing 'authorization: Bearer <token>' metadata"
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        if not value.lower().startswith(BEARER):
            return "the authorization metadata must read 'Bearer <token>'"
        # Constant-time comparison: the time taken says nothing about the token.
        if not hmac.compare_digest(value[len(BEARER) :].strip().encode(), self._token):
            return "invalid bearer token"
        return None


def _rejecting(
    handler: grpc.RpcMethodHandler, problem: str, rpc: str, on_reject: Callable[[str, str], None] | None
) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED without reading the request body.

    It is request-streaming whatever the method's shape (the wire is the same): gRPC reads a
    unary request whole before calling its handler, while a streaming handler that never
    iterates leaves the body unread, so a large anonymous request costs no memory.
    """

    async def deny(_requests, context):
        if on_reject is not None:
            on_reject(rpc, context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.stream_unary_rpc_method_handler(deny)
