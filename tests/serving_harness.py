"""Live encoder servers on free loopback ports, for any test that needs one.

- ``running_server(encoder, **config)``: a ``BiFusionServer`` in this process (its event loop
  on a background thread), sharing an already loaded encoder; fast, and its internals
  (``live.server.batcher``, ``live.server.metrics``) can be inspected.
- ``server_process(*flags)``: ``python -m bifusion_server`` as a child process, for signals, exit codes,
  logs and anything that must see the real entry point.

Both yield a ``LiveServer`` with ``address`` ("127.0.0.1:PORT", gRPC) and ``metrics_address``
("127.0.0.1:PORT"); ``live.metric(name, **labels)`` reads one sample from its /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class _LoopThread:
    """One asyncio loop on a daemon thread, shared by every in-process server of the session
    (gRPC's asyncio support is happiest with a single loop per process)."""

    _instance: _LoopThread | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True).start()

    @classmethod
    def get(cls) -> _LoopThread:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def run(self, coro, timeout: float | None = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@dataclasses.dataclass
class LiveServer:
    address: str
    metrics_address: str | None
    server: object | None = None  # the BiFusionServer, in-process only
    process: subprocess.Popen | None = None  # the child, subprocess only
    log_path: Path | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_address}/metrics"

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()

    def metrics(self) -> dict[MetricKey, float]:
        """Every sample of /metrics as ``{(name, sorted label pairs): value}``."""
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(self.metrics_text())
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    def on_loop(self, coroutine):
        """Runs ``coroutine`` on an in-process server's event loop; returns a concurrent future."""
        return asyncio.run_coroutine_threadsafe(coroutine, _LoopThread.get().loop)

    def start_drain(self):
        """Begin the SIGTERM drain of an in-process server; returns a concurrent future."""
        return self.on_loop(self.server.drain())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait_ready(self, timeout: float = 240) -> None:
        if self.server is not None:
            _LoopThread.get().run(self.server.wait_ready(), timeout)
        else:
            wait_for_health(self.address, "SERVING", timeout, process=self.process, log_path=self.log_path)


def health_status(address: str, service: str = "", credentials=None, timeout: float = 2.0) -> str:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_for_health(
    address: str,
    want: str,
    timeout: float = 240,
    process=None,
    log_path: Path | None = None,
    credentials=None,
) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            log = log_path.read_text(errors="replace") if log_path else ""
            raise RuntimeError(f"server exited with {process.returncode} before {want}:\n{log}")
        try:
            last = health_status(address, credentials=credentials)
            if last == want:
                return
        except grpc.RpcError as exc:
            last = exc.code().name
        time.sleep(0.1)
    raise TimeoutError(f"health of {address} did not become {want} in {timeout} s (last: {last})")


def wait_until(predicate, timeout: float = 30, what: str = "a condition", interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def running_server(encoder=None, wait_ready: bool = True, **config) -> Iterator[LiveServer]:
    """A server in this process on free ports. ``encoder`` (a loaded BiFusionEncoder, or any
    object with its interface) is reused instead of loading a checkpoint; ``config`` overrides
    ServerConfig fields (warm-up is off unless asked for: the shared encoder is already warm;
    the batch size is pinned to 8 unless asked for, as the batch sweep would take seconds)."""
    from bifusion_server.app import BiFusionServer
    from bifusion_server.config import ServerConfig

    config = {
        "host": LOOPBACK,
        "port": 0,
        "metrics_port": free_port(),
        "warmup_frames": 0,
        "max_batch_size": 8,
        **config,
    }
    factory = (lambda: encoder) if encoder is not None else None
    server = BiFusionServer(ServerConfig(**config), encoder_factory=factory)
    loop = _LoopThread.get()
    loop.run(server.start())
    live = LiveServer(
        address=f"{LOOPBACK}:{server.port}",
        metrics_address=f"{LOOPBACK}:{server.metrics_port}" if server.metrics_port else None,
        server=server,
    )
    try:
        if wait_ready:
            live.wait_ready()
        yield live
    finally:
        loop.run(server.stop())


@contextlib.contextmanager
def server_process(
    *flags: str,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    launcher: tuple[str, ...] = ("-m", "bifusion_server"),
) -> Iterator[LiveServer]:
    """``python -m bifusion_server`` (or ``python *launcher``) on free ports with ``flags``;
    SIGTERM (then SIGKILL) at exit. The batch size is 8 unless ``flags`` or ``env`` set it
    (the auto sweep would take seconds)."""
    port, metrics_port = free_port(), free_port()
    with tempfile.NamedTemporaryFile(prefix="bifusion-server-", suffix=".log", delete=False) as log_file:
        command = [
            sys.executable, *launcher,
            "--host", LOOPBACK, "--port", str(port), "--metrics-port", str(metrics_port), *flags,
        ]  # fmt: skip
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "BIFUSION_MAX_BATCH_SIZE": "8", **(env or {})},
        )
        live = LiveServer(
            address=f"{LOOPBACK}:{port}",
            metrics_address=f"{LOOPBACK}:{metrics_port}",
            process=process,
            log_path=Path(log_file.name),
        )
        try:
            if wait_ready:
                live.wait_ready()
            yield live
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


class SlowLink:
    """A TCP proxy on loopback whose client-to-server direction carries ``rate`` bytes a
    second (server to client is not slowed): a camera's frames over a slow link, or through
    a loaded userland proxy. ``address`` is what clients dial. Closing it closes every
    connection it made."""

    CHUNK = 16 * 1024

    def __init__(self, target: str, rate: float):
        self._target = target.rsplit(":", 1)
        self._delay = self.CHUNK / rate
        self._listener = socket.create_server((LOOPBACK, 0))
        self._sockets: list[socket.socket] = [self._listener]
        self._closed = threading.Event()
        self.address = f"{LOOPBACK}:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection((self._target[0], int(self._target[1])), timeout=10)
            server.settimeout(None)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, self._delay), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, 0.0), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(self.CHUNK):  # ends when either side closes
                if self._closed.wait(delay):
                    return
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def __enter__(self) -> SlowLink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ModelSpy:
    """Wraps an encoder: records the frame ids every model call sees, can hold calls at a
    gate (to keep the model busy on purpose) and can fail batches holding a given frame id
    (with ``failure(frame_id)``, a RuntimeError by default)."""

    def __init__(self, encoder, fail_on: str | None = None, failure=None):
        self._encoder = encoder
        self.fail_on = fail_on
        self.failure = failure or (lambda frame_id: RuntimeError(f"injected failure for {frame_id}"))
        self.seen: list[str] = []
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a call reaches the gate

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def encode(self, frames, options=None, validate=True):
        ids = [f.frame_id for f in frames]
        self.seen.extend(ids)
        self.batches.append(ids)
        self.entered.set()
        if not self.gate.wait(timeout=120):
            raise TimeoutError("the test never opened the gate")
        if self.fail_on is not None and self.fail_on in ids:
            raise self.failure(self.fail_on)
        return self._encoder.encode(frames, options, validate=validate)
