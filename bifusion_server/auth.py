"""Bearer-token check for the encoder RPCs (health and reflection stay open for probes)."""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc
from bifusion_wire import SERVICE_NAME

BEARER = "bearer "


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls to ``bifusion.v1.BiFusionEncoder`` without ``authorization: Bearer <token>``."""

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None):
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
        if self._on_reject is not None:
            self._on_reject(method.rsplit("/", 1)[-1])
        return _rejecting(handler, problem)

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


def _rejecting(handler: grpc.RpcMethodHandler, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""

    async def deny(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    shape = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return shape(deny, request_deserializer=handler.request_deserializer)
