"""The cost of running the encoder in an instance process instead of in the server process.

Measures, on the real TUM frames at --points points per frame:
- the transport alone: a frame's results (20 000 points: 20.7 MB) packed into shared memory
  by the child and rebuilt as views by the parent, against pickling them through a pipe;
- a batch through a ``ProcessInstance`` (a child with every core) against the same batch
  through an ``InProcessInstance``, interleaved: wall time per batch, and the part of it
  spent outside the child's own encode call (the process boundary).

Prints JSON (and writes it to --out when given).

    python bench/instances.py [--points 20000] [--batch-sizes 1 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.encoder import DEFAULT_DATA, real_frames  # noqa: E402
from bench.machine import describe  # noqa: E402


def transport(results, repeats: int) -> dict:
    """Per frame: shared memory (copy in, views out) vs a pipe (pickle in-band, send, receive)."""
    import numpy as np

    from bifusion_server.instance_transfer import SegmentPool, pack, unpack

    nbytes = sum(
        r.features.nbytes + r.alpha.nbytes + r.valid.nbytes + r.point_indices.nbytes for r in results
    )
    pool = SegmentPool(f"bifusion-bench-{os.getpid()}")
    segment = pool.acquire(2 * nbytes)
    shm_s, pipe_s = [], []
    reader, writer = multiprocessing.Pipe(duplex=False)
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            packed = pack(results, segment.shm.buf)
            rebuilt = unpack(packed, np.frombuffer(segment.shm.buf, dtype=np.uint8))
            shm_s.append(time.perf_counter() - started)
            del rebuilt
            started = time.perf_counter()
            data = pickle.dumps(results, protocol=5)
            sender = _Sender(writer, data)
            pickle.loads(reader.recv_bytes())
            sender.join()
            pipe_s.append(time.perf_counter() - started)
    finally:
        pool.release(segment)
        pool.close()
    frames = len(results)
    return {
        "bytes_per_frame": nbytes // frames,
        "shared_memory_ms_per_frame": round(1000 * statistics.median(shm_s) / frames, 2),
        "shared_memory_gb_per_s": round(nbytes / statistics.median(shm_s) / 1e9, 2),
        "pipe_pickle_ms_per_frame": round(1000 * statistics.median(pipe_s) / frames, 2),
    }


class _Sender:
    """Writes to a pipe from a thread, as the other process would, so the reader can drain it."""

    def __init__(self, conn, data: bytes):
        import threading

        self._thread = threading.Thread(target=conn.send_bytes, args=(data,))
        self._thread.start()

    def join(self) -> None:
        self._thread.join()


async def instances(args, frames) -> dict:
    """Same batches through a child process and through this process, interleaved."""
    from bifusion import BiFusionEncoder, EncodeOptions
    from bifusion_server.instances import InProcessInstance, InstanceSpec, ProcessInstance, cores
    from bifusion_server.metrics import ServerMetrics

    spec = InstanceSpec(args.checkpoint, args.device, False, 1, cores(), "WARNING")
    child = ProcessInstance(0, spec, ServerMetrics(1))
    await child.start()
    local = InProcessInstance("0", BiFusionEncoder(args.checkpoint, device=args.device))
    options = EncodeOptions(max_points=args.points)
    await local.encode(frames[:1], [options])  # warm-up
    rows = []
    try:
        for size in args.batch_sizes:
            batch = [frames[i % len(frames)] for i in range(size)]
            opts = [options] * size
            walls = {"process": [], "in_process": []}
            boundary = []
            for _ in range(args.repeats):
                for name, instance in (("process", child), ("in_process", local)):
                    started = time.perf_counter()
                    output = await instance.encode(batch, opts)
                    wall = time.perf_counter() - started
                    walls[name].append(wall)
                    if name == "process":
                        boundary.append(wall - output.model_seconds)
                    del output
            rows.append(
                {
                    "batch_size": size,
                    "process_ms_per_batch": round(1000 * statistics.median(walls["process"]), 1),
                    "in_process_ms_per_batch": round(1000 * statistics.median(walls["in_process"]), 1),
                    "boundary_ms_per_frame": round(1000 * statistics.median(boundary) / size, 2),
                }
            )
    finally:
        await child.stop()
        await local.stop()
    return {"device": child.info.device, "batches": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from bifusion import BiFusionEncoder, EncodeOptions

    frames = real_frames(args.data)
    load_before = os.getloadavg()
    encoder = BiFusionEncoder(args.checkpoint, device=args.device)
    results = encoder.encode(frames[:2], EncodeOptions(max_points=args.points))
    del encoder
    result = {
        "benchmark": "instances",
        "machine": describe(None),
        "load_average_before": [round(x, 2) for x in load_before],
        "points_per_frame": args.points,
        "transport": transport(results, max(3, args.repeats)),
        "instances": asyncio.run(instances(args, frames)),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": args.note,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
