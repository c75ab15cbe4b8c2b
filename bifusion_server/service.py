"""The ``bifusion.v1.BiFusionEncoder`` RPCs: wire bytes -> checked frame -> batcher -> wire bytes.

Handlers take and return serialised bytes (no gRPC (de)serialisers): parsing, image decoding
and response serialisation run in a thread pool, off the event loop, and the byte counts
for the metrics come for free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc

from bifusion import BiFusionEncoder, InputError
from bifusion_wire import SERVICE_NAME
from bifusion_wire.tensor import FieldError

from .batcher import BatchFailed, Closed, DeadlineExpired, DynamicBatcher, Encoded, QueueFull
from .decode import DecodedRequest, decode_request, largest_field, parse_request
from .metrics import ServerMetrics
from .respond import model_id, response_bytes_bound, response_message

log = logging.getLogger("bifusion.server")
Code = grpc.StatusCode
FIELD_METADATA_KEY = "bifusion-field"
SHUTTING_DOWN = "the server is shutting down; retry on another instance"
# Encoder field names that differ from the proto's.
ENCODER_TO_PROTO_FIELD = {"depth_scale": "depth.depth_scale"}


class ServiceError(Exception):
    """Ends an RPC with ``code``; ``field`` (the proto path) goes to the trailing metadata too."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.frame_id: str | None = None  # known once the request is parsed

    @classmethod
    def invalid(cls, error: FieldError | InputError) -> ServiceError:
        field = ENCODER_TO_PROTO_FIELD.get(error.field, error.field)
        return cls(Code.INVALID_ARGUMENT, f"{field}: {error.message}", field)

    def in_stream(self, index: int) -> ServiceError:
        where = (
            f"frame {self.frame_id!r} (#{index} in the stream)"
            if self.frame_id
            else f"frame #{index} in the stream"
        )
        return ServiceError(self.code, f"{where}: {self.message}", self.field)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((FIELD_METADATA_KEY, self.field),) if self.field else ()


@dataclass
class Prepared:
    """A request decoded, validated and ready for the batcher."""

    decoded: DecodedRequest
    decode_seconds: float


@dataclass
class Attached:
    """What the service needs once the model is loaded."""

    encoder: BiFusionEncoder
    batcher: DynamicBatcher
    model_info: bytes  # serialised ModelInfo


