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
from typing import Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError

from bifusion import BiFusionEncoder, InputError
from bifusion_wire import SERVICE_NAME
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire.tensor import FieldError, shared_output_bytes

from .access_log import AccessLog, CallRecord, current_call
from .batcher import Closed, DeadlineExpired, DynamicBatcher, Encoded, QueueFull, deadline_passed
from .budget import Budget, BudgetFull, Cost
from .client_shared_memory import Lease, Region, SharedMemoryRegistry
from .decode import DecodedRequest, decode_request, largest_field, parse_request, request_cost
from .failures import InstanceLost, ModelFailed
from .heap import IdleTrim
from .metrics import ServerMetrics
from .respond import (
    model_id,
    response_bytes_bound,
    response_head,
    response_outputs,
    serialise_inline,
)

log = logging.getLogger("bifusion.server")
Code = grpc.StatusCode
FIELD_METADATA_KEY = "bifusion-field"
SHUTTING_DOWN = "the server is shutting down; retry on another instance"
SHARED_MEMORY_OFF = "shared memory is off on this server (start it with --allow-shared-memory)"
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
        error = ServiceError(self.code, f"{where}: {self.message}", self.field)
        error.frame_id = self.frame_id
        return error

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((FIELD_METADATA_KEY, self.field),) if self.field else ()


class ClientLeft(Exception):
    """The call ended while a response was being written (the client cancelled or went
    away during a write that flow control held): no status can reach the client any more."""


@dataclass
class Prepared:
    """A request decoded, validated and ready for the batcher."""

    decoded: DecodedRequest
    decode_seconds: float
    cost: Cost  # held in the budget until the response is serialised
    lease: Lease | None = None  # the shared-memory range the outputs go to


@dataclass
class Attached:
    """What the service needs once the model is loaded."""

    encoder: BiFusionEncoder
    batcher: DynamicBatcher
    model_info: bytes  # serialised ModelInfo


