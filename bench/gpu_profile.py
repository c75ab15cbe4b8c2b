"""Where a batched call spends its wall time, and how busy the GPU is under many clients.

Two measurements on the real TUM frames:
- ``profile``: one ``BiFusionEncoder.encode`` of --batch-size frames under torch.profiler,
  after warm-up. Per stage (prepare, points, clip, unet, fusion, output): wall ms and the
  device-kernel ms launched inside it; for the call: wall, kernel time summed, and the
  kernels' share of the wall (what is left is host work the GPU waits on).
- ``busy``: a ``python -m bifusion_server`` child under --clients closed-loop clients
  (shared-memory outputs) for --seconds, ``nvidia-smi dmon`` sampling the GPU's SM
  utilisation each second meanwhile (skipped without nvidia-smi).

    python bench/gpu_profile.py --device cuda --batch-size 16 --clients 64 --out gpu-profile.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "client")]

from bench.encoder import DEFAULT_DATA, real_frames  # noqa: E402
from bench.machine import describe, emit  # noqa: E402
from bench.serve import ServerChild  # noqa: E402
from bifusion_client.api import BiFusionClient  # noqa: E402
from bifusion_client.frames_folder import load_frames_folder  # noqa: E402
from bifusion_client.loadgen import run_load  # noqa: E402
from bifusion_client.request import request_from_folder_frame  # noqa: E402


def annotate_stages() -> None:
    """Name each encoder stage in the profiler's trace: the encoder times its stages with
    ``_StageTimer``; wrapping it here puts a ``stage:<name>`` range around each one."""
    import torch

    import bifusion.encoder as encoder_module

    timed = encoder_module._StageTimer.__call__

    @contextlib.contextmanager
    def annotated(self, name: str):
        with torch.profiler.record_function(f"stage:{name}"), timed(self, name):
            yield

    encoder_module._StageTimer.__call__ = annotated


def profile_batch(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bifusion import BiFusionEncoder, EncodeOptions

    annotate_stages()
    encoder = BiFusionEncoder(args.checkpoint, device=args.device)
    frames = real_frames(args.data)
    batch = [frames[i % len(frames)] for i in range(args.batch_size)]
    options = EncodeOptions(max_points=args.points)
    for _ in range(3):  # warm-up, pinned buffers for this batch size included
        encoder.encode(batch, options)
    cuda = encoder.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        results = encoder.encode(batch, options)
        wall_ms = (time.perf_counter() - started) * 1000.0
    events = prof.events()

    def device_us(event) -> float:
        return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)

    stages = {}
    for event in events:
        if event.name.startswith("stage:") and event.device_type == torch.autograd.DeviceType.CPU:
            stages[event.name[6:]] = {
                "wall_ms": round(event.cpu_time_total / 1000.0, 2),
                "kernel_ms": round(device_us(event) / 1000.0, 2),
            }
    kernels = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    kernel_ms = sum(getattr(e, "self_device_time_total", 0.0) for e in kernels) / 1000.0
    top = prof.key_averages().table(
        sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=15
    )
    return {
        "batch_size": args.batch_size,
        "points_per_frame": results[0].features.shape[0],
        "wall_ms": round(wall_ms, 2),
        "stage_ms_from_encoder": {k: round(v, 2) for k, v in results[0].timings_ms.items()},
        "stages": stages,
        "kernel_ms_total": round(kernel_ms, 2),
        "kernel_share_of_wall": round(kernel_ms / wall_ms, 3) if cuda else None,
        "top_ops": top.splitlines(),
    }


def busy_under_load(args) -> dict:
    folder_frames = load_frames_folder(args.data)
    requests = [request_from_folder_frame(f, max_points=args.points) for f in folder_frames]
    server = ServerChild(
        args.device,
        args.checkpoint,
        args.max_batch_size,
        args.max_batch_delay_ms,
        max_queue=4 * args.clients,
        instances=args.instances,
        shared_memory=True,
    )
    dmon = None
    try:
        server.wait_serving()
        run_load(lambda: BiFusionClient(server.address, shared_memory=True), requests, 1, frames=4)
        try:  # one sample a second: sm % (kernels running), mem % (memory controller busy)
            dmon = subprocess.Popen(
                ["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=subprocess.PIPE, text=True
            )
        except FileNotFoundError:
            dmon = None
        report = run_load(
            lambda: BiFusionClient(server.address, shared_memory=True),
            requests,
            args.clients,
            duration_s=args.seconds,
        )
    finally:
        if dmon is not None:
            dmon.terminate()
        server.stop()
    samples = []
    if dmon is not None:
        for line in dmon.communicate(timeout=10)[0].splitlines():
            fields = line.split()
            if fields and not line.startswith("#") and fields[1].isdigit():
                samples.append({"sm": int(fields[1]), "mem": int(fields[2]) if fields[2].isdigit() else None})
    # The first and last samples straddle the load's start and end.
    inner = samples[1:-1] or samples
    return {
        "clients": args.clients,
        "seconds": args.seconds,
        "frames_per_s": report["frames_per_s"],
        "latency_ms": report["latency_ms"],
        "mean_batch_size": report["mean_batch_size"],
        "errors": report["errors"],
        "sm_busy_pct_mean": round(statistics.mean(s["sm"] for s in inner), 1) if inner else None,
        "dmon_samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=16, help="the profiled call's batch")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0, help="load while dmon samples")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument("--instances", default="1")
    parser.add_argument("--skip", nargs="*", default=[], choices=["profile", "busy"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()
    result = {"benchmark": "gpu_profile", "machine": describe(args.device)}
    if "profile" not in args.skip:
        result["profile"] = profile_batch(args)
    if "busy" not in args.skip:
        result["busy"] = busy_under_load(args)
    result["load_average"] = [round(x, 2) for x in load_before]
    emit(result, args.out)


if __name__ == "__main__":
    main()
