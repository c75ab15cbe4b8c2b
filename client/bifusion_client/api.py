"""``BiFusionClient``: the encoder service from Python, with numpy in and out (no torch).

Responses arrive as bytes and their arrays view those bytes (no protobuf copy); with
``shared_memory=True`` they view a shared-memory region the server wrote instead.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import grpc
from bifusion_wire import SERVICE_NAME, encoder_pb2_grpc, health
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire.raw import LENGTH_DELIMITED, tag, varint
from bifusion_wire.tensor import OUTPUT_DTYPES, shared_output_bytes

from .request import build_request
from .result import EncodeResult
from .shared_memory import SharedMemoryPool, Slot

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
FIELD_METADATA_KEY = "bifusion-field"
OUTPUT_SHARED_MEMORY = pb.EncodeFrameRequest.DESCRIPTOR.fields_by_name["output_shared_memory"].number


def error_field(error: grpc.RpcError) -> str | None:
    """The request field an INVALID_ARGUMENT names (from the trailing metadata), if any."""
    for key, value in error.trailing_metadata() or ():
        if key == FIELD_METADATA_KEY:
            return value
    return None


class BiFusionClient:
    """A channel to one server. Use as a context manager, or call :meth:`close`.

    TLS is on when ``tls_ca`` (the CA that signed the server's certificate; PEM path) or a
    client certificate is given, or ``tls=True`` (system roots). ``tls_cert``/``tls_key`` present
    a client certificate (mTLS). ``token`` goes as ``authorization: Bearer <token>``.

    ``load_balancing="round_robin"`` spreads calls over every address ``address`` resolves to
    (e.g. ``dns:///bifusion-encoder:50051``, a Kubernetes headless Service): see
    :func:`balancing_service_config`.

    ``shared_memory=True`` (same host as a server started with ``--allow-shared-memory``):
    outputs are written by the server into POSIX shared-memory regions this client creates,
    registers and reuses, and that :meth:`close` unregisters and unlinks. A result's arrays
    view its region; the region is reused only once all of them are gone, so keep the
    arrays as long as you need them (``np.array(...)`` copies one out). Arrays still alive
    after :meth:`close` stay readable; the region is unlinked and unmapped when they go.
    """

    def __init__(
        self,
        address: str,
        tls_ca: str | Path | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
        tls: bool = False,
        timeout: float | None = None,
        load_balancing: str | None = None,
        shared_memory: bool = False,
    ):
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # A connection of its own: gRPC otherwise shares one between every channel of the
            # process with the same settings, so many clients (a load generator, a node per
            # camera) would share one connection's stream limit (the server's
            # --max-concurrent-streams), which shared-memory registrations hold for their life.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if load_balancing:
            options += balancing_options(load_balancing, max_message_bytes)
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls or tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca), private_key=_read(tls_key), certificate_chain=_read(tls_cert)
            )
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = encoder_pb2_grpc.BiFusionEncoderStub(self._channel)
        # The encode RPCs take serialised requests and return the response's bytes untouched.
        self._encode = self._channel.unary_unary(_method("EncodeFrame"))
        self._encode_stream = self._channel.stream_stream(_method("EncodeStream"))
        self._health_check = health.check_callable(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self._info: pb.ModelInfo | None = None
        self._shared = (
            SharedMemoryPool(
                lambda request: self._stub.RegisterSharedMemory(request, metadata=self._metadata),
                lambda request: self._stub.UnregisterSharedMemory(
                    request, timeout=5, metadata=self._metadata
                ),
            )
            if shared_memory
            else None
        )

    def encode_frame(
        self, color, depth, intrinsics, cam_to_world=None, *, timeout: float | None = None, **options
    ) -> EncodeResult:
        """Encode one frame. ``options`` are those of :func:`bifusion_client.request.build_request`:
        depth_scale, points, frame_id, max_points, float16, world_points, occlusion_tau,
        color_format, depth_format."""
        request = build_request(color, depth, intrinsics, cam_to_world=cam_to_world, **options)
        return self.encode_request(request, timeout=timeout)

    def encode_request(self, request: pb.EncodeFrameRequest, timeout: float | None = None) -> EncodeResult:
        data, slot = self._outgoing(request)
        response = self._encode(data, timeout=timeout or self.timeout, metadata=self._metadata)
        return EncodeResult.from_bytes(response, slot.read if slot else None)

    def encode_stream(
        self, frames: Iterable[pb.EncodeFrameRequest | Mapping], timeout: float | None = None
    ) -> Iterator[EncodeResult]:
        """Encode a stream of frames (requests, or keyword mappings for ``build_request``); yields
        results in order as they arrive. The first bad frame raises ``grpc.RpcError`` naming it."""

        slots: deque[Slot | None] = deque()  # in request order, as the responses come back

        def requests():
            for frame in frames:
                request = frame if isinstance(frame, pb.EncodeFrameRequest) else build_request(**frame)
                data, slot = self._outgoing(request)
                slots.append(slot)
                yield data

        responses = self._encode_stream(requests(), timeout=timeout or self.timeout, metadata=self._metadata)
        for response in responses:
            slot = slots.popleft()
            yield EncodeResult.from_bytes(response, slot.read if slot else None)

    def _outgoing(self, request: pb.EncodeFrameRequest) -> tuple[bytes, Slot | None]:
        """The request's bytes and, with shared memory, the slot its outputs go to (appended as
        ``output_shared_memory``: protobuf merges a field sent after the others)."""
        data = request.SerializeToString()
        if self._shared is None:
            return data, None
        slot = self._shared.acquire(self._output_bytes(request))
        ref = slot.ref.SerializeToString()
        return data + tag(OUTPUT_SHARED_MEMORY, LENGTH_DELIMITED) + varint(len(ref)) + ref, slot

    def _output_bytes(self, request: pb.EncodeFrameRequest) -> int:
        """The most bytes this request's outputs can take (what the server checks too)."""
        info = self._info = self._info or self.model_info()
        if request.HasField("points"):
            points = request.points.shape[0] if request.points.shape else 0
        else:
            size = request.intrinsics.width * request.intrinsics.height
            points = min(request.options.max_points or info.limits.default_max_points, size)
        options = request.options
        dtype = OUTPUT_DTYPES.get(options.output_dtype, "float32")
        return shared_output_bytes(points, info.feature_dim, dtype, options.return_world_points)

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=timeout or self.timeout, metadata=self._metadata
        )

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
        return self._health_check(service, timeout=timeout or 5.0)

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
        self._channel.close()

    def __enter__(self) -> BiFusionClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


