"""``bifusion-client encode``'s inputs and outputs: the flags, and the frames and sinks they make.

Sources are read lazily (one frame at a time), so the first request leaves at once and memory
does not grow with the sequence.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import grpc

from .extras import require
from .sinks.bag_writer import BAG_FORMATS, bag_format_for, refuse_existing
from .sinks.colors import FeaturePCA
from .sinks.npz import NpzSink
from .sinks.pictures import PicturesSink
from .sinks.ply import PlySink
from .sinks.pointcloud2 import DEFAULT_TOPIC
from .sources import RGBDFrame, read_folder, read_rosbag, read_tum, tum_intrinsics
from .sources.timing import DEFAULT_MAX_DIFFERENCE_S
from .sources.tum import load_color, load_depth

DEFAULT_COLOR_TOPIC = "/camera/color/image_raw"
DEFAULT_DEPTH_TOPIC = "/camera/aligned_depth_to_color/image_raw"
OUTPUT_FLAGS = ("--out-dir", "--ply", "--pictures", "--out-bag", "--rerun")


def add_source_options(parser: argparse.ArgumentParser, sources) -> None:
    """``--bag`` and ``--tum`` join the ``sources`` exclusive group; their options get a group."""
    sources.add_argument(
        "--bag", type=Path, metavar="PATH", help="ROS 1 bag, ROS 2 bag folder or MCAP file (needs [ros])"
    )
    sources.add_argument(
        "--tum",
        type=Path,
        metavar="DIR",
        help="TUM RGB-D sequence folder (rgb.txt, depth.txt, groundtruth.txt)",
    )
    group = parser.add_argument_group("ROS bag and TUM input")
    group.add_argument(
        "--color-topic",
        default=DEFAULT_COLOR_TOPIC,
        metavar="TOPIC",
        help="sensor_msgs/Image: rgb8, bgr8, rgba8 or bgra8 (default: %(default)s)",
    )
    group.add_argument(
        "--depth-topic", default=DEFAULT_DEPTH_TOPIC, metavar="TOPIC",
        help="sensor_msgs/Image registered to the colour image: 16UC1 (mm) or 32FC1 (m) "
        "(default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--camera-info-topic",
        metavar="TOPIC",
        help="sensor_msgs/CameraInfo (default: the colour topic's camera_info)",
    )
    group.add_argument(
        "--world-frame",
        metavar="FRAME",
        help="tf frame of the poses (default: the root of the camera's tf tree)",
    )
    group.add_argument(
        "--camera-frame",
        metavar="FRAME",
        help="tf frame of the camera (default: the colour image's frame_id)",
    )
    group.add_argument(
        "--assume-rectified", action="store_true",
        help="the images are undistorted though CameraInfo lists distortion (implied by image_rect* topics)",
    )  # fmt: skip
    group.add_argument(
        "--max-time-difference", type=float, default=DEFAULT_MAX_DIFFERENCE_S, metavar="SECONDS",
        help="most seconds between a colour image and its depth image (default: %(default)s)",
    )  # fmt: skip


def add_output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("outputs (at least one)")
    group.add_argument(
        "--out-dir", "--out", dest="out", type=Path, metavar="DIR", help="one compressed .npz per frame"
    )
    group.add_argument(
        "--ply", type=Path, metavar="DIR", help="folder for one binary PLY per frame (world xyz)"
    )
    group.add_argument(
        "--pictures", type=Path, metavar="DIR", help="folder for one PNG per frame: colour, valid, alpha, PCA"
    )
    group.add_argument(
        "--out-bag",
        type=Path,
        metavar="PATH",
        help="bag of sensor_msgs/PointCloud2, one per frame (needs [ros])",
    )
    group.add_argument(
        "--out-bag-format", choices=BAG_FORMATS,
        help="default: ros1 for a *.bag path, else a ROS 2 bag folder in mcap",
    )  # fmt: skip
    group.add_argument(
        "--out-topic",
        metavar="TOPIC",
        default=DEFAULT_TOPIC,
        help="topic of the point clouds in --out-bag (default: %(default)s)",
    )
    group.add_argument(
        "--rerun", type=Path, metavar="FILE", help="Rerun recording to write (.rrd; needs [rerun])"
    )


def output_paths(args) -> list:
    return [path for path in (args.out, args.ply, args.pictures, args.out_bag, args.rerun) if path]


def check_outputs(args) -> None:
    """What can be told about the outputs before anything is read, sent or created."""
    if not output_paths(args):
        raise ValueError(f"encode needs at least one output: {', '.join(OUTPUT_FLAGS)}")
    for flag, folder in (("--out-dir", args.out), ("--ply", args.ply), ("--pictures", args.pictures)):
        if folder and folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{flag} {folder}: is a file; it names a folder to write into")
    if args.out_bag:
        require("rosbags.typesys", "ros", "--out-bag")
        bag_format_for(args.out_bag, args.out_bag_format)
        refuse_existing(args.out_bag)
    if args.rerun:
        require("rerun", "rerun", "--rerun")


def wants_world_points(args) -> bool:
    return bool(args.ply or args.out_bag or args.rerun)


def _intrinsics_override(args) -> dict | None:
    given = {
        name: getattr(args, name) for name in ("fx", "fy", "cx", "cy") if getattr(args, name) is not None
    }
    if given and len(given) < 4:
        missing = ", ".join(f"--{n}" for n in ("fx", "fy", "cx", "cy") if n not in given)
        raise ValueError(f"intrinsics need all of --fx --fy --cx --cy; missing {missing}")
    return given or None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def open_frames(args) -> Iterator[RGBDFrame]:
    """The frames the source flags name, lazily."""
    override = _intrinsics_override(args)
    if args.bag:
        return read_rosbag(
            args.bag, args.color_topic, args.depth_topic, camera_info_topic=args.camera_info_topic,
            world_frame=args.world_frame, camera_frame=args.camera_frame,
            max_difference=args.max_time_difference, assume_rectified=args.assume_rectified,
            intrinsics=override, limit=args.limit,
        )  # fmt: skip
    if args.tum:
        intrinsics = override or tum_intrinsics(args.intrinsics_set, args.assume_rectified)
        return read_tum(
            args.tum, intrinsics, max_difference=args.max_time_difference, limit=args.limit, warn=_warn
        )
    return read_folder(args.folder, intrinsics=args.intrinsics_set, limit=args.limit)


def pair_frame(args, pose) -> RGBDFrame:
    """The ``--color``/``--depth`` pair as a frame (for the outputs; the request sends the files)."""
    return RGBDFrame(
        frame_id=args.frame_id or args.color.stem,
        color=load_color(args.color),
        depth=load_depth(args.depth),
        depth_scale=args.depth_scale,
        intrinsics={name: getattr(args, name) for name in ("fx", "fy", "cx", "cy")},
        cam_to_world=pose,
    )


def open_sinks(args) -> list:
    """The writers the output flags ask for; they share one PCA so their colours agree."""
    pca = FeaturePCA()
    sinks = []
    try:
        if args.out:
            sinks.append(NpzSink(args.out))
        if args.ply:
            sinks.append(PlySink(args.ply, pca))
        if args.pictures:
            sinks.append(PicturesSink(args.pictures, pca))
        if args.out_bag:
            from .sinks.pointcloud2 import PointCloud2Sink

            sinks.append(
                PointCloud2Sink(args.out_bag, pca, args.world_frame, args.out_topic, args.out_bag_format)
            )
        if args.rerun:
            from .sinks.rerun import RerunSink

            sinks.append(RerunSink(args.rerun, pca))
    except BaseException:
        close_sinks(sinks)
        raise
    return sinks


def close_sinks(sinks) -> None:
    """Closes every sink; raises the first error after trying them all."""
    errors = []
    for sink in sinks:
        try:
            sink.close()
        except Exception as error:
            errors.append(error)
    if errors:
        raise errors[0]


def source_name(args) -> str:
    for flag in ("bag", "tum", "folder", "color"):
        if getattr(args, flag, None):
            return f"--{flag} {getattr(args, flag)}"
    return "the source"


def read_first(frames, args) -> tuple:
    """The source's first frame, read now, so that a source that cannot be read (a topic or tf
    frame the bag lacks, a missing file) fails before any output exists; and all the frames,
    the first included."""
    frames = iter(frames)
    try:
        first = next(frames)
    except StopIteration:
        raise ValueError(f"{source_name(args)}: no frames to encode") from None
    return first, chain((first,), frames)


def encode_frames(client, frames_and_requests, stream: bool) -> Iterator:
    """(frame, result) per (frame, request), in order; one EncodeStream call when ``stream``."""
    if not stream:
        for frame, request in frames_and_requests:
            yield frame, client.encode_request(request)
        return
    sent: deque = deque()  # frames whose requests gRPC has taken, awaiting their results
    failed: list = []  # gRPC would turn an error of the source into a bare CANCELLED: keep it

    def requests():
        try:
            for frame, request in frames_and_requests:
                sent.append(frame)
                yield request
        except Exception as error:  # end the stream cleanly; raised below, after the results
            failed.append(error)

    try:
        for result in client.encode_stream(requests()):
            yield sent.popleft(), result
    except grpc.RpcError:
        if failed:
            raise failed[0] from None
        raise
    if failed:
        raise failed[0]
