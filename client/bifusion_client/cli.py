"""``bifusion-client``: encode frames (.npz, PLY, pictures, bags, Rerun), show model info, check health,
generate load."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import os
import sys
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
from PIL import Image, UnidentifiedImageError

from . import encode_io
from .api import DEFAULT_MAX_MESSAGE_BYTES, BiFusionClient
from .arg_types import (
    DEFAULT_PORT,
    address,
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from .depth_check import depth_scale_warning, median_depth_m
from .frames_folder import FolderFrame, load_frames_folder
from .loadgen import run_load
from .make_bag import DEFAULT_CAMERA_FRAME, DEFAULT_WORLD_FRAME, write_frames_bag
from .model_info import model_info_dict
from .new_outputs import NewOutputs
from .progress import emit, progress_bar, warn
from .request import COLOR_FORMATS, DEPTH_FORMATS, request_from_folder_frame
from .sinks.bag_writer import BAG_FORMATS, bag_format_for
from .sources import read_folder

DEFAULT_ADDRESS = "127.0.0.1:50051"
# What gRPC says when a channel could not connect (refused, no route, unknown host).
NOT_CONNECTED = ("failed to connect", "connection refused", "dns resolution failed", "name resolution")
DEFAULT_DEPTH_SCALE = 1000.0
DESCRIPTION_WIDTH = 90
# Flags of the --color/--depth pair; other sources carry their own (frames.json, TUM, a bag's encodings).
PAIR_FLAGS = ("depth", "depth_scale", "pose", "frame_id")
REACH_TIMEOUT_S = 20.0  # the first call, when --timeout is not given: a server that is there answers at once


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.run(args))
    except grpc.RpcError as error:
        print(f"error: {rpc_error_text(error, args.address)}", file=sys.stderr)
        sys.exit(1)
    except KeyError as error:  # str() of a KeyError is the repr of its message: print the message
        print(f"error: {error.args[0] if error.args else error}", file=sys.stderr)
        sys.exit(1)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def rpc_error_text(error: grpc.RpcError, address: str) -> str:
    """``CODE: details``; when the channel could not connect at all, the address it tried."""
    text = f"{error.code().name}: {error.details()}"
    if error.code() == grpc.StatusCode.UNAVAILABLE and any(
        words in (error.details() or "").lower() for words in NOT_CONNECTED
    ):
        text += f" (is the server running at {address}?)"
    return text


class _Parser(argparse.ArgumentParser):
    """Reports an unknown flag with the usage of the subcommand it followed, not the top level's,
    and the nearest flag that exists."""

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.subcommands.get(getattr(parsed, "command", None), self)
            flags = [flag for action in command._actions for flag in action.option_strings]
            unknown = [extra for extra in extras if extra.startswith("-")]
            near = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1) if unknown else []
            hint = f" (did you mean {near[0]}?)" if near else ""
            command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed


def _wrapped(text: str) -> str:
    """A description as lines argparse keeps (descriptions are not re-wrapped: see _HelpFormatter)."""
    return textwrap.fill(text, DESCRIPTION_WIDTH)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless it is None/off, or the help already says it);
    keeps descriptions' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument(
        "--address",
        type=address,
        default=os.environ.get("BIFUSION_ADDRESS", DEFAULT_ADDRESS),
        help=f"host[:port] of the server, port {DEFAULT_PORT} when none is given (env BIFUSION_ADDRESS)",
    )
    group.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (turns TLS on)")
    group.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    group.add_argument("--tls-cert", help="PEM client certificate, for mTLS")
    group.add_argument("--tls-key", help="PEM key of --tls-cert")
    group.add_argument("--tls-server-name", help="name to check the server's certificate against")
    # No default shown: the token must not appear in --help.
    group.add_argument("--token", help="bearer token (default: env BIFUSION_CLIENT_TOKEN)")
    group.add_argument("--token-file", help="file holding the bearer token")
    group.add_argument("--timeout", type=positive_float, help="per-call deadline, seconds (default: none)")
    group.add_argument(
        "--max-message-bytes",
        type=positive_int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest message sent or received",
    )

    parser = _Parser(
        prog="bifusion-client",
        description="Client of the BiFusion encoder service (numpy in, numpy out).",
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    parser.subcommands = commands.choices

    encode = commands.add_parser(
        "encode", parents=[connection], formatter_class=_HelpFormatter,
        help="encode frames: .npz, PLY, pictures, PointCloud2 bag, Rerun",
        description="Encode a ROS bag, a TUM sequence, a folder described by frames.json, or one "
        "colour/depth pair; write .npz, PLY, pictures, a PointCloud2 bag and/or a Rerun recording "
        "(docs/robotics.md).\n"
        "Prints one JSON line per frame on stdout; a progress bar with rate and ETA on stderr "
        "when it is a terminal.",
    )  # fmt: skip
    source = encode.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", type=Path, help="folder with frames.json (TUM-style layout)")
    source.add_argument(
        "--color",
        type=Path,
        help="colour image file (PNG or JPEG), sent as is (--color-format does not apply)",
    )
    encode.add_argument("--depth", type=Path, help="16-bit depth PNG registered to --color (same size)")
    encode.add_argument(
        "--depth-scale",
        type=positive_float,
        help=f"with --depth: metres = value / scale (default: {DEFAULT_DEPTH_SCALE})",
    )
    encode.add_argument(
        "--fx",
        type=positive_float,
        help="focal length x, pixels (needed with --color; replaces the source's)",
    )
    encode.add_argument(
        "--fy",
        type=positive_float,
        help="focal length y, pixels (needed with --color; replaces the source's)",
    )
    encode.add_argument(
        "--cx",
        type=finite_float,
        help="principal point x, pixels (needed with --color; replaces the source's)",
    )
    encode.add_argument(
        "--cy",
        type=finite_float,
        help="principal point y, pixels (needed with --color; replaces the source's)",
    )
    encode.add_argument(
        "--pose", nargs="+", help="T_world_cam: 16 numbers row-major, or a .npy/.txt file (default: identity)"
    )
    encode.add_argument("--frame-id", help="with --color: frame id (default: the file name)")
    encode.add_argument(
        "--intrinsics-set",
        default="ros_default",
        help="intrinsics set of frames.json, or of TUM (with --tum)",
    )
    encode.add_argument("--limit", type=positive_int, help="encode the first LIMIT frames of the source")
    encode.add_argument("--stream", action="store_true", help="send the frames over one EncodeStream call")
    encode_io.add_source_options(encode, source)
    encode_io.add_output_options(encode)
    _add_frame_options(encode)
    encode.set_defaults(run=run_encode)

    info = commands.add_parser(
        "info", parents=[connection], formatter_class=_HelpFormatter,
        help="print the model info as JSON (typed values, config as an object)",
        description=_wrapped(
            "Print the server's ModelInfo as JSON: the model, its device and checkpoint, "
            "the server's limits (max_points, message size, batch size), every field typed and the "
            "checkpoint config as a nested object."
        ),
    )  # fmt: skip
    info.set_defaults(run=run_info)

    health = commands.add_parser(
        "health", parents=[connection], formatter_class=_HelpFormatter,
        help="exit 0 only when the server reports SERVING",
        description=_wrapped(
            "Ask the server's grpc.health.v1 service and print its status: SERVING (exit 0), "
            "NOT_SERVING while the model loads, warms up or drains, or UNREACHABLE (exit 1 for both)."
        ),
    )  # fmt: skip
    health.add_argument("--service", default="", help="service name to ask about ('' = overall)")
    health.set_defaults(run=run_health)

    bench = commands.add_parser(
        "bench", parents=[connection], formatter_class=_HelpFormatter,
        help="load generator: latency percentiles and frames/s as JSON",
        description=_wrapped(
            "Send the frames of a frames.json folder from concurrent clients (one channel "
            "each) and print JSON: frames/s, p50/p95/p99/mean/max latency, mean batch size, request "
            "and response bytes per frame, errors by status code. Exit 1 when any call failed."
        ),
    )  # fmt: skip
    bench.add_argument("--folder", type=Path, required=True, help="folder with frames.json")
    bench.add_argument("--intrinsics-set", default="ros_default", help="intrinsics set of frames.json")
    bench.add_argument(
        "--concurrency", type=positive_int, default=4, help="concurrent clients (one channel each)"
    )
    amount = bench.add_mutually_exclusive_group()
    amount.add_argument("--frames", type=positive_int, help="frames to send in all (default: 32)")
    amount.add_argument("--duration", type=positive_float, help="seconds to keep sending")
    bench.add_argument("--warmup", type=non_negative_int, default=1, help="untimed frames per client first")
    _add_frame_options(bench)
    bench.set_defaults(run=run_bench)

    make_bag = commands.add_parser(
        "make-bag", formatter_class=_HelpFormatter,
        help="write a ROS bag from a frames.json folder, to try encode --bag on",
        description=_wrapped(
            "Write the frames of a frames.json folder (e.g. ../shared/data/tum_fr1_xyz) into a "
            "ROS bag as a camera driver records them: colour (rgb8), depth (16UC1 mm), CameraInfo and the "
            "poses as tf, at each frame's colour time stamp. The topics are encode's defaults, so "
            "'encode --bag PATH' reads it without topic flags (docs/robotics.md). Needs [ros]."
        ),
    )  # fmt: skip
    make_bag.add_argument("--folder", type=Path, required=True, help="folder with frames.json")
    make_bag.add_argument("--intrinsics-set", default="ros_default", help="intrinsics set of frames.json")
    make_bag.add_argument("--limit", type=positive_int, help="the first LIMIT frames only")
    make_bag.add_argument(
        "--out-bag", type=Path, required=True, metavar="PATH",
        help="a *.bag path gives a ROS 1 bag, anything else a ROS 2 bag folder in MCAP; never overwritten",
    )  # fmt: skip
    make_bag.add_argument("--out-bag-format", choices=BAG_FORMATS, help="ros1, sqlite3 or mcap, explicitly")
    make_bag.add_argument(
        "--color-topic", default=encode_io.DEFAULT_COLOR_TOPIC, metavar="TOPIC", help="colour images (rgb8)"
    )
    make_bag.add_argument(
        "--depth-topic",
        default=encode_io.DEFAULT_DEPTH_TOPIC,
        metavar="TOPIC",
        help="depth images (16UC1, mm)",
    )
    make_bag.add_argument("--world-frame", default=DEFAULT_WORLD_FRAME, help="tf parent of the camera")
    make_bag.add_argument("--camera-frame", default=DEFAULT_CAMERA_FRAME, help="the images' frame_id")
    make_bag.set_defaults(run=run_make_bag)
    return parser


def _add_frame_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("frame options")
    group.add_argument(
        "--max-points", type=positive_int, help="points per frame (default: the model's default_max_points)"
    )
    group.add_argument("--float16", action="store_true", help="features as float16 on the wire")
    group.add_argument("--world-points", action="store_true", help="also return world xyz per point")
    group.add_argument(
        "--occlusion-tau",
        type=non_negative_float,
        help="occlusion threshold for client points (default: the model's; 0 disables)",
    )
    group.add_argument("--color-format", choices=COLOR_FORMATS, default="png", help="how colour travels")
    group.add_argument("--depth-format", choices=DEPTH_FORMATS, default="png", help="how depth travels")
    group.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none without a TTY anyway)"
    )


def connect(args) -> BiFusionClient:
    token = args.token or os.environ.get("BIFUSION_CLIENT_TOKEN")
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
    """Everything that can fail at once fails before an output exists: the flags, the source's
    first frame, the server (reached for its limits). A run that ends with no frame of points
    written removes what it created, so the corrected re-run finds nothing in its way."""
    encode_io.check_outputs(args)
    _check_pair_flags(args)
    options = frame_options(args)
    options["world_points"] = options["world_points"] or encode_io.wants_world_points(args)
    if args.color:
        first = _pair_frame(args)  # the files' own bytes go on the wire; the outputs need pixels
        work = iter([(encode_io.pair_frame(args, first.cam_to_world), first)])
        total = 1
    else:
        frames = encode_io.open_frames(args)
        total = len(frames) if hasattr(frames, "__len__") else getattr(frames, "count", None)
        first, frames = encode_io.read_first(frames, args)
        work = ((frame, frame) for frame in frames)
    _check_depth_scale(first, args)
    with connect(args) as client:
        info = reach(client, args)
        created = NewOutputs(encode_io.output_paths(args))
        sinks: list = []
        count = with_points = 0
        try:
            sinks = encode_io.open_sinks(args)
            requests = ((frame, _frame_request(source, options)) for frame, source in work)
            with progress_bar(total, "encode", not args.no_progress) as bar:
                for frame, result in encode_io.encode_frames(client, requests, args.stream):
                    written = [sink.write(frame, result) for sink in sinks]
                    count += 1
                    with_points += result.num_points > 0
                    summary = {
                        "frame_id": result.frame_id,
                        "path": str(written[0]) if args.out else None,
                        "num_points": result.num_points,
                        "valid_ratio": round(result.valid_ratio, 6),
                        "gate_mean": round(result.gate_mean, 6),
                        "model_id": result.model_id,
                    }
                    emit(json.dumps(summary))
                    bar.update()
            if not with_points:
                raise ValueError(_no_points_message(count, first, info, args))
        except BaseException:
            with contextlib.suppress(Exception):
                encode_io.close_sinks(sinks)
            if not with_points:
                created.remove()
            raise
        encode_io.close_sinks(sinks)
    return 0


def _check_pair_flags(args) -> None:
    """The pair's own flags with another source would be ignored without a word: refuse them."""
    if args.color:
        args.depth_scale = args.depth_scale or DEFAULT_DEPTH_SCALE
        return
    given = [f"--{name.replace('_', '-')}" for name in PAIR_FLAGS if getattr(args, name) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)}: only for --color/--depth; {encode_io.source_name(args)} carries its own "
            "depth scale, poses and frame ids"
        )


