"""Dynamic batching: one queue for every client, one model thread.

A batch starts with the first waiting frame and takes whatever else is queued, waiting at
most ``max_delay_s`` for more, up to ``max_batch_size``. While the model runs a batch, new
frames pile up in the queue and form the next one, so batches grow with the load. Frames
whose deadline has passed or whose caller went away are dropped when dequeued: they never
reach the model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from bifusion import EncodeOptions, Frame, FrameResult

from .metrics import ServerMetrics

log = logging.getLogger("bifusion.server")

EncodeFn = Callable[[Sequence[Frame], Sequence[EncodeOptions]], list[FrameResult]]


class QueueFull(Exception):
    pass


class Closed(Exception):
    pass


class DeadlineExpired(Exception):
    pass


class BatchFailed(Exception):
    pass


@dataclass
class Encoded:
    """What a submitted frame resolves to."""

    result: FrameResult
    queue_seconds: float
    batch_size: int


@dataclass
class _Job:
    frame: Frame
    options: EncodeOptions
    future: asyncio.Future
    enqueued: float
    deadline: float | None  # time.monotonic() after which the caller no longer waits


class DynamicBatcher:
    def __init__(
        self,
        encode: EncodeFn,
        executor: Executor,
        metrics: ServerMetrics,
        max_batch_size: int = 8,
        max_delay_s: float = 0.005,
        max_queue: int = 64,
    ):
        self._encode = encode
        self._executor = executor
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self._closed = False
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="bifusion-batcher")

    def submit(self, frame: Frame, options: EncodeOptions, deadline: float | None = None) -> asyncio.Future:
        """Queue a validated frame; the future resolves to :class:`Encoded`."""
        if self._closed:
            raise Closed()
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(frame, options, future, time.monotonic(), deadline))
        except asyncio.QueueFull:
            raise QueueFull() from None
        self._metrics.queue_depth.set(self._queue.qsize())
        return future

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def close(self, timeout: float) -> None:
        """Refuse new frames, let queued ones finish (up to ``timeout`` s), then stop the worker."""
        self._closed = True
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.warning("batcher closed with %d frames still queued", self._queue.qsize())
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await self._fill(batch)
            self._metrics.queue_depth.set(self._queue.qsize())
            live = [job for job in batch if self._is_live(job)]
            try:
                if live:
                    await self._run_batch(live)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _fill(self, batch: list[_Job]) -> None:
        until = time.monotonic() + self._max_delay_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                return

    def _is_live(self, job: _Job) -> bool:
        if job.future.done():  # the caller cancelled (or its deadline fired and gRPC cancelled it)
            reason = (
                "deadline" if job.deadline is not None and time.monotonic() >= job.deadline else "cancelled"
            )
        elif job.deadline is not None and time.monotonic() >= job.deadline:
            reason = "deadline"
            job.future.set_exception(DeadlineExpired())
        else:
            return True
        self._metrics.dropped.labels(reason).inc()
        log.debug("dropped frame %r before the model: %s", job.frame.frame_id, reason)
        return False

    async def _run_batch(self, jobs: list[_Job]) -> None:
        started = time.monotonic()
        for job in jobs:
            self._metrics.queue_wait.observe(started - job.enqueued)
        self._metrics.batch_size.observe(len(jobs))
        frames = [job.frame for job in jobs]
        options = [job.options for job in jobs]
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._encode, frames, options)
        except asyncio.CancelledError:
            # Only close() cancels the worker; nobody will deliver these results.
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(Closed())
            raise
        except Exception as exc:
            self._metrics.batch_failures.inc()
            log.exception("a batch of %d frames failed", len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(BatchFailed(f"{type(exc).__name__}: {exc}"))
            return
        self._metrics.compute_duration.observe(time.monotonic() - started)
        for stage, ms in results[0].timings_ms.items():
            self._metrics.stage_duration.labels(stage).observe(ms / 1000.0)
        for job, result in zip(jobs, results, strict=True):
            self._metrics.observe_frame(
                result.stats.num_points, result.stats.gate_mean, result.stats.valid_ratio
            )
            if not job.future.done():
                job.future.set_result(Encoded(result, started - job.enqueued, len(jobs)))