class EncoderService:
    def __init__(
        self,
        metrics: ServerMetrics,
        io_executor: Executor,
        max_message_bytes: int,
        stream_window: int,
        budget: Budget,
        access_log: AccessLog | None = None,
        shared_memory: SharedMemoryRegistry | None = None,
    ):
        self._metrics = metrics
        self._budget = budget
        self._access_log = access_log
        self._shared = shared_memory  # None: --allow-shared-memory is off
        self._io = io_executor
        self._max_message_bytes = max_message_bytes
        self._stream_window = stream_window
        self._model: Attached | None = None
        self._draining = asyncio.Event()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_activity = time.monotonic()  # when a call last arrived or ended (drain's quiet wait)
        self._heap = IdleTrim(io_executor)  # load's garbage goes back to the system once it ends

    # Life cycle -----------------------------------------------------------------------
    def attach(self, model: Attached) -> None:
        self._model = model

    def start_draining(self) -> None:
        self._draining.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def wait_quiet(self, seconds: float) -> None:
        """Until nothing is in flight and no call has arrived or ended for ``seconds``.

        grpc cancels a call that arrives while the server stops, so a drain that stopped as
        soon as it was idle turned a client's next call (sent the moment its last one ended)
        into CANCELLED. Waiting for quiet first answers such calls UNAVAILABLE (retry
        elsewhere). Quiet counts from the last call's end too: a drain that had been quiet
        since the last arrival stopped the moment the last call in flight ended, before its
        client's next call could come. The caller bounds the wait.
        """
        while True:
            await self._idle.wait()
            quiet_for = time.monotonic() - self._last_activity
            if quiet_for >= seconds:
                return
            await asyncio.sleep(seconds - quiet_for)

    @property
    def inflight(self) -> int:
        return self._inflight

    def generic_handler(self) -> grpc.GenericRpcHandler:
        # No (de)serialisers: the handlers see and return bytes.
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                # Served as client-streaming (one message on the wire either way): see encode_frame.
                "EncodeFrame": grpc.stream_unary_rpc_method_handler(self.encode_frame),
                "EncodeStream": grpc.stream_stream_rpc_method_handler(self.encode_stream),
                "GetModelInfo": grpc.unary_unary_rpc_method_handler(self.get_model_info),
                "RegisterSharedMemory": grpc.unary_stream_rpc_method_handler(self.register_shared_memory),
                "UnregisterSharedMemory": grpc.unary_unary_rpc_method_handler(self.unregister_shared_memory),
            },
        )

    # RPCs ---------------------------------------------------------------------------
    async def encode_frame(self, requests, context: grpc.aio.ServicerContext) -> bytes:
        """A unary call, handled from the moment its headers arrive rather than once its whole
        request (0.6 MB and more) has: while the frame arrives the call is in flight, so a
        drain waits for it, and a call that starts arriving during a drain is refused at once
        (UNAVAILABLE). As a plain unary handler, a frame still arriving when the drain ended
        was neither, and gRPC's stop cancelled it (CANCELLED) behind a slow link or proxy."""

        async def work() -> bytes:
            model = self._accepting()
            request = await _only_message(requests)
            _, response = await self._process(model, request, _deadline(context))
            self._sent(response)
            return response

        return await self._guarded("EncodeFrame", context, work)

    async def encode_stream(self, requests, context: grpc.aio.ServicerContext) -> None:
        async def work() -> None:
            model = self._accepting()
            deadline = _deadline(context)

            call = current_call.get()

            async def process(request: bytes) -> tuple[str, bytes]:
                return await self._process(model, request, deadline, names_call=False)

            async def write(answered: tuple[str, bytes]) -> None:
                # Frames decode in parallel: the call is named in stream order, as answered.
                call.frame_id, response = answered
                self._sent(response)
                try:
                    await context.write(response)
                except Exception as exc:  # gRPC's ExecuteBatchError: the call ended under the write
                    raise ClientLeft(str(exc)) from None

            stream = _OrderedStream(process, write, self._draining, self._stream_window)
            await stream.run(requests)

        await self._guarded("EncodeStream", context, work)

    async def get_model_info(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def work() -> bytes:
            if self._model is None:
                raise ServiceError(Code.UNAVAILABLE, "the model is still loading")
            return self._model.model_info

        return await self._guarded("GetModelInfo", context, work)

    async def register_shared_memory(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """Maps the region, confirms it, then holds it for as long as the call stays open: the
        client's cancel, its channel closing, UnregisterSharedMemory or the server stopping
        all end the call and forget the region. The open call is not work in flight (a drain
        does not wait for it)."""

        async def work() -> Region:
            message = _parse(pb.RegisterSharedMemoryRequest, request)
            try:
                region = self._shared_memory().register(message)
            except FieldError as error:
                raise ServiceError.invalid(error) from None
            status = pb.SharedMemoryStatus(name=region.name, byte_size=region.byte_size)
            try:
                await context.write(status.SerializeToString())
            except BaseException:  # the call ended before it was confirmed: nothing holds the region
                self._shared.unregister(region.name, region)
                raise
            log.info(
                "shared memory %r registered: /dev/shm/%s, %d bytes",
                region.name,
                region.key,
                region.byte_size,
            )
            return region

        region = await self._guarded("RegisterSharedMemory", context, work)
        try:
            await region.unregistered.wait()
        finally:
            if self._shared.unregister(region.name, region):
                log.info("shared memory %r forgotten: its registration call ended", region.name)

    async def unregister_shared_memory(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def work() -> bytes:
            message = _parse(pb.UnregisterSharedMemoryRequest, request)
            if not self._shared_memory().unregister(message.name):
                raise ServiceError(Code.INVALID_ARGUMENT, f"name: no region named {message.name!r}", "name")
            log.info("shared memory %r unregistered", message.name)
            return pb.UnregisterSharedMemoryResponse().SerializeToString()

        return await self._guarded("UnregisterSharedMemory", context, work)

    # Steps --------------------------------------------------------------------------
    def _shared_memory(self) -> SharedMemoryRegistry:
        if self._shared is None:
            raise ServiceError(Code.FAILED_PRECONDITION, SHARED_MEMORY_OFF)
        return self._shared

    def _accepting(self) -> Attached:
        if self._draining.is_set():
            raise ServiceError(Code.UNAVAILABLE, SHUTTING_DOWN)
        if self._model is None:
            raise ServiceError(Code.UNAVAILABLE, "the model is loading; retry when health reports SERVING")
        return self._model

    async def _process(
        self, model: Attached, request: bytes, deadline: float | None, names_call: bool = True
    ) -> tuple[str, bytes]:
        """One frame: decode and check it, have it encoded in a batch, serialise the response.

        Returns the frame's id with the response. ``names_call`` puts the id on the call's
        record as soon as it is parsed (so a cancelled call still names its frame).
        """
        self._metrics.request_bytes.observe(len(request))
        call = current_call.get()
        call.add_request(len(request))
        prepared = await self._prepare(model.encoder, request)
        frame_id = prepared.decoded.frame.frame_id
        if names_call:
            call.frame_id = frame_id
        try:
            try:
                encoded = await self._compute(model, prepared, deadline)
            except BaseException:
                self._release(prepared)
                raise
            return frame_id, await self._serialised(model, prepared, encoded)
        except ServiceError as error:
            error.frame_id = frame_id
            raise

    async def _serialised(self, model: Attached, prepared: Prepared, encoded: Encoded) -> bytes:
        """``_serialise`` in the pool, then gives back what the request holds. A call cancelled
        meanwhile gives it back only when the pool thread is done: that thread may be writing
        into the request's shared-memory range, which must not go to another request before."""
        loop = asyncio.get_running_loop()
        serialising = loop.run_in_executor(self._io, self._serialise, model, prepared, encoded)
        serialising.add_done_callback(lambda _: self._release(prepared))
        try:
            return await asyncio.shield(serialising)
        except asyncio.CancelledError:
            serialising.add_done_callback(_ignore_outcome)
            raise

    def _sent(self, response: bytes) -> None:
        """Counts a response that goes to the client."""
        self._metrics.response_bytes.observe(len(response))
        current_call.get().response_bytes += len(response)

    async def _prepare(self, encoder: BiFusionEncoder, data: bytes) -> Prepared:
        """``_decode`` in the pool; a call cancelled meanwhile still gives its budget back."""
        decoding = asyncio.get_running_loop().run_in_executor(self._io, self._decode, encoder, data)
        try:
            return await asyncio.shield(decoding)
        except asyncio.CancelledError:
            decoding.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, decoding: asyncio.Future) -> None:
        if not decoding.cancelled() and decoding.exception() is None:
            self._release(decoding.result())

    def _release(self, prepared: Prepared) -> None:
        """Gives back what an admitted request holds: its budget share and shared-memory range."""
        self._budget.release(prepared.cost)
        if prepared.lease is not None:
            prepared.lease.release()

    def _decode(self, encoder: BiFusionEncoder, data: bytes) -> Prepared:
        """Parse, admit into the budget (from the header alone), decode and validate."""
        started = time.perf_counter()
        request = None
        try:
            request = parse_request(data)
            if len(data) > self._max_message_bytes:
                # Parsed only to name the bulkiest field: nothing of it is decoded.
                field, size = largest_field(request)
                raise FieldError(
                    field,
                    f"the request is {len(data)} bytes, over the server's limit of {self._max_message_bytes} "
                    f"(this field holds {size}); send PNG instead of raw, or smaller images",
                )
            cost = request_cost(request, encoder.limits, encoder.config.max_points)
            self._budget.admit(cost)
            try:
                decoded = decode_request(request, encoder.limits)
                encoder.validate(decoded.frame, decoded.options)
                lease = self._check_response_size(encoder, decoded)
            except BaseException:
                self._budget.release(cost)
                raise
        except (FieldError, InputError) as error:  # OverRequestBudget is a FieldError
            failure = ServiceError.invalid(error)
            failure.frame_id = request.frame_id if request is not None else None
            raise failure from None
        except BudgetFull as full:
            failure = ServiceError(Code.RESOURCE_EXHAUSTED, str(full))
            failure.frame_id = request.frame_id
            raise failure from None
        except ServiceError as error:
            error.frame_id = request.frame_id if request is not None else None
            raise
        seconds = time.perf_counter() - started
        self._metrics.decode_duration.observe(seconds)
        return Prepared(decoded, seconds, cost, lease)

    def _check_response_size(self, encoder: BiFusionEncoder, decoded: DecodedRequest) -> Lease | None:
        """Checks the outputs fit in a message, or holds the shared-memory range they go to."""
        frame, options = decoded.frame, decoded.options
        if frame.points is not None:
            points, field = len(frame.points), "points"
        else:
            points = min(options.max_points or encoder.config.max_points, frame.width * frame.height)
            field = "options.max_points"
        layout = (points, encoder.config.feature_dim, decoded.output_dtype, options.return_points_world)
        if decoded.output_shared_memory is not None:
            return self._shared_memory().lease(decoded.output_shared_memory, shared_output_bytes(*layout))
        size = response_bytes_bound(*layout)
        if size > self._max_message_bytes:
            raise FieldError(
                field,
                f"{points} points would make a response of up to {size} bytes, over the limit of "
                f"{self._max_message_bytes}; ask for fewer points, output_dtype FLOAT16, BFLOAT16 or INT8, "
                "or shared memory",
            )
        return None

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
        except ModelFailed as failure:
            raise _model_failure(failure) from None
        except InstanceLost as lost:
            raise ServiceError(Code.UNAVAILABLE, f"{lost}; the frame was not computed, retry it") from None

    def _serialise(self, model: Attached, prepared: Prepared, encoded: Encoded) -> bytes:
        started = time.perf_counter()
        head = response_head(
            encoded.result,
            model=model_id(model.encoder.info.checkpoint_sha256),
            queue_ms=encoded.queue_seconds * 1000.0,
            decode_ms=prepared.decode_seconds * 1000.0,
            batch_size=encoded.batch_size,
        )
        outputs = response_outputs(encoded.result, prepared.decoded.output_dtype)
        if prepared.lease is None:
            response = serialise_inline(head, outputs)
        else:
            try:
                refs = prepared.lease.write(outputs)
            except FieldError as error:
                raise ServiceError.invalid(error) from None
            for output, ref in zip(outputs, refs, strict=True):
                tensor = getattr(head, output.field)
                tensor.dtype = output.dtype
                tensor.shape[:] = output.shape
                tensor.shared_memory.CopyFrom(ref)
            response = head.SerializeToString()
        self._metrics.encode_duration.observe(time.perf_counter() - started)
        return response

    async def _guarded(self, rpc: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable]):
        """Runs an RPC's work; maps errors to status codes and records the call's metrics."""
        started = time.perf_counter()
        deadline = _deadline(context)
        call = CallRecord(method=rpc, peer=context.peer())
        current_call.set(call)  # this task's context: the call's own
        recorded = False

        def record(code: Code) -> None:
            # Before an error status is sent, so a client that sees the status also sees it
            # counted. Once only: a call leaves the in-flight count once, whatever raises later.
            nonlocal recorded
            if recorded:
                return
            recorded = True
            self._leave()
            seconds = time.perf_counter() - started
            self._metrics.observe_request(rpc, code.name, seconds)
            if self._access_log is not None:
                call.status, call.latency_ms = code.name, seconds * 1000.0
                self._access_log.record(call)

        self._enter()
        try:
            result = await work()
            record(Code.OK)
            return result
        except ServiceError as error:
            call.frame_id = error.frame_id or call.frame_id
            record(error.code)
            await context.abort(error.code, error.message, error.trailing_metadata())
        except asyncio.CancelledError:
            record(Code.DEADLINE_EXCEEDED if deadline_passed(deadline) else Code.CANCELLED)
            raise
        except ClientLeft:
            record(Code.DEADLINE_EXCEEDED if deadline_passed(deadline) else Code.CANCELLED)
            # As when gRPC cancels the call itself: it ends the call without a word.
            raise asyncio.CancelledError from None
        except Exception:
            log.exception("%s failed unexpectedly", rpc)
            record(Code.INTERNAL)
            await context.abort(Code.INTERNAL, "internal server error (details in the server log)")
        finally:
            record(Code.INTERNAL)  # a no-op unless something the excepts do not catch ended the call

    def _enter(self) -> None:
        self._last_activity = time.monotonic()
        self._inflight += 1
        self._idle.clear()
        self._heap.busy()
        self._metrics.inflight.set(self._inflight)

    def _leave(self) -> None:
        self._last_activity = time.monotonic()
        self._inflight -= 1
        self._metrics.inflight.set(self._inflight)
        if self._inflight == 0:
            self._idle.set()
            self._heap.idle()


async def _only_message(requests) -> bytes:
    """The one request of a unary call served as client-streaming."""
    async for request in requests:
        return request
    raise ServiceError(Code.INVALID_ARGUMENT, "request: the call carried no message", "request")


def _parse(message_type, data: bytes):
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        name = message_type.DESCRIPTOR.full_name
        raise ServiceError(Code.INVALID_ARGUMENT, f"request: not a valid {name}: {exc}", "request") from None


def _model_failure(failure: ModelFailed) -> ServiceError:
    """The status of a frame that made the model raise on its own (its batch-mates were retried)."""
    if failure.kind == ModelFailed.INVALID_INPUT:
        return ServiceError.invalid(failure)
    if failure.kind == ModelFailed.OUT_OF_MEMORY:
        return ServiceError(
            Code.RESOURCE_EXHAUSTED,
            f"this frame alone does not fit in the model's memory ({failure.message}); send fewer points "
            "or a smaller image",
        )
    return ServiceError(Code.INTERNAL, f"the model failed on this frame: {failure.message}")


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _ignore_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


_END = object()  # the client half-closed the stream
_DRAINED = object()  # the server began draining: read no more


Answered = TypeVar("Answered")


class _OrderedStream(Generic[Answered]):
    """One EncodeStream call: a reader starts each frame's work, the caller writes in order.

    At most ``window`` frames of a stream are in flight; the reader waits for a free slot
    before reading on, so a fast camera is held back by HTTP/2 flow control instead of
    filling the shared queue. The first failing frame ends the stream with its status once
    the responses before it are written; the frames after it are cancelled.
    """

    def __init__(
        self,
        process: Callable[[bytes], Awaitable[Answered]],
        write: Callable[[Answered], Awaitable[None]],
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
        receive = None
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
            if receive is not None:
                # A read still pending when the stream ends is dropped, its outcome unread.
                receive.cancel()
                receive.add_done_callback(_ignore_outcome)