def reach(client: BiFusionClient, args):
    """The server's ModelInfo, asked before any output is created: the server is there, the
    token is right, and ``--max-points`` is within its limit (named as the user typed it)."""
    info = client.model_info(timeout=args.timeout or REACH_TIMEOUT_S)
    limit = info.limits.max_points
    if limit and args.max_points and args.max_points > limit:
        raise ValueError(
            f"--max-points {args.max_points} is over the server's limit of {limit} points per frame "
            f"(ModelInfo limits.max_points); ask for {limit} or fewer"
        )
    return info


def _no_points_message(count: int, first, info, args) -> str:
    """Why a run whose every frame came back empty is an error, and what to check."""
    config = model_info_dict(info).get("config")
    low, high = (
        (config.get("min_depth"), config.get("max_depth")) if isinstance(config, dict) else (None, None)
    )
    band = (
        f"the model's {low:g}–{high:g} m"
        if low is not None and high is not None
        else "the model's depth range"
    )
    median = median_depth_m(first.depth, first.depth_scale)
    whose = "the first frame's" if count > 1 else "its"
    seen = (
        f"{whose} depth image has no readings"
        if median is None
        else f"{whose} median depth is {median:.2f} m at depth scale {first.depth_scale:g}"
    )
    flag = " (--depth-scale)" if args.color else ""
    frames = "the frame" if count == 1 else f"all {count} frames"
    return (
        f"{frames} came back with 0 points: no depth within {band} ({seen}); is the depth "
        f"scale right{flag}? Nothing was kept."
    )