LOAD_BALANCING_POLICIES = ("round_robin",)


def balancing_service_config(policy: str) -> dict:
    """gRPC service config for client-side balancing over several servers.

    - ``round_robin``: one subchannel per resolved address, calls rotated over them.
    - ``healthCheckConfig``: each subchannel watches grpc.health.v1, so a server that is
      loading, warming up or draining (NOT_SERVING) gets no new calls.
    - a retry on UNAVAILABLE: the answer a draining server gives before its model sees the
      call, so trying another server is safe.
    """
    if policy not in LOAD_BALANCING_POLICIES:
        raise ValueError(
            f"load_balancing must be one of {', '.join(LOAD_BALANCING_POLICIES)}, not {policy!r}"
        )
    return {
        "loadBalancingConfig": [{policy: {}}],
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [
            {
                "name": [{"service": pb.DESCRIPTOR.services_by_name["BiFusionEncoder"].full_name}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }


def balancing_options(policy: str, max_message_bytes: int) -> list[tuple[str, object]]:
    """Channel options for :func:`balancing_service_config`. A call can be retried only
    while its request is buffered: the buffers must hold a whole frame (MBs)."""
    return [
        ("grpc.service_config", json.dumps(balancing_service_config(policy))),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.retry_buffer_size", 4 * max_message_bytes),
    ]


def _method(name: str) -> str:
    return f"/{SERVICE_NAME}/{name}"


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None
