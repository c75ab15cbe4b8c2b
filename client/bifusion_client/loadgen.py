"""A small closed-loop load generator: N concurrent clients, each sending its next frame as
soon as the previous answer arrives. Reports latency percentiles and throughput."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import grpc
import numpy as np
from bifusion_wire import encoder_pb2 as pb

from .api import BiFusionClient


def run_load(
    connect: Callable[[], BiFusionClient],
    requests: Sequence[pb.EncodeFrameRequest],
    concurrency: int,
    frames: int | None = None,
    duration_s: float | None = None,
    warmup: int = 1,
    timeout: float = 300.0,
    on_frame: Callable[[], object] | None = None,
) -> dict:
    """Send ``frames`` requests in all (or keep going for ``duration_s``) from ``concurrency``
    clients, cycling through ``requests``. Each client first sends ``warmup`` untimed ones
    (connection set-up, first-call costs), then all start together. ``on_frame`` is called
    (under a lock) after each timed request, answered or failed: a progress bar's update."""
    if (frames is None) == (duration_s is None):
        raise ValueError("give frames or duration_s")
    if not requests:
        raise ValueError("no requests to send")
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    response_bytes: list[int] = []
    batch_sizes: list[int] = []
    errors: Counter[str] = Counter()
    stop_at: list[float] = [0.0]
    began_at: list[float] = [0.0]

    def set_clock() -> None:
        # Runs once all have arrived, before any is released: no worker sees a stale stop time.
        began_at[0] = time.perf_counter()
        stop_at[0] = began_at[0] + (duration_s or 0.0)

    start = threading.Barrier(concurrency + 1, action=set_clock)

    def claim() -> int | None:
        nonlocal issued
        with lock:
            if frames is not None and issued >= frames:
                return None
            if duration_s is not None and time.perf_counter() >= stop_at[0]:
                return None
            issued += 1
            return issued - 1

    failures: list[BaseException] = []

    def worker(rank: int) -> None:
        with connect() as client:
            try:
                for i in range(warmup):
                    client.encode_request(requests[(rank + i) % len(requests)], timeout=timeout)
            except BaseException as exc:  # no point in measuring: release everyone and report it
                failures.append(exc)
                start.abort()
                return
            try:
                start.wait()
            except threading.BrokenBarrierError:
                return
            while (index := claim()) is not None:
                request = requests[(rank + index) % len(requests)]
                began = time.perf_counter()
                try:
                    result = client.encode_request(request, timeout=timeout)
                except grpc.RpcError as exc:
                    with lock:
                        errors[exc.code().name] += 1
                        if on_frame:
                            on_frame()
                    continue
                elapsed = time.perf_counter() - began
                with lock:
                    latencies.append(elapsed)
                    response_bytes.append(result.wire_bytes)
                    batch_sizes.append(result.batch_size)
                    if on_frame:
                        on_frame()

    threads = [threading.Thread(target=worker, args=(rank,), daemon=True) for rank in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        for thread in threads:
            thread.join()
        raise failures[0] if failures else RuntimeError("the load generator could not start") from None
    began = began_at[0]
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    return summarise(concurrency, wall, latencies, response_bytes, batch_sizes, errors, requests)


def summarise(concurrency, wall, latencies, response_bytes, batch_sizes, errors, requests) -> dict:
    ms = np.asarray(latencies) * 1000.0
    done = len(latencies)
    return {
        "concurrency": concurrency,
        "frames": done,
        "errors": dict(errors),
        "wall_s": round(wall, 3),
        "frames_per_s": round(done / wall, 3) if wall > 0 else 0.0,
        "latency_ms": {
            name: round(float(value), 1)
            for name, value in (
                ("p50", np.percentile(ms, 50) if done else 0),
                ("p95", np.percentile(ms, 95) if done else 0),
                ("p99", np.percentile(ms, 99) if done else 0),
                ("mean", ms.mean() if done else 0),
                ("max", ms.max() if done else 0),
            )
        },
        "mean_batch_size": round(float(np.mean(batch_sizes)), 2) if done else 0.0,
        "request_bytes_per_frame": int(np.mean([r.ByteSize() for r in requests])),
        "response_bytes_per_frame": int(np.mean(response_bytes)) if done else 0,
    }
