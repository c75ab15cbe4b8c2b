"""Serving overhead: frames/s and latency through gRPC vs the in-process encoder, same run.

Measures, on the real TUM frames:
- the in-process encoder's frames/s at each of --in-process-batch-sizes, with every stage on
  the whole batch and (B > 1) with the U-Net and fusion frame by frame (``group_3d = 1``),
  timed in interleaved rounds, and its batch-1 latency; the best of these is the rate the
  served path is held to;
- a ``python -m bifusion_server`` child loaded by closed-loop clients at each --concurrency,
  for each --transports entry: TCP with float32, float16, int8 or bfloat16 features, and
  ``shm`` (float32 outputs written into the client's shared memory); frames/s, p50/p95/p99
  latency, mean batch size, the rate's ratio to the best in-process rate and to the
  in-process rate at the server's own batch policy (from GetModelInfo), and p50's ratio to
  the in-process batch-1 latency;
- response bytes per frame for each feature dtype against the raw tensor bytes;
- request transport: PNG vs raw colour/depth at concurrency 1 (bytes and latency).

Prints JSON (and writes it to --out when given).

    python bench/serve.py [--max-points 20000] [--concurrency 1 4 16 64] [--transports float32 shm]
                          [--instances auto]
                          [--out bench/results/serve-cpu.json]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The checkout's packages, installed or not: bifusion*, and the client distribution in client/.
IMPORT_PATHS = [str(ROOT), str(ROOT / "client")]
sys.path[:0] = IMPORT_PATHS

from bench.encoder import DEFAULT_DATA, real_frames  # noqa: E402
from bench.machine import describe, emit  # noqa: E402
from bifusion_client.api import BiFusionClient  # noqa: E402
from bifusion_client.frames_folder import load_frames_folder  # noqa: E402
from bifusion_client.loadgen import run_load  # noqa: E402
from bifusion_client.request import request_from_folder_frame  # noqa: E402
from bifusion_wire.tensor import point_bytes  # noqa: E402

TRANSPORTS = ("float32", "float16", "int8", "bfloat16", "shm")


def setting_label(batch_size: int, group_3d: int | None) -> str:
    """As the server's batch policy names a setting (``B=8``, ``B=8 (3D per 1)``)."""
    return f"B={batch_size}" + ("" if group_3d is None else f" (3D per {group_3d})")


def in_process_rates(args) -> dict:
    """The encoder's own frames/s at each setting, before any server exists (so nothing else
    competes): interleaved rounds of ``--repeats`` × 8 frames per setting."""
    from bifusion import BiFusionEncoder, EncodeOptions

    encoder = BiFusionEncoder(args.checkpoint, device=args.device)
    frames = real_frames(args.data)
    options = EncodeOptions(max_points=args.points)
    encoder.encode(frames[:2], options)  # warm-up
    frames_per_round = max(args.in_process_batch_sizes)
    settings = [(b, None) for b in args.in_process_batch_sizes]
    settings += [(b, 1) for b in args.in_process_batch_sizes if b > 1 and args.in_process_3d_per_frame]
    seconds = dict.fromkeys(settings, 0.0)
    for size, group in settings:  # untimed: a bigger batch allocates bigger pinned buffers
        encoder.group_3d = group
        encoder.encode([frames[i % len(frames)] for i in range(size)], options)
    for _ in range(args.repeats):
        for size, group in settings:
            encoder.group_3d = group
            batches = [
                [frames[(start + i) % len(frames)] for i in range(size)]
                for start in range(0, frames_per_round, size)
            ]
            started = time.perf_counter()
            for batch in batches:
                encoder.encode(batch, options)
            seconds[(size, group)] += time.perf_counter() - started
    encoder.group_3d = None
    rates = {setting_label(*s): round(args.repeats * frames_per_round / t, 3) for s, t in seconds.items()}
    best = max(rates, key=rates.get)
    batch_1 = rates[setting_label(1, None)]
    return {
        "device": str(encoder.device),
        "frames_per_s": rates,
        "best": {"setting": best, "frames_per_s": rates[best]},
        "frames_per_s_batch_1": batch_1,
        "latency_ms_batch_1": round(1000.0 / batch_1, 1),
    }


