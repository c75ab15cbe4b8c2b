"""``BiFusionClient``: the encoder service from Python, with numpy in and out (no torch)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import grpc
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire import encoder_pb2_grpc, health

from .request import build_request
from .result import EncodeResult

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
FIELD_METADATA_KEY = "bifusion-field"


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
    ):
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
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
        self._health_check = health.check_callable(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def encode_frame(
        self, color, depth, intrinsics, cam_to_world=None, *, timeout: float | None = None, **options
    ) -> EncodeResult:
        """Encode one frame. ``options`` are those of :func:`bifusion_client.request.build_request`:
        depth_scale, points, frame_id, max_points, float16, world_points, occlusion_tau,
        color_format, depth_format."""
        request = build_request(color, depth, intrinsics, cam_to_world=cam_to_world, **options)
        return self.encode_request(request, timeout=timeout)

    def encode_request(self, request: pb.EncodeFrameRequest, timeout: float | None = None) -> EncodeResult:
        response = self._stub.EncodeFrame(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return EncodeResult.from_response(response)

    def encode_stream(
        self, frames: Iterable[pb.EncodeFrameRequest | Mapping], timeout: float | None = None
    ) -> Iterator[EncodeResult]:
        """Encode a stream of frames (requests, or keyword mappings for ``build_request``); yields
        results in order as they arrive. The first bad frame raises ``grpc.RpcError`` naming it."""

        def requests():
            for frame in frames:
                yield frame if isinstance(frame, pb.EncodeFrameRequest) else build_request(**frame)

        responses = self._stub.EncodeStream(
            requests(), timeout=timeout or self.timeout, metadata=self._metadata
        )
        for response in responses:
            yield EncodeResult.from_response(response)

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=timeout or self.timeout, metadata=self._metadata
        )

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
        return self._health_check(service, timeout=timeout or 5.0)

    def close(self) -> None:
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


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None
