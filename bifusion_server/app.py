"""The server's life: bind, load and warm up, serve, drain.

Health reports NOT_SERVING from the moment the port opens until the model is loaded and
warmed up, and again from the start of a drain, so probes and load balancers never send
work to a replica that cannot take it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bifusion import BiFusionEncoder
from bifusion_wire import SERVICE_NAME
from bifusion_wire import encoder_pb2 as pb
from bifusion_wire.documented import documented_pool

from . import batch_policy
from .access_log import AccessLog, CallRecord
from .auth import BearerTokenInterceptor
from .batcher import DynamicBatcher
from .budget import Budget, BudgetLimits
from .client_shared_memory import SharedMemoryRegistry
from .config import AUTO, ServerConfig
from .instances import (
    InProcessInstance,
    InstanceSpec,
    ModelView,
    ProcessInstance,
    cores,
    resolve_instances,
)
from .metrics import ServerMetrics
from .respond import model_info_message
from .service import Attached, EncoderService
from .warmup import synthetic_frames

log = logging.getLogger("bifusion.server")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_NAMES = ("", SERVICE_NAME)  # overall and per service
STOP_GRACE_SECONDS = 1.0
DRAIN_QUIET_SECONDS = 0.5  # a drain stops once no call has arrived or ended for this long
RECEIVE_CEILING = 4  # gRPC reads messages up to this many times --max-message-bytes
AUTO_STREAM_WINDOW = 8


def server_version() -> str:
    try:
        return importlib.metadata.version("bifusion-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class BiFusionServer:
    """One gRPC server with its model instances, batcher, health, reflection and metrics endpoint.

    One instance runs the encoder in this process, on a thread of its own; several run one
    child process each (``instances.py``). ``encoder_factory`` builds an encoder in this
    process instead (one instance); tests pass one that reuses a loaded encoder.
    """

    def __init__(self, config: ServerConfig, encoder_factory: Callable[[], BiFusionEncoder] | None = None):
        self.config = config
        in_process = encoder_factory is not None
        self.instance_count = 1 if in_process else resolve_instances(config.instances, _device_type(config))
        self.metrics = ServerMetrics(self.instance_count)
        self._encoder_factory = encoder_factory
        self._load_thread = ThreadPoolExecutor(1, thread_name_prefix="bifusion-load")
        self._io_pool = ThreadPoolExecutor(
            max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="bifusion-io"
        )
        self.port: int | None = None
        self.metrics_port: int | None = None
        # The loaded encoder with one in-process instance, else a ModelView of the children's.
        self.encoder: BiFusionEncoder | ModelView | None = None
        self.instances: list[InProcessInstance | ProcessInstance] = []
        self.batch_policy: batch_policy.BatchPolicy | None = None  # known once warmed up
        self.batcher: DynamicBatcher | None = None
        self._service: EncoderService | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._metrics_http = None
        self._shared_memory: SharedMemoryRegistry | None = None
        self._loading: asyncio.Task | None = None
        self._draining = False
        self._stopped = False
        self._access_log = AccessLog() if config.access_log else None

    async def start(self) -> None:
        """Open the ports (health NOT_SERVING) and begin loading the model in the background."""
        config = self.config
        log.info("effective config: %s", json.dumps(config.redacted(), sort_keys=True))
        token = config.bearer_token()
        warn_if_exposed(config, token)
        refuse_taken_port("--port", config.host, config.port)  # gRPC's bind would not say why
        if config.metrics_port:
            metrics_host = config.effective_metrics_host
            try:
                self._metrics_http = self.metrics.serve_http(metrics_host, config.metrics_port)
            except OSError as exc:
                raise CannotStart(
                    port_unusable("--metrics-port", metrics_host, config.metrics_port, exc)
                ) from None
            self.metrics_port = self._metrics_http.server_port
            log.info("metrics on http://%s:%d/metrics", metrics_host, self.metrics_port)
        self._shared_memory = SharedMemoryRegistry() if config.allow_shared_memory else None
        self._service = EncoderService(
            self.metrics,
            self._io_pool,
            config.max_message_bytes,
            stream_window=stream_window(config),
            shared_memory=self._shared_memory,
            budget=Budget(budget_limits(config)),
            access_log=self._access_log,
        )
        self._health = health.aio.HealthServicer()
        for name in HEALTH_NAMES:
            await self._health.set(name, NOT_SERVING)

        interceptors = []
        if token:
            interceptors.append(BearerTokenInterceptor(token, on_reject=self._count_rejected))
        self._grpc = grpc.aio.server(interceptors=interceptors, options=self._channel_options())
        self._grpc.add_generic_rpc_handlers((self._service.generic_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        # Reflection serves the registered descriptors, the encoder's with its proto comments.
        encoder_service = pb.DESCRIPTOR.services_by_name["BiFusionEncoder"].full_name
        reflection.enable_server_reflection(
            (encoder_service, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self._grpc,
            pool=documented_pool(),
        )
        self.port = self._bind()
        await self._grpc.start()
        log.info(
            "listening on %s:%d (%s%s)",
            config.host,
            self.port,
            "TLS" if config.tls else "plaintext",
            ", mTLS" if config.tls_client_ca else "",
        )
        self._loading = asyncio.create_task(self._load_and_warm_up(), name="bifusion-load")

    @property
    def stuck(self) -> bool:
        """Whether a model batch is stuck past the stall timeout in this process."""
        return any(instance.stuck for instance in self.instances)

    async def wait_ready(self) -> None:
        """Returns once SERVING; raises what loading or warm-up raised."""
        await asyncio.shield(self._loading)

    async def drain(self) -> None:
        """SIGTERM: NOT_SERVING, refuse new work, let in-flight requests finish, then stop."""
        started = time.monotonic()
        log.info("draining: %d requests in flight", self._service.inflight if self._service else 0)
        self._draining = True
        await self._health.enter_graceful_shutdown()
        self.metrics.ready.set(0)
        self._service.start_draining()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        try:
            await asyncio.wait_for(self._service.wait_idle(), self.config.drain_seconds)
        except TimeoutError:
            log.warning(
                "drain: %d requests still in flight after %.0f s; cancelling them",
                self._service.inflight,
                self.config.drain_seconds,
            )
        else:
            # Calls that arrive as grpc stops are cancelled: refuse them (UNAVAILABLE) until
            # callers go quiet, within what is left of the drain time.
            left = self.config.drain_seconds - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._service.wait_quiet(DRAIN_QUIET_SECONDS), max(left, 0.0))
        await self.stop()
        log.info("drained and stopped in %.2f s", time.monotonic() - started)

    async def stop(self) -> None:
        """Stop at once: open calls get a short grace, then are cancelled."""
        if self._stopped:
            return
        self._stopped = True
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self._grpc is not None:
            await self._grpc.stop(STOP_GRACE_SECONDS)
        if self.batcher is not None:
            await self.batcher.close(timeout=STOP_GRACE_SECONDS)
        if self._shared_memory is not None:
            self._shared_memory.close()
        await asyncio.gather(*(instance.stop() for instance in self.instances))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._io_pool.shutdown(wait=False, cancel_futures=True)
        self._load_thread.shutdown(wait=False, cancel_futures=True)

    async def _load_and_warm_up(self) -> None:
        config = self.config
        started = time.monotonic()
        if self.instance_count == 1:
            encoder = await self._load_in_process()
            self.instances = [InProcessInstance("0", encoder, on_change=self._instances_changed)]
            self._instances_changed()
        else:
            encoder = await self._start_processes()
        info = encoder.info
        log.info(
            "loaded %s from %s (sha256 %s) on %s in %.1f s%s",
            info.architecture,
            info.checkpoint_path,
            info.checkpoint_sha256[:12],
            info.device,
            time.monotonic() - started,
            " — DEMO WEIGHTS, features are not meaningful" if info.demo_weights else "",
        )
        self.metrics.set_model_info(
            info.architecture, info.checkpoint_sha256, info.device, info.demo_weights, info.amp
        )
        self.encoder = encoder
        self.batch_policy = await batch_policy.resolve(
            config.max_batch_size,
            self.instances,
            info.device.split(":")[0],
            config.max_queue,
            config.batch_sweep_seconds,
        )
        self.metrics.set_batch_policy(self.batch_policy)
        self.batcher = DynamicBatcher(
            self.instances,
            self.metrics,
            max_batch_size=self.batch_policy.max_batch_size,
            max_delay_s=config.max_batch_delay_ms / 1000.0,
            max_queue=config.max_queue,
            stall_timeout_s=config.stall_timeout_seconds,
        )
        self.batcher.start()
        info_message = model_info_message(
            info,
            self.batch_policy.max_batch_size,
            config.max_queue,
            config.max_message_bytes,
            server_version(),
            shared_memory=config.allow_shared_memory,
        )
        info_message.batch_policy.CopyFrom(self.batch_policy.message())
        self._service.attach(Attached(encoder, self.batcher, info_message.SerializeToString()))
        await self._set_health(True)
        log.info("SERVING with %d model instance(s)", len(self.instances))

    async def _load_in_process(self) -> BiFusionEncoder:
        config = self.config
        loop = asyncio.get_running_loop()
        factory = self._encoder_factory or (
            lambda: BiFusionEncoder(config.checkpoint, device=config.device, amp=config.amp)
        )
        encoder = await loop.run_in_executor(self._load_thread, factory)
        if config.warmup_frames:
            started = time.monotonic()
            frames = synthetic_frames(config.warmup_frames)
            await loop.run_in_executor(self._load_thread, encoder.encode, frames)
            log.info("warm-up: %d synthetic frames in %.2f s", len(frames), time.monotonic() - started)
        return encoder

    async def _start_processes(self) -> ModelView:
        """Start every instance process; each loads and warms up the model itself."""
        config = self.config
        spec = InstanceSpec(
            checkpoint=config.checkpoint,
            device=config.device,
            amp=config.amp,
            warmup_frames=config.warmup_frames,
            threads=max(1, cores() // self.instance_count),
            log_level=config.log_level,
        )
        self.instances = [
            ProcessInstance(index, spec, self.metrics, on_change=self._instances_changed)
            for index in range(self.instance_count)
        ]
        infos = await asyncio.gather(*(instance.start() for instance in self.instances))
        return ModelView(infos[0])

    def _instances_changed(self) -> None:
        """``bifusion_instance_up`` and health follow the instances: NOT_SERVING while none can
        take a batch."""
        for instance in self.instances:
            self.metrics.instance_up.labels(instance.name).set(1 if instance.ready else 0)
        if self.batcher is None or self._draining or self._stopped:
            return
        asyncio.get_running_loop().create_task(self._set_health(any(i.ready for i in self.instances)))

    async def _set_health(self, serving: bool) -> None:
        for name in HEALTH_NAMES:
            await self._health.set(name, SERVING if serving else NOT_SERVING)
        if not (self._draining or self._stopped):  # a drain that began meanwhile owns it now
            self.metrics.ready.set(1 if serving else 0)

    def _channel_options(self) -> list[tuple[str, int]]:
        config = self.config
        limit = config.max_message_bytes
        return [
            *connection_options(config),
            ("grpc.max_send_message_length", limit),
            # The service refuses a message over the limit itself (INVALID_ARGUMENT naming the
            # field, counted like any request, after the stream responses before it). gRPC's own
            # refusal ends a stream at once, losing those responses, and is never seen by the
            # service, so it only guards memory: beyond RECEIVE_CEILING times the limit, where
            # no client that means well sends anything. Encoder calls without the token are
            # refused before their body is read (auth.py); health and reflection are open, and
            # this ceiling bounds what a message to them can cost.
            ("grpc.max_receive_message_length", RECEIVE_CEILING * limit),
            # A second server on a taken port must fail, not share it.
            ("grpc.so_reuseport", 0),
        ]

    def _bind(self) -> int:
        config = self.config
        host = f"[{config.host}]" if ":" in config.host else config.host
        address = f"{host}:{config.port}"
        credentials = self._tls_credentials() if config.tls else None
        try:
            if credentials is None:
                return self._grpc.add_insecure_port(address)
            return self._grpc.add_secure_port(address, credentials)
        except RuntimeError:  # gRPC says only "Failed to bind"
            raise CannotStart(port_unusable("--port", config.host, config.port)) from None

    def _tls_credentials(self) -> grpc.ServerCredentials:
        config = self.config
        key = Path(config.tls_key).read_bytes()
        cert = Path(config.tls_cert).read_bytes()
        client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def _count_rejected(self, rpc: str, peer: str) -> None:
        status = grpc.StatusCode.UNAUTHENTICATED.name
        self.metrics.observe_request(rpc, status, 0.0)
        if self._access_log is not None:
            self._access_log.record(CallRecord(method=rpc, peer=peer, status=status))


class CannotStart(RuntimeError):
    """The server cannot open a port; the message names the flag."""


def port_unusable(flag: str, host: str, port: int, error: OSError | None = None) -> str:
    reason = error.strerror if error is not None and error.strerror else "in use, or not allowed"
    return (
        f"{flag} {port}: cannot listen on {host}:{port} ({reason}); stop what holds it or "
        f"choose another port with {flag}" + (" (0 turns metrics off)" if flag == "--metrics-port" else "")
    )


def refuse_taken_port(flag: str, host: str, port: int) -> None:
    """Raises CannotStart, with the system's reason, if ``host:port`` cannot be bound now."""
    if not port:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # the bind itself reports it
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as exc:
                raise CannotStart(port_unusable(flag, host, port, exc)) from None


