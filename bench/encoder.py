"""Batched encoder vs a per-frame loop of the same encoder, on the real TUM frames.

Prints JSON: frames/s and per-stage ms at each batch size, the loop's frames/s and the
speed-up, and (``--3d-per-frame``) the same batch with the U-Net and fusion run frame by
frame (``group_3d = 1``, CLIP still batched), measured interleaved in one run so machine
noise hits all alike.

    python bench/encoder.py [--batch-sizes 1 4 8] [--repeats 3] [--device auto] [--3d-per-frame]
    BIFUSION_THREADS=1 python bench/encoder.py --thread-cpu-time --3d-per-frame   # work, not wall

Each row also counts the minor page faults per frame of the batched calls: memory the
allocator took fresh from the kernel (and zeroed) instead of reusing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402
from bifusion import BiFusionEncoder, EncodeOptions, Frame, Intrinsics  # noqa: E402
from bifusion_client.frames_folder import load_frames_folder  # noqa: E402


def _data_dir() -> Path:
    """$BIFUSION_DATA_DIR (as the tests read it), else the nearest ``shared/data`` above the checkout."""
    if "BIFUSION_DATA_DIR" in os.environ:
        return Path(os.environ["BIFUSION_DATA_DIR"])
    found = (parent / "shared" / "data" for parent in ROOT.parents)
    return next((d for d in found if d.is_dir()), ROOT.parent / "shared" / "data")


DEFAULT_DATA = _data_dir() / "tum_fr1_xyz"


def real_frames(folder: Path) -> list[Frame]:
    return [
        Frame(**{**vars(f), "intrinsics": Intrinsics(**f.intrinsics)}) for f in load_frames_folder(folder)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--thread-cpu-time",
        action="store_true",
        help="stage times in CPU time of the calling thread, not wall time (with BIFUSION_THREADS=1 all "
        "the work runs there: a measure of work that other load on the machine does not inflate)",
    )
    parser.add_argument(
        "--3d-per-frame",
        dest="per_frame_3d",
        action="store_true",
        help="also time each batch with the U-Net and fusion frame by frame (group_3d = 1)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="count host-side CUDA calls (cudaHostAlloc, ...) per batched encode",
    )
    args = parser.parse_args()

    if args.thread_cpu_time:
        import bifusion.encoder

        bifusion.encoder.time.perf_counter = time.thread_time  # what the stage timer reads
    encoder = BiFusionEncoder(args.checkpoint, device=args.device, amp=args.amp)
    frames = real_frames(args.data)
    options = EncodeOptions(max_points=args.points)
    encoder.encode(frames[:2], options)  # warm-up: allocator, MinkowskiEngine kernels

    rows = []
    for batch_size in args.batch_sizes:
        batch = [frames[i % len(frames)] for i in range(batch_size)]
        batched_s, loop_s, stages, faults = [], [], [], []
        split_s, split_stages, split_faults = [], [], []
        split = args.per_frame_3d and batch_size > 1
        # Untimed: a new batch size needs bigger pinned buffers, two of them since each call
        # runs while the previous results are held (below); allocating them costs ~0.5 ms/MB.
        results = encoder.encode(batch, options)
        results = encoder.encode(batch, options)
        allocations = pinned_allocations(encoder)
        for _ in range(args.repeats):
            faulted = minor_faults()
            start = time.perf_counter()
            results = encoder.encode(batch, options)
            batched_s.append(time.perf_counter() - start)
            faults.append(minor_faults() - faulted)
            stages.append(results[0].timings_ms)
            if split:
                encoder.group_3d = 1
                start = time.perf_counter()
                faulted = minor_faults()
                split_stages.append(encoder.encode(batch, options)[0].timings_ms)
                split_s.append(time.perf_counter() - start)
                split_faults.append(minor_faults() - faulted)
                encoder.group_3d = None
            start = time.perf_counter()
            for frame in batch:
                encoder.encode([frame], options)
            loop_s.append(time.perf_counter() - start)
        batched, loop = statistics.median(batched_s), statistics.median(loop_s)
        host_calls = profile_host_calls(encoder, batch, options) if args.profile else None
        rows.append(
            {
                "batch_size": batch_size,
                "points_per_frame": results[0].stats.num_points,
                "batched_frames_per_s": round(batch_size / batched, 3),
                "batched_ms_per_batch": round(batched * 1000, 1),
                "loop_frames_per_s": round(batch_size / loop, 3),
                "speedup_vs_loop": round(loop / batched, 3),
                "stage_ms": {k: round(statistics.median(s[k] for s in stages), 1) for k in stages[0]},
                "minor_page_faults_per_frame": round(statistics.median(faults) / batch_size),
                "pinned_allocations_timed": pinned_allocations(encoder) - allocations,
                **(split_row(batch_size, split_s, split_stages, split_faults, batched) if split else {}),
                **({"host_calls_per_encode": host_calls} if host_calls is not None else {}),
            }
        )
    report = {
        "benchmark": "encoder",
        "machine": describe(str(encoder.device)),
        "amp": encoder.amp,
        "stage_clock": "thread CPU time" if args.thread_cpu_time else "wall",
        "thread_settings": encoder.thread_settings.as_dict(),
        "demo_weights": encoder.info.demo_weights,
        "repeats": args.repeats,
        "data": str(args.data),
        "results": rows,
        # Page-locked buffers the encoder allocated over the whole run (reused across encodes).
        "pinned_buffers_allocated": {
            "uploads": encoder.staging.uploads.allocations,
            "downloads": encoder.staging.downloads.allocations,
        },
    }
    print(json.dumps(report, indent=2))


def split_row(
    batch_size: int, seconds: list[float], stages: list[dict], faults: list[int], batched: float
) -> dict:
    """The batch with the U-Net and fusion frame by frame, against the whole batch."""
    median = statistics.median(seconds)
    return {
        "3d_per_frame_frames_per_s": round(batch_size / median, 3),
        "3d_per_frame_speedup_vs_batched": round(batched / median, 3),
        "3d_per_frame_stage_ms": {k: round(statistics.median(s[k] for s in stages), 1) for k in stages[0]},
        "3d_per_frame_minor_page_faults_per_frame": round(statistics.median(faults) / batch_size),
    }


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def pinned_allocations(encoder) -> int:
    return encoder.staging.uploads.allocations + encoder.staging.downloads.allocations


def profile_host_calls(encoder, batch, options) -> dict[str, dict[str, float]]:
    """Calls and total ms of the CUDA runtime's host-memory functions in one batched encode."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if encoder.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        encoder.encode(batch, options)
    calls = {}
    for event in prof.key_averages():
        if event.key in (
            "cudaHostAlloc",
            "cudaFreeHost",
            "cudaHostRegister",
            "cudaMemcpyAsync",
            "cudaMemcpy",
        ):
            calls[event.key] = {"count": event.count, "ms": round(event.cpu_time_total / 1000, 3)}
    return calls


if __name__ == "__main__":
    main()
