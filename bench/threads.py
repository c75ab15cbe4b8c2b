"""U-Net stage time by where the encoder is built and run: in process and inside the server.

Four ways to run the same encoder on the real TUM frames, rounds interleaved in one run so
machine noise hits all alike:
- ``main``: built and run on the main thread;
- ``other_thread``: built on the main thread, run on another one;
- ``worker``: built and run on one worker thread (what the server's model thread does);
- ``served``: a ``python -m bifusion_server`` child, one client, stage timings read from
  the responses' ``stats.stage_ms``.
With the thread pools sized at construction (bifusion/threads.py) all four should agree
within noise. Prints JSON (and writes it to --out when given).

    python bench/threads.py [--frames 4] [--rounds 3] [--out bench/results/threads-cpu.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.encoder import DEFAULT_DATA, real_frames  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.report import emit  # noqa: E402
from bench.serve import ServerChild  # noqa: E402
from bifusion import BiFusionEncoder, EncodeOptions  # noqa: E402
from bifusion_client.api import BiFusionClient  # noqa: E402
from bifusion_client.frames_folder import load_frames_folder  # noqa: E402
from bifusion_client.request import request_from_folder_frame  # noqa: E402

MODES = ("main", "other_thread", "worker", "served")


def rotated(items, shift: int) -> list:
    """``items`` rotated by ``shift``: round r starts with a different contender."""
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def median_stages(timings: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(t[k] for t in timings), 1) for k in timings[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--frames", type=int, default=4, help="frames per mode and round (batch 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    started = time.perf_counter()
    load_before = os.getloadavg()
    frames = real_frames(args.data)
    options = EncodeOptions(max_points=args.points)
    requests = [request_from_folder_frame(f, max_points=args.points) for f in load_frames_folder(args.data)]
    build_thread = ThreadPoolExecutor(1, thread_name_prefix="build-and-run")
    run_thread = ThreadPoolExecutor(1, thread_name_prefix="run-only")

    def on(pool, fn, *a):
        return pool.submit(fn, *a).result()

    def make():
        return BiFusionEncoder(args.checkpoint, device=args.device)

    built_on_main = make()
    built_on_worker = on(build_thread, make)
    built_on_main.encode(frames[:1], options)  # warm-up
    on(build_thread, built_on_worker.encode, frames[:1], options)

    # One frame at a time, as in process.
    server = ServerChild(args.device, args.checkpoint, max_batch_size=1, max_batch_delay_ms=0.0)
    timings: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    try:
        server.wait_serving()
        with BiFusionClient(server.address) as client:
            client.encode_request(requests[0], timeout=300)  # warm-up: connection, first batch
            runners = {
                "main": lambda f: built_on_main.encode([f], options)[0].timings_ms,
                "other_thread": lambda f: on(run_thread, built_on_main.encode, [f], options)[0].timings_ms,
                "worker": lambda f: on(build_thread, built_on_worker.encode, [f], options)[0].timings_ms,
            }
            for round_index in range(args.rounds):
                for mode in rotated(MODES, round_index):
                    for i in range(args.frames):
                        if mode == "served":
                            request = requests[i % len(requests)]
                            timings[mode].append(client.encode_request(request, 300).stage_ms)
                        else:
                            timings[mode].append(runners[mode](frames[i % len(frames)]))
    finally:
        server.stop()

    stages = {mode: median_stages(t) for mode, t in timings.items()}
    reference = stages["main"]["unet"]
    result = {
        "benchmark": "threads",
        "machine": describe(args.device),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "thread_settings": built_on_main.thread_settings.as_dict(),
        "settings": {
            "points_per_frame": args.points,
            "frames_per_mode_and_round": args.frames,
            "rounds": args.rounds,
            "batch_size": 1,
        },
        "unet_ms": {mode: s["unet"] for mode, s in stages.items()},
        "unet_ratio_to_main": {mode: round(s["unet"] / reference, 3) for mode, s in stages.items()},
        "unet_ms_all": {mode: [round(t["unet"], 1) for t in ts] for mode, ts in timings.items()},
        "stage_ms": stages,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