def stream_window(config: ServerConfig) -> int:
    """Frames of one stream in flight at once: --max-batch-size, or 8 with auto (the window is
    fixed before the sweep runs, and a stream needs a few in flight to overlap its decoding
    with the model)."""
    return AUTO_STREAM_WINDOW if config.max_batch_size == AUTO else config.max_batch_size


def budget_limits(config: ServerConfig) -> BudgetLimits:
    return BudgetLimits(
        request_pixels=config.max_request_pixels,
        request_points=config.max_request_points,
        queued_pixels=config.max_queued_pixels,
        queued_points=config.max_queued_points,
    )


# Keepalive: the server pings a silent client every minute and drops it if no answer comes in
# 20 s (dead peers do not hold connections); clients may ping at most every 30 s, also while
# idle, and a client pinging faster is sent GOAWAY after two strikes.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.keepalive_permit_without_calls", 1),
]


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC server options that bound what clients can hold: connections, streams, their time."""
    options = [
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        # With overload protection on, gRPC refuses (RST_STREAM, seen as UNAVAILABLE) calls that a
        # well-behaved client opens as earlier ones finish, before their streams are freed: a
        # client with more calls than the cap saw most of them fail. Off, calls over the cap wait
        # for a free stream on the client, as HTTP/2 intends; the cap itself is still enforced.
        ("grpc.http.overload_protection", 0),
        *KEEPALIVE_OPTIONS,
    ]
    if config.connection_idle_seconds:
        options.append(("grpc.max_connection_idle_ms", round(config.connection_idle_seconds * 1000)))
    if config.connection_age_seconds:
        options.append(("grpc.max_connection_age_ms", round(config.connection_age_seconds * 1000)))
        options.append(
            ("grpc.max_connection_age_grace_ms", round(config.connection_age_grace_seconds * 1000))
        )
    return options


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def warn_if_exposed(config: ServerConfig, token: str | None) -> None:
    """A server reachable from other machines with no token lets anyone use the GPU."""
    if token or config.host in LOOPBACK_HOSTS or config.host.startswith("127."):
        return
    log.warning(
        "SECURITY: listening on %s without a bearer token: anyone who can reach port %d can use "
        "the encoder. Set --token-file (or BIFUSION_TOKEN_FILE), or listen on 127.0.0.1.",
        config.host,
        config.port,
    )


def _device_type(config: ServerConfig) -> str:
    if config.device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device.split(":")[0]