class ServerChild:
    """``python -m bifusion_server`` on a free port, stopped with SIGTERM."""

    def __init__(
        self,
        device: str,
        checkpoint: str | None = None,
        max_batch_size: int | str = "auto",
        max_batch_delay_ms: float = 5.0,
        max_queue: int = 64,
        instances: str = "auto",
        shared_memory: bool = False,
    ):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "server.log"
        command = [
            sys.executable, "-m", "bifusion_server", "--host", "127.0.0.1", "--port", str(self.port),
            "--metrics-port", "0", "--device", device, "--max-batch-size", str(max_batch_size),
            "--max-batch-delay-ms", str(max_batch_delay_ms), "--max-queue", str(max_queue),
            "--instances", instances,
        ]  # fmt: skip
        if checkpoint:
            command += ["--checkpoint", checkpoint]
        if shared_memory:
            command.append("--allow-shared-memory")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*IMPORT_PATHS, os.environ.get("PYTHONPATH", "")])}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        with BiFusionClient(self.address) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited:\n{self.log_path.read_text()}")
                try:
                    if client.health(timeout=2) == "SERVING":
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.5)
        raise TimeoutError("server did not become SERVING")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)


def response_sizes(address: str, folder_frame, points: int, transports) -> dict:
    """Bytes of one response per feature dtype, next to its raw tensor bytes."""
    sizes = {}
    with BiFusionClient(address) as client:
        feature_dim = client.model_info().feature_dim
        for dtype in dict.fromkeys(t for t in transports if t != "shm") or ("float32",):
            result = client.encode_request(
                request_from_folder_frame(folder_frame, max_points=points, output_dtype=dtype)
            )
            raw = result.num_points * point_bytes(feature_dim, dtype, world=False)
            sizes[dtype] = {
                "response_bytes": result.wire_bytes,
                "raw_tensor_bytes": raw,
                "ratio": round(result.wire_bytes / raw, 5),
            }
    return {"points": result.num_points, **sizes}


def batch_policy(address: str) -> dict:
    """The server's batch policy as GetModelInfo reports it."""
    with BiFusionClient(address) as client:
        info = client.model_info()
    policy = info.batch_policy
    setting = setting_label(info.limits.max_batch_size, policy.unet_frames or None)
    return {
        "setting": setting,
        "measured": policy.measured,
        "sweep_seconds": round(policy.sweep_seconds, 1),
        "sweep_ms_per_frame": {
            setting_label(t.batch_size, t.unet_frames or None): round(1000 * t.seconds_per_frame, 1)
            for t in policy.sweep
        },
        "sweep_calls": {setting_label(t.batch_size, t.unet_frames or None): t.calls for t in policy.sweep},
    }


