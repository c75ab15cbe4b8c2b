"""Serving overhead: frames/s and latency through gRPC vs the in-process encoder, same run.

Measures, on the real TUM frames:
- the in-process encoder's frames/s, one frame per call and in batches of --max-batch-size;
- a ``python -m bifusion_server`` child loaded by closed-loop clients at each --concurrency
  (frames/s, p50/p95/p99 latency, mean batch size), and its ratio to the in-process rate;
- response bytes per frame (float32 and float16 features) against the raw tensor bytes;
- request transport: PNG vs raw colour/depth at concurrency 1 (bytes and latency).

Prints JSON (and writes it to --out when given).

    python bench/serve.py [--points 20000] [--concurrency 1 4 16] [--instances auto] \
        [--out bench/results/serve-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.encoder import DEFAULT_DATA, real_frames  # noqa: E402
from bench.machine import describe  # noqa: E402
from bifusion_client.api import BiFusionClient  # noqa: E402
from bifusion_client.frames_folder import load_frames_folder  # noqa: E402
from bifusion_client.loadgen import run_load  # noqa: E402
from bifusion_client.request import request_from_folder_frame  # noqa: E402

FEATURE_DIM = 256
# Per point besides features: alpha float32, valid bool, point index int64.
OTHER_BYTES_PER_POINT = 4 + 1 + 8


def in_process_rates(args) -> dict:
    """The encoder's own frames/s, before any server exists (so nothing else competes)."""
    from bifusion import BiFusionEncoder, EncodeOptions

    encoder = BiFusionEncoder(args.checkpoint, device=args.device)
    frames = real_frames(args.data)
    options = EncodeOptions(max_points=args.points)
    encoder.encode(frames[:2], options)  # warm-up
    batch = [frames[i % len(frames)] for i in range(args.max_batch_size)]

    def rate(groups) -> float:
        count, started = 0, time.perf_counter()
        for _ in range(args.repeats):
            for group in groups:
                encoder.encode(group, options)
                count += len(group)
        return round(count / (time.perf_counter() - started), 3)

    return {
        "device": str(encoder.device),
        "frames_per_s_batch_1": rate([[f] for f in batch]),
        f"frames_per_s_batch_{args.max_batch_size}": rate([batch]),
    }


class ServerChild:
    """``python -m bifusion_server`` on a free port, stopped with SIGTERM."""

    def __init__(self, args):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "server.log"
        command = [
            sys.executable, "-m", "bifusion_server", "--host", "127.0.0.1", "--port", str(self.port),
            "--metrics-port", "0", "--device", args.device, "--max-batch-size", str(args.max_batch_size),
            "--max-batch-delay-ms", str(args.max_batch_delay_ms),
            "--max-queue", str(4 * max(args.concurrency)), "--instances", args.instances,
        ]  # fmt: skip
        if args.checkpoint:
            command += ["--checkpoint", args.checkpoint]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

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


def response_sizes(address: str, request_fp32, request_fp16) -> dict:
    with BiFusionClient(address) as client:
        fp32 = client.encode_request(request_fp32)
        fp16 = client.encode_request(request_fp16)
    n = fp32.num_points
    raw32 = n * (FEATURE_DIM * 4 + OTHER_BYTES_PER_POINT)
    raw16 = n * (FEATURE_DIM * 2 + OTHER_BYTES_PER_POINT)
    return {
        "points": n,
        "float32": _size_row(fp32.wire_bytes, raw32),
        "float16": _size_row(fp16.wire_bytes, raw16),
    }


def _size_row(wire: int, raw: int) -> dict:
    return {"response_bytes": wire, "raw_tensor_bytes": raw, "ratio": round(wire / raw, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--points", type=int, default=20_000, help="max_points per frame")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--frames-per-client", type=int, default=3, help="timed frames per client and level")
    parser.add_argument("--min-frames", type=int, default=8, help="timed frames per level at least")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument("--instances", default="auto", help="the server's --instances (auto, 1, 2, ...)")
    parser.add_argument("--repeats", type=int, default=2, help="in-process passes over a batch")
    parser.add_argument("--note", default="", help="free text recorded with the results")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    started = time.perf_counter()
    in_process = in_process_rates(args)
    best_in_process = max(v for k, v in in_process.items() if k.startswith("frames_per_s"))

    folder_frames = load_frames_folder(args.data)
    png = [request_from_folder_frame(f, max_points=args.points) for f in folder_frames]
    raw_formats = {"color_format": "raw", "depth_format": "raw"}
    raw = [request_from_folder_frame(f, max_points=args.points, **raw_formats) for f in folder_frames]
    server = ServerChild(args)
    try:
        server.wait_serving()

        def connect():
            return BiFusionClient(server.address)

        served = []
        for concurrency in args.concurrency:
            frames = max(args.min_frames, args.frames_per_client * concurrency)
            report = run_load(connect, png, concurrency=concurrency, frames=frames)
            report["ratio_to_in_process"] = round(report["frames_per_s"] / best_in_process, 3)
            served.append(report)
        transport = {
            name: run_load(connect, requests, concurrency=1, frames=args.min_frames)
            for name, requests in (("png", png), ("raw", raw))
        }
        fp16 = request_from_folder_frame(folder_frames[0], max_points=args.points, float16=True)
        sizes = response_sizes(server.address, png[0], fp16)
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
            "frames": f"{len(folder_frames)} real TUM fr1/xyz frames, 640×480, cycled",
            "request_encoding": "PNG colour + 16-bit PNG depth unless noted",
            "client": "closed loop, one channel per client, in a separate process on the same machine",
            "note": args.note,
        },
        "in_process": in_process,
        "served": served,
        "transport_concurrency_1": {
            name: {k: r[k] for k in ("frames_per_s", "latency_ms", "request_bytes_per_frame")}
            for name, r in transport.items()
        },
        "response_bytes": sizes,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