class EncoderService:
    def __init__(
        self, metrics: ServerMetrics, io_executor: Executor, max_message_bytes: int, stream_window: int
    ):
        self._metrics = metrics
        self._io = io_executor
        self._max_message_bytes = max_message_bytes
        self._stream_window = stream_window
        self._model: Attached | None = None
        self._draining = asyncio.Event()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # Life cycle -----------------------------------------------------------------------
    def attach(self, model: Attached) -> None:
        self._model = model

    def start_draining(self) -> None:
        self._draining.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    @property
    def inflight(self) -> int:
        return self._inflight

    def generic_handler(self) -> grpc.GenericRpcHandler:
        # No (de)serialisers: the handlers see and return bytes.
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "EncodeFrame": grpc.unary_unary_rpc_method_handler(self.encode_frame),
                "EncodeStream": grpc.stream_stream_rpc_method_handler(self.encode_stream),
                "GetModelInfo": grpc.unary_unary_rpc_method_handler(self.get_model_info),
            },
        )

    # RPCs ---------------------------------------------------------------------------
    async def encode_frame(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def work() -> bytes:
            return await self._process(self._accepting(), request, _deadline(context))

        return await self._guarded("EncodeFrame", context, work)

    async def encode_stream(self, requests, context: grpc.aio.ServicerContext) -> None:
        async def work() -> None:
            model = self._accepting()
            deadline = _deadline(context)

            async def process(request: bytes) -> bytes:
                return await self._process(model, request, deadline)

            stream = _OrderedStream(process, context.write, self._draining, self._stream_window)
            await stream.run(requests)

        await self._guarded("EncodeStream", context, work)

    async def get_model_info(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def work() -> bytes:
            if self._model is None:
                raise ServiceError(Code.UNAVAILABLE, "the model is still loading")
            return self._model.model_info

        return await self._guarded("GetModelInfo", context, work)

    # Steps --------------------------------------------------------------------------
    def _accepting(self) -> Attached:
        if self._draining.is_set():
            raise ServiceError(Code.UNAVAILABLE, SHUTTING_DOWN)
        if self._model is None:
            raise ServiceError(Code.UNAVAILABLE, "the model is loading; retry when health reports SERVING")
        return self._model

    async def _process(self, model: Attached, request: bytes, deadline: float | None) -> bytes:
        """One frame: decode and check it, have it encoded in a batch, serialise the response."""
        self._metrics.request_bytes.observe(len(request))
        prepared = await self._in_pool(self._decode, model.encoder, request)
        try:
            encoded = await self._compute(model, prepared, deadline)
            response = await self._in_pool(self._serialise, model, prepared, encoded)
        except ServiceError as error:
            error.frame_id = prepared.decoded.frame.frame_id
            raise
        self._metrics.response_bytes.observe(len(response))
        return response

    def _decode(self, encoder: BiFusionEncoder, data: bytes) -> Prepared:
        started = time.perf_counter()
        request = None
        try:
            request = parse_request(data)
            if len(data) > self._max_message_bytes:
                field, size = largest_field(request)
                raise FieldError(
                    field,
                    f"the request is {len(data)} bytes, over the server's limit of {self._max_message_bytes} "
                    f"(this field holds {size}); send PNG instead of raw, or smaller images",
                )
            decoded = decode_request(request, encoder.limits)
            encoder.validate(decoded.frame, decoded.options)
            self._check_response_size(encoder, decoded)
        except (FieldError, InputError) as error:
            failure = ServiceError.invalid(error)
            failure.frame_id = request.frame_id if request is not None else None
            raise failure from None
        seconds = time.perf_counter() - started
        self._metrics.decode_duration.observe(seconds)
        return Prepared(decoded, seconds)

    def _check_response_size(self, encoder: BiFusionEncoder, decoded: DecodedRequest) -> None:
        frame, options = decoded.frame, decoded.options
        if frame.points is not None:
            points, field = len(frame.points), "points"
        else:
            points = min(options.max_points or encoder.config.max_points, frame.width * frame.height)
            field = "options.max_points"
        size = response_bytes_bound(
            points, encoder.config.feature_dim, decoded.float16, options.return_points_world
        )
        if size > self._max_message_bytes:
            raise FieldError(
                field,
                f"{points} points would make a response of up to {size} bytes, over the limit of "
                f"{self._max_message_bytes}; ask for fewer points or FLOAT16 output",
            )

    async def _compute(self, model: Attached, prepared: Prepared, deadline: float | None) -> Encoded:
        decoded = prepared.decoded
        try:
            return await model.batcher.submit(decoded.frame, decoded.options, deadline)
        except QueueFull:
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                f"the queue is full ({model.batcher.queued} frames waiting); retry with backoff",
            ) from None
        except Closed:
            raise ServiceError(Code.UNAVAILABLE, SHUTTING_DOWN) from None
        except DeadlineExpired:
            raise ServiceError(
                Code.DEADLINE_EXCEEDED, "the deadline passed before the frame reached the model"
            ) from None
        except BatchFailed as exc:
            raise ServiceError(Code.INTERNAL, f"the model failed on this frame's batch: {exc}") from None

    def _serialise(self, model: Attached, prepared: Prepared, encoded: Encoded) -> bytes:
        started = time.perf_counter()
        response = response_message(
            encoded.result,
            float16=prepared.decoded.float16,
            model=model_id(model.encoder.info.checkpoint_sha256),
            queue_ms=encoded.queue_seconds * 1000.0,
            decode_ms=prepared.decode_seconds * 1000.0,
            batch_size=encoded.batch_size,
        ).SerializeToString()
        self._metrics.encode_duration.observe(time.perf_counter() - started)
        return response

    async def _in_pool(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def _guarded(self, rpc: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable]):
        """Runs an RPC's work; maps errors to status codes and records the call's metrics."""
        started = time.perf_counter()
        code = Code.OK
        self._enter()
        try:
            return await work()
        except ServiceError as error:
            code = error.code
            await context.abort(error.code, error.message, error.trailing_metadata())
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = Code.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else Code.CANCELLED
            raise
        except Exception:
            code = Code.INTERNAL
            log.exception("%s failed unexpectedly", rpc)
            await context.abort(Code.INTERNAL, "internal server error (details in the server log)")
        finally:
            self._leave()
            self._metrics.observe_request(rpc, code.name, time.perf_counter() - started)

    def _enter(self) -> None:
        self._inflight += 1
        self._idle.clear()
        self._metrics.inflight.set(self._inflight)

    def _leave(self) -> None:
        self._inflight -= 1
        self._metrics.inflight.set(self._inflight)
        if self._inflight == 0:
            self._idle.set()


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


_END = object()  # the client half-closed the stream
_DRAINED = object()  # the server began draining: read no more


class _OrderedStream:
    """One EncodeStream call: a reader starts each frame's work, the caller writes in order.

    At most ``window`` frames of a stream are in flight; the reader waits for a free slot
    before reading on, so a fast camera is held back by HTTP/2 flow control instead of
    filling the shared queue. The first failing frame ends the stream with its status once
    the responses before it are written; the frames after it are cancelled.
    """

    def __init__(
        self,
        process: Callable[[bytes], Awaitable[bytes]],
        write: Callable[[bytes], Awaitable[None]],
        draining: asyncio.Event,
        window: int,
    ):
        self._process = process
        self._write = write
        self._draining = draining
        self._slots = asyncio.Semaphore(window)
        self._pending: asyncio.Queue = asyncio.Queue()

    async def run(self, requests) -> None:
        reader = asyncio.create_task(self._read(aiter(requests)))
        try:
            index = 0
            while True:
                item = await self._pending.get()
                if item is _END:
                    return
                if item is _DRAINED:
                    raise ServiceError(
                        Code.UNAVAILABLE, "the server is shutting down; reopen the stream elsewhere"
                    )
                if isinstance(item, BaseException):
                    raise item
                try:
                    response = await item
                except ServiceError as error:
                    raise error.in_stream(index) from None
                await self._write(response)
                self._slots.release()
                index += 1
        finally:
            reader.cancel()
            while not self._pending.empty():
                item = self._pending.get_nowait()
                if isinstance(item, asyncio.Task):
                    item.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, requests) -> None:
        drained = asyncio.ensure_future(self._draining.wait())
        try:
            while True:
                await self._slots.acquire()
                receive = asyncio.ensure_future(anext(requests))
                await asyncio.wait((receive, drained), return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    self._pending.put_nowait(_DRAINED)
                    return
                try:
                    request = receive.result()
                except StopAsyncIteration:
                    self._pending.put_nowait(_END)
                    return
                self._pending.put_nowait(asyncio.create_task(self._process(request)))
        except Exception as exc:  # reading failed: the client went away
            self._pending.put_nowait(exc)
        finally:
            drained.cancel()
