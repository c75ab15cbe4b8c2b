"""Model instances: the copies of the encoder that the batcher hands batches to.

- :class:`InProcessInstance`: the encoder in the server process, on a thread of its own
  (one instance: no process boundary, no copy of the results).
- :class:`ProcessInstance`: the encoder in a child process of its own ('spawn'), so that
  several copies on one device overlap one's host work (Python, MinkowskiEngine's kernel
  maps) with another's device work, free of the server's GIL. Frames and results cross
  through shared memory (``instance_transfer.py``). A child that dies is restarted; the
  frames it was computing fail with :class:`InstanceLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_readable

import numpy as np

from bifusion import BiFusionEncoder, EncodeOptions, Frame, FrameResult, ModelInfo
from bifusion.validation import validate_frame

from .device_memory import gpu_memory
from .failures import InstanceLost, ModelFailed, classify_failure
from .instance_transfer import ALIGN, SegmentPool, pack, unpack
from .instance_worker import instance_main
from .metrics import ServerMetrics

log = logging.getLogger("bifusion.server")

# `--instances auto`: one everywhere, from measurement. On CPU one instance already uses
# every core; on an H200 a second instance did not serve more (docs/benchmarks.md, GPU):
# the one batcher's batches grow with load and keep the device busy, while two instances
# split the load into smaller batches and add a shared-memory copy per result.
AUTO_INSTANCES = {"cpu": 1, "cuda": 1}
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # wait before each further try
STOP_GRACE_S = 5.0
PER_FRAME_SLACK = 8 * ALIGN + 1024  # alignment and small arrays besides the big ones


def resolve_instances(setting: str, device_type: str) -> int:
    return AUTO_INSTANCES.get(device_type, 1) if setting == "auto" else int(setting)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class BatchOutput:
    results: list[FrameResult]
    gpu_memory: tuple[int, int] | None  # (allocated, reserved) after the batch, CUDA only
    model_seconds: float  # the encode call alone, as the instance timed it


class ModelView:
    """What the service needs of the model in a process without one: its description and
    the same input checks the encoder runs."""

    def __init__(self, info: ModelInfo):
        import torch

        self.info = info
        self.config = info.config
        self.limits = info.limits
        self.device = torch.device(info.device)

    def validate(self, frame: Frame, options: EncodeOptions | None = None) -> None:
        validate_frame(frame, options or EncodeOptions(), self.config, self.limits)


class InProcessInstance:
    """The encoder in this process; batches run on its own thread, off the event loop.

    ``on_change`` is called (on the event loop) when the instance stalls or recovers.
    """

    def __init__(self, name: str, encoder: BiFusionEncoder, on_change: Callable[[], None] = lambda: None):
        self.name = name
        self.encoder = encoder
        self._on_change = on_change
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"bifusion-model-{name}")
        self._stalled_since: float | None = None
        self._serving = asyncio.Event()  # clear while stalled
        self._serving.set()
        self._batch_out = False  # a batch is on the model's thread (cleared when it returns)

    @property
    def ready(self) -> bool:
        return self._stalled_since is None

    @property
    def stuck(self) -> bool:
        """A batch is past the stall timeout: its thread cannot be stopped or waited for."""
        return self._stalled_since is not None

    async def wait_ready(self) -> None:
        await self._serving.wait()

    async def encode(self, frames: Sequence[Frame], options: Sequence[EncodeOptions]) -> BatchOutput:
        loop = asyncio.get_running_loop()
        self._batch_out = True
        call = self._thread.submit(self._encode, frames, options)
        # When the model returns, not when this await ends: a cancelled await (the batcher
        # closing) leaves a stuck batch stuck.
        call.add_done_callback(lambda _: _call_soon(loop, self._returned))
        return await asyncio.wrap_future(call)

    def _returned(self) -> None:
        self._batch_out = False
        if self._stalled_since is not None:
            log.warning(
                "model instance %s: the stalled batch returned after %.0f s; serving again",
                self.name,
                time.monotonic() - self._stalled_since,
            )
            self._stalled_since = None
            self._serving.set()
            self._on_change()

    def stalled(self, seconds: float) -> bool:
        """The batch has run for ``seconds``. A thread cannot be stopped, so the instance reports
        itself not ready until the batch returns: health turns NOT_SERVING, which takes the
        server out of a load balancer's rotation and lets a liveness probe restart it.

        False (and nothing done) if the batch returned just as the timeout came due."""
        if not self._batch_out:
            return False
        self._stalled_since = time.monotonic() - seconds
        self._serving.clear()
        log.error(
            "model instance %s has computed one batch for %.0f s (--stall-timeout-seconds); "
            "health is NOT_SERVING until it returns",
            self.name,
            seconds,
        )
        self._on_change()
        return True

    def _encode(self, frames, options) -> BatchOutput:
        started = time.perf_counter()
        try:
            results = self.encoder.encode(frames, options, validate=False)
        except Exception as exc:
            failure = classify_failure(exc)
            log.warning("a batch failed: %s", failure.message, exc_info=failure.kind == failure.INTERNAL)
            raise failure from None
        return BatchOutput(results, gpu_memory(self.encoder.device), time.perf_counter() - started)

    async def stop(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class InstanceSpec:
    """How a child builds its encoder: the checkpoint path and settings, never the model."""

    checkpoint: str | None
    device: str
    amp: bool
    warmup_frames: int
    threads: int  # BIFUSION_THREADS of the child
    log_level: str


class ProcessInstance:
    """One encoder in a child process, restarted when it dies.

    Blocking pipe traffic runs on a thread of its own; the event loop only awaits it.
    ``on_change`` is called (on the event loop) when the instance becomes ready or is lost.
    """

    def __init__(
        self,
        index: int,
        spec: InstanceSpec,
        metrics: ServerMetrics,
        on_change: Callable[[], None] = lambda: None,
    ):
        self.name = str(index)
        self._spec = spec
        self._metrics = metrics
        self._on_change = on_change
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"bifusion-instance-{index}")
        self._segments = SegmentPool(f"bifusion-{os.getpid()}-{index}")
        self._ready = asyncio.Event()
        self._process = None
        self._conn = None
        self._restarting: asyncio.Task | None = None
        self._stopping = False
        self._stall: str | None = None  # why the child was killed, while it is being replaced
        self.info: ModelInfo | None = None
        self.computing: list[str] = []  # frame ids of the batch in the child now
        self._awaiting_reply = False  # set by the instance thread while the child holds a batch
        self.threads: dict[str, object] = {}  # the child's thread settings, as it reports them

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def stuck(self) -> bool:
        return False  # a stalled child is killed

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def start(self) -> ModelInfo:
        """Spawn the child and wait until it has loaded and warmed up the model."""
        self.info = await asyncio.get_running_loop().run_in_executor(self._thread, self._spawn)
        self._became_ready()
        return self.info

    async def encode(self, frames: Sequence[Frame], options: Sequence[EncodeOptions]) -> BatchOutput:
        if not self.ready:
            raise InstanceLost(f"model instance {self.name} is restarting")
        self.computing = [frame.frame_id for frame in frames]
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._call, frames, options)
        except InstanceLost:
            self._ready.clear()  # take no further batch; the exit watcher restarts it
            raise
        finally:
            self.computing = []

    def stalled(self, seconds: float) -> bool:
        """The batch has run for ``seconds``: kill the child. Its frames fail with
        :class:`InstanceLost` and the exit watcher starts a new one, as after a crash.

        False (and nothing done) if the child answered just as the timeout came due."""
        process = self._process
        if not self._awaiting_reply or process is None or process.exitcode is not None:
            return False
        self._stall = f"stalled (no result in {seconds:.0f} s, --stall-timeout-seconds) and was killed"
        log.error("model instance %s (pid %d) %s", self.name, process.pid, self._stall)
        process.kill()
        return True

    async def stop(self) -> None:
        self._stopping = True
        self._ready.clear()
        if self._restarting is not None:
            self._restarting.cancel()
        process = self._process
        if process is not None:
            asyncio.get_running_loop().remove_reader(process.sentinel)
            process.terminate()
            await asyncio.get_running_loop().run_in_executor(None, _reap, process)
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._segments.close()

    # On the instance thread -------------------------------------------------------
    def _spawn(self) -> ModelInfo:
        context = multiprocessing.get_context("spawn")  # fork after torch or gRPC started is unsafe
        parent_end, child_end = context.Pipe()
        spec = {**vars(self._spec), "name": self.name}
        process = context.Process(
            target=instance_main, args=(child_end, spec), name=f"bifusion-instance-{self.name}", daemon=True
        )
        with _child_environment(self._spec.threads):
            process.start()
        child_end.close()
        self._process, self._conn, self._stall = process, parent_end, None
        try:
            reply = self._receive()
        except InstanceLost as lost:
            raise RuntimeError(f"model instance {self.name} exited while loading: {lost}") from None
        if reply[0] != "ready":
            _reap(process)
            raise RuntimeError(f"model instance {self.name} could not load the model: {reply[1]}")
        self.threads = reply[2]
        log.info("model instance %s ready (pid %d, threads %s)", self.name, process.pid, self.threads)
        return reply[1]

    def _call(self, frames: Sequence[Frame], options: Sequence[EncodeOptions]) -> BatchOutput:
        try:
            segment = self._segments.acquire(self._bound(frames, options))
        except MemoryError as exc:
            raise ModelFailed(ModelFailed.OUT_OF_MEMORY, str(exc)) from None
        handed_over = False
        try:
            packed = pack((list(frames), list(options)), segment.shm.buf)
            self._awaiting_reply = True
            try:
                self._send(("encode", segment.name, packed, -(-packed.end // ALIGN) * ALIGN, self._retired()))
                reply = self._receive()
            finally:
                self._awaiting_reply = False
            if reply[0] == "error":
                raise ModelFailed(*reply[1:])
            _, packed_results, inband, memory, seconds = reply
            if packed_results is None:
                import pickle

                return BatchOutput(pickle.loads(inband), memory, seconds)
            base = np.frombuffer(segment.shm.buf, dtype=np.uint8)
            results = unpack(packed_results, base)
            # The results are views of the segment: it is reused once they are all gone.
            self._segments.release_when_unused(segment, base)
            handed_over = True
            return BatchOutput(results, memory, seconds)
        finally:
            if not handed_over:
                self._segments.release(segment)

    def _bound(self, frames: Sequence[Frame], options: Sequence[EncodeOptions]) -> int:
        """Bytes a batch's frames and results can take in its segment."""
        config = self.info.config
        point_bytes = config.feature_dim * 4 + 4 + 1 + 8  # features, alpha, valid, point index
        total = 0
        for frame, opts in zip(frames, options, strict=True):
            arrays = (frame.color, frame.depth, frame.points, frame.cam_to_world)
            total += sum(a.nbytes for a in arrays if a is not None) + PER_FRAME_SLACK
            if frame.points is not None:
                points = len(frame.points)
            else:
                points = min(opts.max_points or config.max_points, frame.width * frame.height)
            total += points * (point_bytes + (12 if opts.return_points_world else 0)) + PER_FRAME_SLACK
        return total

    def _retired(self) -> list[str]:
        return self._segments.take_retired()

    def _send(self, message) -> None:
        try:
            self._conn.send(message)
        except OSError as exc:  # BrokenPipeError: the child is gone
            raise InstanceLost(f"model instance {self.name} is gone ({exc})") from None

    def _receive(self):
        """The child's next message, or :class:`InstanceLost` once it has exited."""
        conn, process = self._conn, self._process
        while True:
            ready = wait_readable([conn, process.sentinel])
            if conn in ready:
                try:
                    return conn.recv()
                except (EOFError, OSError):
                    pass
            process.join(STOP_GRACE_S)
            if process.exitcode is not None:
                raise InstanceLost(f"model instance {self.name} {self._end(process)}")

    # On the event loop ---------------------------------------------------------------
    def _became_ready(self) -> None:
        process = self._process
        asyncio.get_running_loop().add_reader(process.sentinel, self._exited, process)
        self._ready.set()
        self._on_change()

    def _exited(self, process) -> None:
        asyncio.get_running_loop().remove_reader(process.sentinel)
        if self._stopping:
            return
        process.join(0)
        log.error("model instance %s (pid %d) %s; restarting it", self.name, process.pid, self._end(process))
        self._ready.clear()
        self._on_change()
        self._restarting = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(1_000_000):
            await asyncio.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
            if self._stopping:
                return
            try:
                await loop.run_in_executor(self._thread, self._spawn)
            except Exception as exc:
                log.error("restarting model instance %s failed: %s", self.name, exc)
                continue
            self._metrics.instance_restarts.labels(self.name).inc()
            self._became_ready()
            return

    def _end(self, process) -> str:
        return self._stall or f"died (exit code {process.exitcode})"


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """``callback`` on ``loop`` from another thread, unless the loop is gone (shut down)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


def _reap(process) -> None:
    process.join(STOP_GRACE_S)
    if process.exitcode is None:
        process.kill()
        process.join()


_ENVIRONMENT_LOCK = threading.Lock()
THREAD_VARIABLES = ("BIFUSION_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def _child_environment(threads: int):
    """A spawned child starts with a copy of ``os.environ``, and re-imports the parent's main
    module (hence torch) before ``instance_main`` runs: its thread sizes must already be in the
    environment it is started with (``OMP_WAIT_POLICY`` is there since ``import bifusion``)."""
    with _ENVIRONMENT_LOCK:
        saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
        os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