def _frame_request(frame, options: dict):
    try:
        return request_from_folder_frame(frame, **options)
    except ValueError as error:
        raise ValueError(f"frame {frame.frame_id}: {error}") from None


def _warn_if_misscaled(frames: Iterable[FolderFrame], args) -> Iterator[FolderFrame]:
    """Passes the frames through; checks the first one's depth scale (a setting, not per frame)."""
    for index, frame in enumerate(frames):
        if index == 0:
            _check_depth_scale(frame, args)
        yield frame


def _check_depth_scale(frame, args) -> None:
    if frame.depth is None:
        return
    depth_file = getattr(args, "depth", None)
    where = f"--depth {depth_file}" if depth_file else f"frame {frame.frame_id}"
    warning = depth_scale_warning(frame.depth, frame.depth_scale, where)
    if warning:
        warn(warning)


def _pair_frame(args) -> FolderFrame:
    missing = [f"--{n}" for n in ("depth", "fx", "fy", "cx", "cy") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"--color needs {', '.join(missing)}")
    color, color_image = _read_image(args.color, "--color", "a PNG or JPEG colour image")
    depth, depth_image = _read_image(args.depth, "--depth", "a 16-bit greyscale PNG")
    if depth_image.format != "PNG" or depth_image.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise ValueError(
            f"--depth {args.depth}: expected a 16-bit greyscale PNG, got a {depth_image.format} "
            f"image of mode {depth_image.mode}"
        )
    if depth_image.size != color_image.size:
        raise ValueError(
            f"--depth {args.depth} is {_size(depth_image)} but --color {args.color} is "
            f"{_size(color_image)}: depth must be registered to the colour image (same size)"
        )
    return FolderFrame(
        frame_id=args.frame_id or args.color.stem,
        color=color,
        depth=depth,
        depth_scale=args.depth_scale,
        intrinsics={"fx": args.fx, "fy": args.fy, "cx": args.cx, "cy": args.cy},
        cam_to_world=parse_pose(args.pose) if args.pose else None,
    )


