"""Prometheus metrics of one server process (names, labels and buckets: docs/metrics.md)."""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

# Durations from 1 ms to 10 s (30 s catches big batches on CPU).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
BYTES_BUCKETS = tuple(1024 * 4**k for k in range(10))  # 1 KiB .. 256 MiB
POINTS_BUCKETS = (100, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000, 200_000)
RATIO_BUCKETS = tuple(round(0.05 * k, 2) for k in range(21))  # 0.0, 0.05, .., 1.0
STAGES = ("prepare", "points", "clip", "unet", "fusion", "output")
RPCS = ("EncodeFrame", "EncodeStream", "GetModelInfo", "RegisterSharedMemory", "UnregisterSharedMemory")
DROP_REASONS = ("deadline", "cancelled")
# Not "instance": Prometheus gives that name to the scraped target.
INSTANCE_LABEL = "model_instance"


class ServerMetrics:
    """Every metric the server exports, in a registry of its own (one per server)."""

    def __init__(self, instances: int = 1) -> None:
        self.registry = registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)

        def histogram(name, doc, buckets=DURATION_BUCKETS, labels=()):
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        def gauge(name, doc, labels=()):
            return Gauge(name, doc, labels, registry=registry)

        self.requests = Counter(
            "bifusion_requests",
            "RPCs finished, by method and status code",
            ("rpc", "code"),
            registry=registry,
        )
        self.request_duration = histogram(
            "bifusion_request_duration_seconds",
            "RPC wall time, by method and status code",
            labels=("rpc", "code"),
        )
        self.queue_wait = histogram("bifusion_queue_wait_seconds", "Time a frame waited for its batch")
        self.decode_duration = histogram(
            "bifusion_decode_duration_seconds", "Request parsing, image decoding and validation per frame"
        )
        self.compute_duration = histogram(
            "bifusion_compute_duration_seconds",
            "Model call per batch, by model instance (crossing the process boundary included)",
            labels=(INSTANCE_LABEL,),
        )
        self.encode_duration = histogram(
            "bifusion_encode_duration_seconds", "Response serialisation per frame"
        )
        self.stage_duration = histogram(
            "bifusion_stage_duration_seconds",
            "Encoder stage time per batch, by model instance",
            labels=("stage", INSTANCE_LABEL),
        )
        self.batch_size = histogram(
            "bifusion_batch_size",
            "Frames per model call, by model instance",
            buckets=BATCH_BUCKETS,
            labels=(INSTANCE_LABEL,),
        )
        self.queue_depth = gauge("bifusion_queue_depth", "Frames waiting for the model")
        self.inflight = gauge("bifusion_inflight_requests", "RPCs in progress (a stream counts once)")
        self.frames = Counter("bifusion_frames", "Frames encoded successfully", registry=registry)
        self.batch_failures = Counter(
            "bifusion_batch_failures",
            "Model calls that raised, by model instance (a failing batch is retried in halves)",
            (INSTANCE_LABEL,),
            registry=registry,
        )
        self.instance_up = gauge(
            "bifusion_instance_up", "1 while the model instance takes batches", (INSTANCE_LABEL,)
        )
        self.instance_restarts = Counter(
            "bifusion_instance_restarts",
            "Model instance processes restarted after they died",
            (INSTANCE_LABEL,),
            registry=registry,
        )
        self.instance_stalls = Counter(
            "bifusion_instance_stalls",
            "Batches that ran past --stall-timeout-seconds (a process instance is killed, an in-process "
            "one reports NOT_SERVING until the batch returns)",
            (INSTANCE_LABEL,),
            registry=registry,
        )
        self.dropped = Counter(
            "bifusion_requests_dropped",
            "Frames taken off the queue without reaching the model, by reason",
            ("reason",),
            registry=registry,
        )
        self.points_per_frame = histogram(
            "bifusion_points_per_frame", "Points encoded per frame", buckets=POINTS_BUCKETS
        )
        self.request_bytes = histogram(
            "bifusion_request_bytes", "Serialised request message size", buckets=BYTES_BUCKETS
        )
        self.response_bytes = histogram(
            "bifusion_response_bytes", "Serialised response message size", buckets=BYTES_BUCKETS
        )
        self.gate_mean = histogram(
            "bifusion_gate_mean",
            "Per-frame mean fusion weight alpha over valid points",
            buckets=RATIO_BUCKETS,
        )
        self.valid_ratio = histogram(
            "bifusion_valid_ratio",
            "Per-frame fraction of points projecting into the image",
            buckets=RATIO_BUCKETS,
        )
        self.gate_mean_last = gauge("bifusion_gate_mean_last", "Gate mean of the last frame encoded")
        self.valid_ratio_last = gauge("bifusion_valid_ratio_last", "Valid ratio of the last frame encoded")
        self.model_info = gauge(
            "bifusion_model_info",
            "The loaded model (always 1; the labels carry the information)",
            ("architecture", "checkpoint_sha256", "device", "demo_weights", "amp"),
        )
        self.gpu_allocated = gauge(
            "bifusion_gpu_memory_allocated_bytes",
            "CUDA memory held by tensors, by model instance (0 on CPU)",
            (INSTANCE_LABEL,),
        )
        self.gpu_reserved = gauge(
            "bifusion_gpu_memory_reserved_bytes",
            "CUDA memory reserved by the caching allocator, by model instance (0 on CPU)",
            (INSTANCE_LABEL,),
        )
        self.ready = gauge("bifusion_ready", "1 while the health status is SERVING")
        self.max_batch_size = gauge(
            "bifusion_max_batch_size",
            "Most frames per model call: measured at warm-up (source auto) or set by --max-batch-size "
            "(flag); granularity batch (every stage on the whole batch) or 3d_per_frame",
            ("source", "granularity"),
        )
        self.batch_sweep = gauge(
            "bifusion_batch_sweep_seconds_per_frame",
            "The --max-batch-size auto sweep: median model time per frame for each setting timed",
            ("batch_size", "granularity"),
        )

        # Series that exist before the first event, so rate() and dashboards see zeros.
        for rpc in RPCS:
            self.requests.labels(rpc, "OK")
            self.request_duration.labels(rpc, "OK")
        for index in range(instances):
            name = str(index)
            for stage in STAGES:
                self.stage_duration.labels(stage, name)
            for metric in (self.compute_duration, self.batch_size, self.batch_failures):
                metric.labels(name)
            for metric in (
                self.instance_up,
                self.instance_restarts,
                self.instance_stalls,
                self.gpu_allocated,
                self.gpu_reserved,
            ):
                metric.labels(name)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)

    def observe_frame(self, num_points: int, gate_mean: float, valid_ratio: float) -> None:
        self.frames.inc()
        self.points_per_frame.observe(num_points)
        self.gate_mean.observe(gate_mean)
        self.valid_ratio.observe(valid_ratio)
        self.gate_mean_last.set(gate_mean)
        self.valid_ratio_last.set(valid_ratio)

    def observe_request(self, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc, code).inc()
        self.request_duration.labels(rpc, code).observe(seconds)

    def set_model_info(self, architecture: str, sha256: str, device: str, demo: bool, amp: bool) -> None:
        self.model_info.labels(architecture, sha256, device, str(demo).lower(), str(amp).lower()).set(1)

    def set_batch_policy(self, policy) -> None:
        """``policy``: a :class:`~bifusion_server.batch_policy.BatchPolicy`."""
        source = "auto" if policy.measured else "flag"
        self.max_batch_size.labels(source, policy.setting.granularity).set(policy.max_batch_size)
        for setting, seconds in policy.seconds_per_frame.items():
            self.batch_sweep.labels(str(setting.batch_size), setting.granularity).set(seconds)

    def serve_http(self, host: str, port: int):
        """Start ``/metrics`` on a daemon thread; returns the HTTP server (``server_port``, ``shutdown``)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
