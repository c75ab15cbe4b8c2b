"""Our server against the same encoder behind Ray Serve and NVIDIA Triton: same run, same load generator.

The contenders (``--contenders``, default all) answer the same real TUM frames:
- ``ours``: a ``python -m bifusion_server`` child (dynamic batching), PNG in, float32 out;
- ``ours_shm``: the same server, float32 outputs written into the client's shared memory;
- ``ray_grpc``: Ray Serve's gRPC proxy with our proto (bench/peers/ray_serve_app.py);
- ``ray_http``: Ray Serve's HTTP proxy, the serialised request as a binary POST body;
- ``triton_grpc``: Triton's own gRPC front end, raw-array tensors in and out
  (bench/peers/triton_model.py, driven by ``tritonclient.grpc``);
- ``triton_shm``: the same, inputs and outputs through Triton's system shared memory.
At each --concurrency, --rounds rounds run each contender once, in an order that rotates
from round to round, all driven by ``bifusion_client.loadgen.run_load``. Every response of
every contender is compared with our server's answer to the same frame sent alone.

Ray and Triton are benchmark dependencies only, in their own venv: scripts/setup_peers.sh.
Prints JSON (and writes it to --out when given).

    .venv-peers/bin/python bench/peer_ray_serve.py [--concurrency 1 4 16 64] [--rounds 2]
        [--contenders ours triton_grpc triton_shm ray_grpc] [--out bench/results/peer-triton-cpu.json]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.encoder import DEFAULT_DATA  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.report import emit  # noqa: E402
from bench.serve import ServerChild  # noqa: E402
from bench.threads import rotated  # noqa: E402
from bifusion_client.api import BiFusionClient  # noqa: E402
from bifusion_client.frames_folder import load_frames_folder  # noqa: E402
from bifusion_client.loadgen import run_load  # noqa: E402
from bifusion_client.request import request_from_folder_frame  # noqa: E402
from bifusion_client.result import EncodeResult  # noqa: E402
from bifusion_server.decode import decode_request  # noqa: E402
from bifusion_wire import encoder_pb2 as pb  # noqa: E402

CONTENDERS = ("ours", "ours_shm", "ray_grpc", "ray_http", "triton_grpc", "triton_shm")
# Each peer contender is compared with ours over the same transport kind.
BASELINE = {"ray_grpc": "ours", "ray_http": "ours", "triton_grpc": "ours", "triton_shm": "ours_shm"}
# Features are unit vectors; a frame batched with others may see float32 products summed
# in another order (the design allows an ulp or so), so allow 1e-5 and report bitwise too.
FEATURE_ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HttpStatusError(grpc.RpcError):
    """A failed HTTP call, counted by the load generator like a failed RPC."""

    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INTERNAL


class HttpEncoderClient:
    """``EncodeFrameRequest`` bytes as a POST body over one keep-alive connection."""

    def __init__(self, host: str, port: int, path: str):
        self._connection = http.client.HTTPConnection(host, port, timeout=300)
        self._path = path

    def encode_request(self, request: pb.EncodeFrameRequest, timeout: float | None = None) -> EncodeResult:
        self._connection.request(
            "POST",
            self._path,
            body=request.SerializeToString(),
            headers={"Content-Type": "application/x-protobuf"},
        )
        answer = self._connection.getresponse()
        body = answer.read()
        if answer.status != 200:
            raise HttpStatusError(answer.status, body)
        return EncodeResult.from_response(pb.EncodeFrameResponse.FromString(body))

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> HttpEncoderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Agreement:
    """Every response of one contender against the reference answer for its frame."""

    def __init__(self, reference: dict[str, EncodeResult]):
        self._reference = reference
        self._lock = threading.Lock()
        self.checked = 0
        self.bitwise_equal = 0
        self.max_abs_diff = 0.0
        self.failed = 0
        self.mismatches: list[str] = []  # the first few
        self.unet_ms_per_frame: dict[int, list[float]] = {}  # by concurrency

    def check(self, result: EncodeResult, concurrency: int) -> None:
        want = self._reference[result.frame_id]
        problem = None
        if not (
            np.array_equal(result.valid, want.valid)
            and np.array_equal(result.point_indices, want.point_indices)
        ):
            problem = "valid or point_indices differ"
        elif result.features.shape != want.features.shape:
            problem = f"features shape {result.features.shape} != {want.features.shape}"
        diff = 0.0
        same = np.array_equal(result.features, want.features) and np.array_equal(result.alpha, want.alpha)
        if problem is None and not same:  # the exact comparison is cheap; measure only a difference
            diff = float(
                max(np.abs(result.features - want.features).max(), np.abs(result.alpha - want.alpha).max())
            )
            if not diff <= FEATURE_ATOL:  # NaN included
                problem = f"features/alpha differ by up to {diff:.3g}"
        exact = problem is None and diff == 0.0
        with self._lock:
            self.checked += 1
            self.bitwise_equal += exact
            self.max_abs_diff = max(self.max_abs_diff, diff)
            self.failed += problem is not None
            if problem and len(self.mismatches) < 5:
                self.mismatches.append(f"{result.frame_id}: {problem}")
            if "unet" in result.stage_ms:  # per batch: share it out over the batch's frames
                per_frame = result.stage_ms["unet"] / max(1, result.batch_size)
                self.unet_ms_per_frame.setdefault(concurrency, []).append(per_frame)

    def unet_ms(self, concurrency: int) -> float | None:
        """Median U-Net ms per frame in this contender's responses at ``concurrency``."""
        times = self.unet_ms_per_frame.get(concurrency)
        return round(statistics.median(times), 1) if times else None

    def summary(self) -> dict:
        return {
            "responses_checked": self.checked,
            "bitwise_equal": self.bitwise_equal,
            "within_tolerance": self.checked - self.failed,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": FEATURE_ATOL,
            "mismatches": self.mismatches,
        }