def _read_image(path: Path, flag: str, what: str) -> tuple[bytes, Image.Image]:
    """The file's bytes and its header (Pillow opens lazily: nothing is decoded here)."""
    data = read_file(path, flag)
    try:
        return data, Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError(f"{flag} {path}: not an image file; expected {what}") from None


def _size(image: Image.Image) -> str:
    return f"{image.size[0]}×{image.size[1]}"


def read_file(path: Path, flag: str) -> bytes:
    """The file's bytes; a file that cannot be read is named with its flag."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise type(error)(f"{flag} {path}: {error.strerror or error}") from None


def parse_pose(values: Sequence[str]) -> np.ndarray:
    """16 numbers, or one .npy / text file holding a 4×4 (or 16 numbers)."""
    try:
        if len(values) == 1:
            path = Path(values[0])
            data = io.BytesIO(read_file(path, "--pose"))
            pose = np.load(data) if path.suffix == ".npy" else np.loadtxt(data)
        else:
            pose = np.asarray([float(v) for v in values])
        pose = np.asarray(pose, dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"--pose: not numbers ({error})") from None
    if pose.size != 16:
        raise ValueError(f"--pose needs 16 numbers (4×4 row-major), got {pose.size}")
    return pose.reshape(4, 4)


def run_info(args) -> int:
    with connect(args) as client:
        info = client.model_info()
    print(json.dumps(model_info_dict(info), indent=2))
    return 0


def run_health(args) -> int:
    with connect(args) as client:
        try:
            status = client.health(args.service, timeout=args.timeout or 5.0)
        except grpc.RpcError as error:
            status = f"UNREACHABLE ({rpc_error_text(error, args.address)})"
    print(status)
    return 0 if status == "SERVING" else 1


def run_make_bag(args) -> int:
    frames = read_folder(args.folder, intrinsics=args.intrinsics_set, limit=args.limit)
    fmt = bag_format_for(args.out_bag, args.out_bag_format)
    count = write_frames_bag(
        frames, args.out_bag, fmt, args.color_topic, args.depth_topic, args.world_frame, args.camera_frame
    )
    print(json.dumps({"bag": str(args.out_bag), "format": fmt, "frames": count,
                      "color_topic": args.color_topic, "depth_topic": args.depth_topic,
                      "world_frame": args.world_frame}))  # fmt: skip
    return 0


def run_bench(args) -> int:
    frames = load_frames_folder(args.folder, intrinsics=args.intrinsics_set)
    requests = [_frame_request(frame, frame_options(args)) for frame in _warn_if_misscaled(frames, args)]
    if not requests:
        raise ValueError(f"--folder {args.folder}: no frames to send")
    with connect(args) as client:
        reach(client, args)
    total = None if args.duration else (args.frames or 32)
    with progress_bar(total, "bench", not args.no_progress) as bar:
        report = run_load(
            lambda: connect(args),
            requests,
            concurrency=args.concurrency,
            frames=total,
            duration_s=args.duration,
            warmup=args.warmup,
            on_frame=bar.update,
        )
    report["address"] = args.address
    report["options"] = {k: v for k, v in frame_options(args).items() if v not in (None, False)}
    print(json.dumps(report, indent=2))
    return 0 if not report["errors"] else 1
