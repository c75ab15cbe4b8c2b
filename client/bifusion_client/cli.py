"""``bifusion-client``: encode frames to .npz, show model info, check health, generate load."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict

from . import encode_io
from .api import DEFAULT_MAX_MESSAGE_BYTES, BiFusionClient
from .frames_folder import load_frames_folder
from .loadgen import run_load
from .request import COLOR_FORMATS, DEPTH_FORMATS, build_request, request_from_folder_frame

DEFAULT_ADDRESS = "127.0.0.1:50051"


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.run(args))
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        sys.exit(1)
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument(
        "--address",
        default=os.environ.get("BIFUSION_ADDRESS", DEFAULT_ADDRESS),
        help=f"host:port of the server (env BIFUSION_ADDRESS; default {DEFAULT_ADDRESS})",
    )
    group.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (turns TLS on)")
    group.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    group.add_argument("--tls-cert", help="PEM client certificate, for mTLS")
    group.add_argument("--tls-key", help="PEM key of --tls-cert")
    group.add_argument("--tls-server-name", help="name to check the server's certificate against")
    group.add_argument(
        "--token",
        default=os.environ.get("BIFUSION_CLIENT_TOKEN"),
        help="bearer token (env BIFUSION_CLIENT_TOKEN)",
    )
    group.add_argument("--token-file", help="file holding the bearer token")
    group.add_argument("--timeout", type=float, default=None, help="per-call deadline, seconds")
    group.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)

    parser = argparse.ArgumentParser(
        prog="bifusion-client", description="Client of the BiFusion encoder service (numpy in, numpy out)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    encode = commands.add_parser(
        "encode", parents=[connection], help="encode frames: .npz, PLY, pictures, PointCloud2 bag, Rerun",
        description="Encode a ROS bag, a TUM sequence, a folder described by frames.json, or one "
        "colour/depth pair; write .npz, PLY, pictures, a PointCloud2 bag and/or a Rerun recording "
        "(docs/robotics.md).",
    )  # fmt: skip
    source = encode.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", type=Path, help="folder with frames.json (TUM-style layout)")
    source.add_argument(
        "--color",
        type=Path,
        help="colour image file (PNG or JPEG), sent as is (--color-format does not apply)",
    )
    encode.add_argument("--depth", type=Path, help="16-bit depth PNG registered to --color")
    encode.add_argument(
        "--depth-scale", type=float, default=1000.0, help="metres = value / scale (default 1000)"
    )
    for name in ("fx", "fy", "cx", "cy"):
        encode.add_argument(
            f"--{name}",
            type=float,
            help=f"intrinsics {name} in pixels (needed with --color; replaces the source's)",
        )
    encode.add_argument("--pose", nargs="+", help="cam_to_world: 16 numbers row-major, or a .npy/.txt file")
    encode.add_argument("--frame-id", help="frame id (with --color; default: the file name)")
    encode.add_argument(
        "--intrinsics-set",
        default="ros_default",
        help="intrinsics set of frames.json, or of TUM (with --tum)",
    )
    encode.add_argument("--limit", type=int, help="encode the first LIMIT frames of the source")
    encode.add_argument("--stream", action="store_true", help="send the frames over one EncodeStream call")
    encode_io.add_source_options(encode, source)
    encode_io.add_output_options(encode)
    _add_frame_options(encode)
    encode.set_defaults(run=run_encode)

    info = commands.add_parser("info", parents=[connection], help="print the model info as JSON")
    info.set_defaults(run=run_info)

    health = commands.add_parser(
        "health", parents=[connection], help="exit 0 only when the server reports SERVING"
    )
    health.add_argument("--service", default="", help="service name to ask about (default: overall)")
    health.set_defaults(run=run_health)

    bench = commands.add_parser(
        "bench", parents=[connection], help="load generator: latency percentiles and frames/s as JSON"
    )
    bench.add_argument("--folder", type=Path, required=True, help="folder with frames.json")
    bench.add_argument("--intrinsics-set", default="ros_default")
    bench.add_argument("--concurrency", type=int, default=4, help="concurrent clients (one channel each)")
    amount = bench.add_mutually_exclusive_group()
    amount.add_argument("--frames", type=int, help="frames to send in all (default 32)")
    amount.add_argument("--duration", type=float, help="seconds to keep sending")
    bench.add_argument("--warmup", type=int, default=1, help="untimed frames per client first")
    _add_frame_options(bench)
    bench.set_defaults(run=run_bench)
    return parser


def _add_frame_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("frame options")
    group.add_argument("--max-points", type=int, help="points per frame (default: the model's)")
    group.add_argument("--float16", action="store_true", help="features as float16 on the wire")
    group.add_argument("--world-points", action="store_true", help="also return world xyz per point")
    group.add_argument("--occlusion-tau", type=float, help="occlusion threshold for client points")
    group.add_argument("--color-format", choices=COLOR_FORMATS, default="png", help="how colour travels")
    group.add_argument("--depth-format", choices=DEPTH_FORMATS, default="png", help="how depth travels")


def connect(args) -> BiFusionClient:
    token = args.token
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    return BiFusionClient(
        args.address,
        tls_ca=args.tls_ca,
        tls=args.tls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        token=token,
        max_message_bytes=args.max_message_bytes,
        timeout=args.timeout,
    )


def frame_options(args) -> dict:
    return {
        "max_points": args.max_points,
        "float16": args.float16,
        "world_points": args.world_points,
        "occlusion_tau": args.occlusion_tau,
        "color_format": args.color_format,
        "depth_format": args.depth_format,
    }


def run_encode(args) -> int:
    options = frame_options(args)
    options["world_points"] = options["world_points"] or encode_io.wants_world_points(args)
    if args.color:
        request = _pair_request(args, **options)
        work = iter([(encode_io.pair_frame(args, parse_pose(args.pose) if args.pose else None), request)])
    else:
        work = ((f, request_from_folder_frame(f, **options)) for f in encode_io.open_frames(args))
    sinks = encode_io.open_sinks(args)
    try:
        with connect(args) as client:
            for frame, result in encode_io.encode_frames(client, work, args.stream):
                written = [sink.write(frame, result) for sink in sinks]
                summary = {
                    "frame_id": result.frame_id,
                    "path": str(written[0]) if args.out else None,
                    "num_points": result.num_points,
                    "valid_ratio": round(result.valid_ratio, 6),
                    "gate_mean": round(result.gate_mean, 6),
                    "model_id": result.model_id,
                }
                print(json.dumps(summary), flush=True)
    finally:
        encode_io.close_sinks(sinks)
    return 0


def _pair_request(args, **options):
    missing = [f"--{n}" for n in ("depth", "fx", "fy", "cx", "cy") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"--color needs {', '.join(missing)}")
    return build_request(
        args.color.read_bytes(),
        args.depth.read_bytes(),
        (args.fx, args.fy, args.cx, args.cy),
        cam_to_world=parse_pose(args.pose) if args.pose else None,
        depth_scale=args.depth_scale,
        frame_id=args.frame_id or args.color.stem,
        **options,
    )


def parse_pose(values: Sequence[str]) -> np.ndarray:
    """16 numbers, or one .npy / text file holding a 4×4 (or 16 numbers)."""
    if len(values) == 1:
        path = Path(values[0])
        pose = np.load(path) if path.suffix == ".npy" else np.loadtxt(path)
    else:
        pose = np.asarray([float(v) for v in values])
    pose = np.asarray(pose, dtype=np.float64)
    if pose.size != 16:
        raise ValueError(f"--pose needs 16 numbers (4×4 row-major), got {pose.size}")
    return pose.reshape(4, 4)


def run_info(args) -> int:
    with connect(args) as client:
        info = client.model_info()
    print(json.dumps(MessageToDict(info, preserving_proto_field_name=True), indent=2))
    return 0


def run_health(args) -> int:
    with connect(args) as client:
        try:
            status = client.health(args.service, timeout=args.timeout or 5.0)
        except grpc.RpcError as error:
            status = f"UNREACHABLE ({error.code().name}: {error.details()})"
    print(status)
    return 0 if status == "SERVING" else 1


def run_bench(args) -> int:
    frames = load_frames_folder(args.folder, intrinsics=args.intrinsics_set)
    requests = [request_from_folder_frame(frame, **frame_options(args)) for frame in frames]
    report = run_load(
        lambda: connect(args),
        requests,
        concurrency=args.concurrency,
        frames=None if args.duration else (args.frames or 32),
        duration_s=args.duration,
        warmup=args.warmup,
    )
    report["address"] = args.address
    report["options"] = {k: v for k, v in frame_options(args).items() if v not in (None, False)}
    print(json.dumps(report, indent=2))
    return 0 if not report["errors"] else 1