class Checked:
    """A client whose every answer goes through an :class:`Agreement` before the load
    generator sees it."""

    def __init__(self, client, agreement: Agreement, concurrency: int):
        self._client = client
        self._agreement = agreement
        self._concurrency = concurrency

    def encode_request(self, request, timeout=None):
        result = self._client.encode_request(request, timeout=timeout)
        self._agreement.check(result, self._concurrency)
        return result

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._client.close()


class RayPeer:
    """A local Ray cluster serving :class:`bench.peers.ray_serve_app.RayEncoder`."""

    def __init__(self, args):
        try:
            import ray
            from ray import serve
        except ImportError:
            sys.exit("Ray Serve is not installed in this venv: run scripts/setup_peers.sh")
        # Ray's workers (proxies, replica) must import bifusion, bifusion_wire and bench.peers.
        paths = [str(ROOT), str(ROOT / "client"), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        from bench.peers.ray_serve_app import SERVICER, RayEncoder

        self.grpc_port, self.http_port = free_port(), free_port()
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        cpus = ray.cluster_resources().get("CPU", 1)
        gpus = (
            1
            if args.device.startswith("cuda")
            or (args.device == "auto" and ray.cluster_resources().get("GPU"))
            else 0
        )
        serve.start(
            http_options={"host": "127.0.0.1", "port": self.http_port},
            grpc_options={"port": self.grpc_port, "grpc_servicer_functions": [SERVICER]},
        )
        app = RayEncoder.options(
            ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
            # Room for a full batch queued behind the one running, and every client's frame.
            max_ongoing_requests=max(2 * args.max_batch_size, max(args.concurrency)),
        ).bind(args.checkpoint, args.device, args.max_batch_size, args.max_batch_delay_ms / 1000.0)
        handle = serve.run(app, name="bifusion", route_prefix="/encode")
        self.thread_settings = handle.thread_settings.remote().result()
        self.settings = {
            "ray": ray.__version__,
            "replicas": 1,
            "replica_cpus": cpus,
            "replica_gpus": gpus,
            "serve_batch": {
                "max_batch_size": args.max_batch_size,
                "batch_wait_timeout_s": args.max_batch_delay_ms / 1000,
            },
        }

    def connect_grpc(self) -> BiFusionClient:
        return BiFusionClient(f"127.0.0.1:{self.grpc_port}")

    def connect_http(self) -> HttpEncoderClient:
        return HttpEncoderClient("127.0.0.1", self.http_port, "/encode")

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


class TritonPeer:
    """Triton serving :mod:`bench.peers.triton_model`, and its clients."""

    def __init__(self, args, requests: list[pb.EncodeFrameRequest], feature_dim: int):
        from bench.peers.triton import TritonServer
        from bench.peers.triton_tensors import inputs_from_frame
        from bifusion import Limits

        # The very arrays our server decodes from the same requests, as Triton tensors.
        self.inputs = {}
        for request in requests:
            frame = decode_request(request, Limits()).frame
            self.inputs[request.frame_id] = inputs_from_frame(frame, request.options.max_points)
        self.max_points, self.feature_dim = args.points, feature_dim
        self.server = TritonServer(
            (free_port(), free_port(), free_port()),
            args.device,
            args.max_batch_size,
            args.max_batch_delay_ms,
            args.checkpoint,
            instances=int(args.instances),
            import_paths=[str(ROOT), str(ROOT / "client")],
        )
        try:
            self.server.wait_ready()
        except BaseException:
            self.server.stop()
            raise
        self.settings = {
            **self.server.versions(),
            "backend": "python (bench/peers/triton_model.py), tritonserver from nvidia-pytriton",
            "config_pbtxt": self.server.config,
            "request": "raw COLOR uint8 + DEPTH uint16 tensors; float32 FEATURES out",
        }

    def connect(self, shared_memory: bool):
        from bench.peers.triton import TritonEncoderClient

        return TritonEncoderClient(
            self.server.address, self.inputs, shared_memory, self.max_points, self.feature_dim
        )

    def stop(self) -> None:
        self.server.stop()


def combine(rounds: list[dict]) -> dict:
    """One contender's rounds at one concurrency: frames/s over all rounds' frames and wall
    time; latency percentiles as the median of the rounds'."""
    frames = sum(r["frames"] for r in rounds)
    wall = sum(r["wall_s"] for r in rounds)
    errors: dict[str, int] = {}
    for r in rounds:
        for code, count in r["errors"].items():
            errors[code] = errors.get(code, 0) + count
    return {
        "frames": frames,
        "wall_s": round(wall, 3),
        "frames_per_s": round(frames / wall, 3) if wall else 0.0,
        "p50_ms": round(statistics.median(r["latency_ms"]["p50"] for r in rounds), 1),
        "p95_ms": round(statistics.median(r["latency_ms"]["p95"] for r in rounds), 1),
        "mean_batch_size": round(statistics.mean(r["mean_batch_size"] for r in rounds), 2),
        "errors": errors,
        "rounds_frames_per_s": [r["frames_per_s"] for r in rounds],
    }


def main() -> None:
    args = parse_args()
    # Ray's driver prints its workers' notices to stdout: keep stdout for the JSON alone.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    emit(result, args.out)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", type=int, default=20_000, help="max_points per frame")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--frames-per-client", type=int, default=2, help="timed frames per client and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed frames per client and round")
    parser.add_argument("--min-frames", type=int, default=6, help="timed frames per round at least")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per concurrency (order rotates)")
    parser.add_argument(
        "--max-batch-size",
        default="8",
        help="ours' --max-batch-size (N or auto); the peers get the same",
    )
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0, help="for every server")
    parser.add_argument("--instances", default="1", help="model instances: our --instances, Triton's count")
    parser.add_argument("--note", default="", help="free text recorded with the results")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if "ours" not in args.contenders:  # the reference answers come from it
        args.contenders.insert(0, "ours")
    args.contenders = [c for c in CONTENDERS if c in args.contenders]
    return args


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    load_before = os.getloadavg()
    folder_frames = load_frames_folder(args.data)
    requests = [request_from_folder_frame(f, max_points=args.points) for f in folder_frames]

    server = ServerChild(
        args.device,
        args.checkpoint,
        args.max_batch_size,
        args.max_batch_delay_ms,
        max_queue=4 * max(args.concurrency),
        instances=args.instances,
        shared_memory="ours_shm" in args.contenders,
    )
    contenders = args.contenders
    ray = triton = None
    try:
        server.wait_serving()
        with BiFusionClient(server.address) as client:  # each frame alone: the reference
            reference = {r.frame_id: client.encode_request(r, timeout=300) for r in requests}
            info = client.model_info()
        feature_dim = info.feature_dim
        # The peers get our largest batch: the number given, or what "auto" chose at warm-up
        # (the peers' encoders run each batch whole; "auto" may also split ours' 3D branch).
        args.max_batch_size = info.limits.max_batch_size
        ours_policy = {
            "max_batch_size": info.limits.max_batch_size,
            "measured": info.batch_policy.measured,
            "unet_frames": info.batch_policy.unet_frames,
        }
        connect = {
            "ours": lambda: BiFusionClient(server.address),
            "ours_shm": lambda: BiFusionClient(server.address, shared_memory=True),
        }
        if {"ray_grpc", "ray_http"} & set(contenders):
            ray = RayPeer(args)
            connect.update(ray_grpc=ray.connect_grpc, ray_http=ray.connect_http)
        if {"triton_grpc", "triton_shm"} & set(contenders):
            triton = TritonPeer(args, requests, feature_dim)
            connect.update(triton_grpc=lambda: triton.connect(False), triton_shm=lambda: triton.connect(True))
        agreement = {name: Agreement(reference) for name in contenders}
        for name in contenders:  # warm-up: first calls, Ray's routing tables
            run_load(lambda n=name: Checked(connect[n](), agreement[n], 0), requests, concurrency=1, frames=2)

        levels = []
        for level_index, concurrency in enumerate(args.concurrency):
            frames = max(args.min_frames, args.frames_per_client * concurrency)
            rounds: dict[str, list[dict]] = {name: [] for name in contenders}
            for round_index in range(args.rounds):
                for name in rotated(contenders, level_index + round_index):
                    report = run_load(
                        lambda n=name, c=concurrency: Checked(connect[n](), agreement[n], c),
                        requests,
                        concurrency=concurrency,
                        frames=frames,
                        warmup=args.warmup,
                    )
                    rounds[name].append(report)
            row = {"concurrency": concurrency}
            for name in contenders:
                row[name] = {
                    **combine(rounds[name]),
                    "unet_ms_per_frame": agreement[name].unet_ms(concurrency),
                }
            for peer_name, baseline in BASELINE.items():
                if peer_name not in contenders or baseline not in contenders:
                    continue
                ours, theirs = row[baseline], row[peer_name]
                row[f"{baseline}_vs_{peer_name}"] = {
                    "frames_per_s_ratio": round(ours["frames_per_s"] / theirs["frames_per_s"], 3)
                    if theirs["frames_per_s"]
                    else None,
                    "p50_lower": ours["p50_ms"] < theirs["p50_ms"],
                }
            levels.append(row)
        thread_settings = {"ray_replica": ray.thread_settings} if ray else {}
    finally:
        for peer in (ray, triton):
            if peer is not None:
                peer.stop()
        server.stop()

    return {
        "benchmark": "peers",
        "machine": describe(args.device),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "points_per_frame": args.points,
            "frames": f"{len(folder_frames)} real TUM fr1/xyz frames, 640×480, cycled",
            "contenders": contenders,
            "request_encoding": "PNG colour + 16-bit PNG depth (Triton: raw arrays); float32 features out",
            "timed_frames_per_round": {
                c: max(args.min_frames, args.frames_per_client * c) for c in args.concurrency
            },
            "rounds": args.rounds,
            "untimed_frames_per_client_and_round": args.warmup,
            "ours": {
                **ours_policy,
                "max_batch_delay_ms": args.max_batch_delay_ms,
                "instances": args.instances,
            },
            "ray": ray.settings if ray is not None else None,
            "triton": triton.settings if triton is not None else None,
            "client": "bifusion_client.loadgen.run_load: closed loop, one connection per client",
            "note": args.note,
        },
        "thread_settings": thread_settings,
        "agreement_with_ours_alone": {name: agreement[name].summary() for name in contenders},
        "results": levels,
        "wall_s": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    main()