def served_levels(
    address: str, transport: str, folder_frames, args, in_process: dict, policy: dict
) -> list[dict]:
    """Closed-loop load at each concurrency for one transport."""
    dtype = "float32" if transport == "shm" else transport
    requests = [
        request_from_folder_frame(f, max_points=args.points, output_dtype=dtype) for f in folder_frames
    ]

    def connect():
        return BiFusionClient(address, shared_memory=transport == "shm")

    best = in_process["best"]["frames_per_s"]
    batched = in_process["frames_per_s"].get(policy["setting"])  # None: a setting not measured in process
    levels = []
    for concurrency in args.concurrency:
        if args.frames_per_client:
            amount = {"frames": max(args.min_frames, args.frames_per_client * concurrency)}
        else:
            amount = {"duration_s": args.seconds_per_level}
        report = run_load(connect, requests, concurrency=concurrency, **amount)
        report["ratio_to_best_in_process"] = round(report["frames_per_s"] / best, 3)
        if batched:
            report["ratio_to_in_process_batched"] = round(report["frames_per_s"] / batched, 3)
        report["p50_ratio_to_in_process_batch_1"] = round(
            report["latency_ms"]["p50"] / in_process["latency_ms_batch_1"], 3
        )
        levels.append(report)
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--points", "--max-points", type=int, default=20_000, help="max_points per frame")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument(
        "--transports", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS, help="served transports"
    )
    parser.add_argument("--frames", type=int, default=None, help="real frames to cycle (default: all)")
    parser.add_argument(
        "--seconds-per-level", type=float, default=5.0, help="timed load per transport and concurrency"
    )
    parser.add_argument(
        "--frames-per-client", type=int, default=None, help="timed frames per client and level instead"
    )
    parser.add_argument(
        "--min-frames", type=int, default=8, help="with --frames-per-client: frames per level at least"
    )
    parser.add_argument("--max-batch-size", default="auto", help="the server's (auto or a number)")
    parser.add_argument(
        "--in-process-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="timed in process"
    )
    parser.add_argument(
        "--no-in-process-3d-per-frame",
        dest="in_process_3d_per_frame",
        action="store_false",
        help="time in process only whole batches (not also the U-Net and fusion per frame)",
    )
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument("--instances", default="auto", help="the server's --instances (auto, 1, 2, ...)")
    parser.add_argument("--repeats", type=int, default=2, help="in-process rounds over every setting")
    parser.add_argument("--note", default="", help="free text recorded with the results")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    started = time.perf_counter()
    in_process = in_process_rates(args)

    folder_frames = load_frames_folder(args.data, limit=args.frames)
    png = [request_from_folder_frame(f, max_points=args.points) for f in folder_frames]
    raw_formats = {"color_format": "raw", "depth_format": "raw"}
    raw = [request_from_folder_frame(f, max_points=args.points, **raw_formats) for f in folder_frames]
    server = ServerChild(
        args.device,
        args.checkpoint,
        args.max_batch_size,
        args.max_batch_delay_ms,
        max_queue=4 * max(args.concurrency),
        instances=args.instances,
        shared_memory="shm" in args.transports,
    )
    try:
        server.wait_serving()
        policy = batch_policy(server.address)
        served = {
            t: served_levels(server.address, t, folder_frames, args, in_process, policy)
            for t in args.transports
        }

        def connect():
            return BiFusionClient(server.address)

        transport = {
            name: run_load(connect, requests, concurrency=1, frames=args.min_frames)
            for name, requests in (("png", png), ("raw", raw))
        }
        sizes = response_sizes(server.address, folder_frames[0], args.points, args.transports)
    finally:
        server.stop()

    result = {
        "benchmark": "serve",
        "machine": describe(in_process["device"]),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "points_per_frame": args.points,
            "max_batch_size": args.max_batch_size,
            "max_batch_delay_ms": args.max_batch_delay_ms,
            "instances": args.instances,
            "load": (
                f"{args.frames_per_client} frames per client"
                if args.frames_per_client
                else f"{args.seconds_per_level} s per transport and concurrency"
            ),
            "transports": args.transports,
            "frames": f"{len(folder_frames)} real TUM fr1/xyz frames, 640×480, cycled",
            "request_encoding": "PNG colour + 16-bit PNG depth unless noted",
            "client": "closed loop, one channel per client, in a separate process on the same machine",
            "note": args.note,
        },
        "in_process": in_process,
        "server_batch_policy": policy,
        "served": served,  # by transport, one row per concurrency
        "transport_concurrency_1": {
            name: {k: r[k] for k in ("frames_per_s", "latency_ms", "request_bytes_per_frame")}
            for name, r in transport.items()
        },
        "response_bytes": sizes,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
