"""Dynamic batching: one queue for every client, feeding one or more model instances.

A batch starts with the first waiting frame and takes whatever else is queued, waiting at
most ``max_delay_s`` for more, up to ``max_batch_size``. Batches form one at a time and go
to whichever instance is free; while every instance is busy, new frames pile up in the
queue and form the next batch, so batches grow with the load.

A frame leaves the queue the moment its deadline passes or its caller goes away, so it
never holds a slot that another request could use, and never reaches the model. A batch
that makes the model raise is split in halves and retried until the frame that breaks it
is alone: only that frame fails. A batch that runs past ``stall_timeout_s`` is reported to
its instance (``Instance.stalled``), which kills its process or reports NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bifusion import EncodeOptions, Frame, FrameResult

from .failures import InstanceLost, ModelFailed
from .instances import BatchOutput, InProcessInstance, ProcessInstance
from .metrics import ServerMetrics

log = logging.getLogger("bifusion.server")

Instance = InProcessInstance | ProcessInstance
# gRPC cancels a call when the client's deadline passes, which can reach the server a little
# before the server's own copy of that deadline; a call that ends this close to its deadline
# ran out of time rather than being cancelled.
DEADLINE_SLACK_S = 0.1


def deadline_passed(deadline: float | None) -> bool:
    """Whether a call with this ``time.monotonic()`` deadline has (all but) run out of time."""
    return deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S


class QueueFull(Exception):
    pass


class Closed(Exception):
    pass


class DeadlineExpired(Exception):
    pass


@dataclass
class Encoded:
    """What a submitted frame resolves to."""

    result: FrameResult
    queue_seconds: float
    batch_size: int
    instance: str


@dataclass(eq=False)  # hashed by identity: jobs are keys of the queue
class _Job:
    frame: Frame
    options: EncodeOptions
    future: asyncio.Future
    enqueued: float
    deadline: float | None  # time.monotonic() after which the caller no longer waits
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class DynamicBatcher:
    def __init__(
        self,
        instances: Sequence[Instance],
        metrics: ServerMetrics,
        max_batch_size: int = 8,
        max_delay_s: float = 0.005,
        max_queue: int = 64,
        stall_timeout_s: float = 0.0,  # 0: no watchdog
    ):
        self.instances = list(instances)
        self.stall_timeout_s = stall_timeout_s
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue = max_queue
        self._waiting: dict[_Job, None] = {}  # insertion-ordered: the queue, removable anywhere
        self._arrived = asyncio.Event()
        self._forming = asyncio.Lock()  # one batch forms at a time
        self._running = 0  # batches in the model
        self._settled = asyncio.Event()  # nothing queued, nothing running
        self._settled.set()
        self._closed = False
        self._workers: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [
            loop.create_task(self._work(instance), name=f"bifusion-batcher-{instance.name}")
            for instance in self.instances
        ]

    def submit(self, frame: Frame, options: EncodeOptions, deadline: float | None = None) -> asyncio.Future:
        """Queue a validated frame; the future resolves to :class:`Encoded`."""
        if self._closed:
            raise Closed()
        if len(self._waiting) >= self._max_queue:
            raise QueueFull()
        loop = asyncio.get_running_loop()
        job = _Job(frame, options, loop.create_future(), time.monotonic(), deadline)
        if deadline is not None:
            job.timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._expire, job)
        job.future.add_done_callback(lambda _, job=job: self._resolved(job))
        self._waiting[job] = None
        self._arrived.set()
        self._changed()
        return job.future

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def close(self, timeout: float) -> None:
        """Refuse new frames, let queued ones finish (up to ``timeout`` s), then stop the workers."""
        self._closed = True
        try:
            await asyncio.wait_for(self._settled.wait(), timeout)
        except TimeoutError:
            log.warning("batcher closed with %d frames still queued", len(self._waiting))
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for job in list(self._waiting):
            self._remove(job)
            _fail(job, Closed())

    # The queue -----------------------------------------------------------------------
    def _expire(self, job: _Job) -> None:
        """The job's deadline passed: if it is still queued, it leaves now."""
        if job in self._waiting:
            self._drop(job, "deadline")
            _fail(job, DeadlineExpired())

    def _resolved(self, job: _Job) -> None:
        """The job's future is done; if the caller cancelled it while queued, free its slot."""
        if job.timer is not None:
            job.timer.cancel()
        if job in self._waiting:
            self._drop(job, "deadline" if deadline_passed(job.deadline) else "cancelled")

    def _drop(self, job: _Job, reason: str) -> None:
        self._remove(job)
        self._count_drop(job, reason)

    def _count_drop(self, job: _Job, reason: str) -> None:
        self._metrics.dropped.labels(reason).inc()
        log.debug("dropped frame %r before the model: %s", job.frame.frame_id, reason)

    def _still_wanted(self, jobs: list[_Job]) -> list[_Job]:
        """Drops the taken jobs whose caller left, or whose deadline passed, while their batch
        formed (out of the queue, the queue's own checks no longer see them)."""
        now, wanted = time.monotonic(), []
        for job in jobs:
            if job.future.done():
                self._count_drop(job, "deadline" if deadline_passed(job.deadline) else "cancelled")
            elif job.deadline is not None and now >= job.deadline:
                self._count_drop(job, "deadline")
                _fail(job, DeadlineExpired())
            else:
                wanted.append(job)
        return wanted

    def _remove(self, job: _Job) -> None:
        del self._waiting[job]
        self._changed()

    def _take(self, jobs: list[_Job]) -> None:
        """Move queued jobs into ``jobs``, oldest first, up to the batch size."""
        while self._waiting and len(jobs) < self.max_batch_size:
            job = next(iter(self._waiting))
            if job.future.done():  # cancelled; its callback has not run yet
                self._resolved(job)
                continue
            self._remove(job)
            jobs.append(job)

    def _requeue(self, jobs: list[_Job]) -> None:
        """Put jobs back at the head of the queue, in order."""
        live = self._still_wanted(jobs)
        self._waiting = {**dict.fromkeys(live), **self._waiting}
        if live:
            self._arrived.set()
        self._changed()

    def _changed(self) -> None:
        self._metrics.queue_depth.set(len(self._waiting))
        if self._waiting or self._running:
            self._settled.clear()
        else:
            self._settled.set()

    async def _arrival(self, timeout: float | None) -> bool:
        """Wait (up to ``timeout`` s) until something is queued."""
        if self._waiting:
            return True
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _next_batch(self, jobs: list[_Job]) -> None:
        while not jobs:
            await self._arrival(None)
            self._take(jobs)
        until = time.monotonic() + self._max_delay_s
        while len(jobs) < self.max_batch_size:
            remaining = until - time.monotonic()
            if remaining <= 0 or not await self._arrival(remaining):
                return
            self._take(jobs)

    # The workers: one per instance -----------------------------------------------------
    async def _work(self, instance: Instance) -> None:
        while True:
            await instance.wait_ready()
            jobs: list[_Job] = []
            try:
                async with self._forming:
                    await self._next_batch(jobs)
            except asyncio.CancelledError:
                self._requeue(jobs)
                raise
            if not instance.ready:  # it died while the batch formed: another instance takes it
                self._requeue(jobs)
                continue
            self._running += 1
            try:
                await self._run_batch(instance, jobs)
            finally:
                self._running -= 1
                self._changed()

    async def _run_batch(self, instance: Instance, jobs: list[_Job]) -> None:
        jobs = self._still_wanted(jobs)
        if not jobs:
            return
        started = time.monotonic()
        for job in jobs:
            self._metrics.queue_wait.observe(started - job.enqueued)
        try:
            await self._attempt(instance, jobs, started)
        except asyncio.CancelledError:
            # Only close() cancels the workers; nobody will deliver these results (nor try
            # the halves of a failing batch not yet retried).
            for job in jobs:
                _fail(job, Closed())
            raise

    async def _attempt(self, instance: Instance, jobs: list[_Job], started: float) -> None:
        """One model call; a failing batch is bisected until the frame that breaks it is alone."""
        jobs = [job for job in jobs if not job.future.done()]
        if not jobs:
            return
        name = instance.name
        self._metrics.batch_size.labels(name).observe(len(jobs))
        call_started = time.monotonic()
        try:
            output = await self._watched(instance, jobs)
        except InstanceLost as lost:
            log.error("%d frames lost with their model instance: %s", len(jobs), lost)
            for job in jobs:
                _fail(job, lost)
            return
        except ModelFailed as failure:
            self._metrics.batch_failures.labels(name).inc()
            if len(jobs) == 1:
                log.warning("frame %r failed on model instance %s: %s", jobs[0].frame.frame_id, name, failure)
                _fail(jobs[0], failure)
                return
            log.warning("a batch of %d frames failed (%s); retrying it in halves", len(jobs), failure)
            half = len(jobs) // 2
            await self._attempt(instance, jobs[:half], started)
            await self._attempt(instance, jobs[half:], started)
            return
        self._deliver(name, jobs, output, started, time.monotonic() - call_started)

    async def _watched(self, instance: Instance, jobs: list[_Job]) -> BatchOutput:
        """``instance.encode`` under a watchdog that fires once the stall timeout passes."""
        watchdog = None
        if self.stall_timeout_s > 0:
            loop = asyncio.get_running_loop()
            watchdog = loop.call_later(self.stall_timeout_s, self._stalled, instance, self.stall_timeout_s)
        try:
            return await instance.encode([job.frame for job in jobs], [job.options for job in jobs])
        finally:
            if watchdog is not None:
                watchdog.cancel()

    def _stalled(self, instance: Instance, seconds: float) -> None:
        if instance.stalled(seconds):  # not if the batch came back as the timer came due
            self._metrics.instance_stalls.labels(instance.name).inc()

    def _deliver(
        self, name: str, jobs: list[_Job], output: BatchOutput, started: float, seconds: float
    ) -> None:
        metrics = self._metrics
        metrics.compute_duration.labels(name).observe(seconds)
        for stage, ms in output.results[0].timings_ms.items():
            metrics.stage_duration.labels(stage, name).observe(ms / 1000.0)
        if output.gpu_memory is not None:
            metrics.gpu_allocated.labels(name).set(output.gpu_memory[0])
            metrics.gpu_reserved.labels(name).set(output.gpu_memory[1])
        for job, result in zip(jobs, output.results, strict=True):
            stats = result.stats
            metrics.observe_frame(stats.num_points, stats.gate_mean, stats.valid_ratio)
            if not job.future.done():
                job.future.set_result(Encoded(result, started - job.enqueued, len(jobs), name))


def _fail(job: _Job, error: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(error)
