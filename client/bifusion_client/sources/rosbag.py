"""RGB-D frames from a ROS 1 bag, a ROS 2 bag (sqlite3 or MCAP) or an MCAP file, with ``rosbags``
(pure Python, no ROS install; ``pip install 'bifusion-client[ros]'``).

Two passes over the bag, both streaming: the first reads time stamps, camera infos and tf; the
second reads the images and yields each colour/depth pair as soon as both halves have been seen,
so memory holds a few images, never the whole bag.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..extras import require
from .frame import RGBDFrame
from .ros_image import camera_matrix, color_from_image, depth_from_image, stamp_nanoseconds, stamp_seconds
from .tf_tree import TfTree
from .timing import DEFAULT_MAX_DIFFERENCE_S, associate, unpaired_warning

IMAGE_TYPE = "sensor_msgs/msg/Image"
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
TF_TYPE = "tf2_msgs/msg/TFMessage"
TF_TOPICS = ("/tf", "/tf_static")


def import_rosbags():
    highlevel = require("rosbags.highlevel", "ros", "reading bags")
    typesys = require("rosbags.typesys", "ros", "reading bags")
    return highlevel.AnyReader, typesys.Stores, typesys.get_typestore


@dataclass
class BagIndex:
    """What the first pass learns."""

    color: list = field(default_factory=list)  # (stamp ns, frame_id) per colour message
    depth: list = field(default_factory=list)  # stamp ns per depth message
    infos: list = field(default_factory=list)  # (stamp, message) per CameraInfo
    tf: TfTree = field(default_factory=TfTree)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_rosbag(
    path: str | Path,
    color_topic: str,
    depth_topic: str,
    camera_info_topic: str | None = None,
    world_frame: str | None = None,
    camera_frame: str | None = None,
    max_difference: float = DEFAULT_MAX_DIFFERENCE_S,
    assume_rectified: bool = False,
    intrinsics: dict | None = None,
    limit: int | None = None,
    warn: Callable[[str], None] = _warn,
) -> Iterator[RGBDFrame]:
    """Frames of a bag, lazily, in the order the bag completes each colour/depth pair.

    ``camera_info_topic`` defaults to the colour topic's sibling ``camera_info``; ``intrinsics``
    (fx, fy, cx, cy) replaces it. Poses are T_world_cam from ``/tf`` and ``/tf_static`` at each
    colour stamp: ``camera_frame`` defaults to the colour images' ``header.frame_id``,
    ``world_frame`` to the root of its tf tree. Without any tf the poses are None (identity).
    """
    AnyReader, Stores, get_typestore = import_rosbags()
    paths = _bag_paths(Path(path))
    if camera_info_topic is None and intrinsics is None:
        camera_info_topic = color_topic.rsplit("/", 1)[0] + "/camera_info"
    rectified = assume_rectified or "rect" in color_topic.rsplit("/", 1)[-1]
    with AnyReader(paths, default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        by_topic: dict = {}
        for connection in reader.connections:  # a topic may have several connections (publishers)
            by_topic.setdefault(connection.topic, []).append(connection)
        _check_topic(by_topic, color_topic, IMAGE_TYPE, "--color-topic")
        _check_topic(by_topic, depth_topic, IMAGE_TYPE, "--depth-topic")
        if intrinsics is None:
            _check_topic(by_topic, camera_info_topic, CAMERA_INFO_TYPE, "--camera-info-topic")
        index = _index(reader, by_topic, color_topic, depth_topic, camera_info_topic)
        if not index.color or not index.depth:
            raise ValueError(f"{path}: no messages on {color_topic if not index.color else depth_topic}")
        color_ns = np.asarray([c[0] for c in index.color], dtype=np.int64)
        depth_ns = np.asarray(index.depth, dtype=np.int64)
        pairs = associate(color_ns * 1e-9, depth_ns * 1e-9, max_difference)
        if not pairs:
            raise ValueError(
                f"{path}: no colour image has a depth image within {max_difference} s (--max-time-difference)"
            )
        camera = camera_frame or index.color[0][1]
        world = _world_frame(index.tf, world_frame, camera, warn)
        unpaired = unpaired_warning(len(color_ns), len(depth_ns), len(pairs), max_difference)
        if unpaired:
            warn(f"--bag {path}: {unpaired}")
        # images are matched across the two passes by topic and header stamp
        depth_of = {int(color_ns[i]): int(depth_ns[j]) for i, j in pairs[:limit]}
        yield from _frames(
            reader, by_topic, color_topic, depth_topic, index, depth_of,
            intrinsics, rectified, camera_info_topic, world, camera, warn,
        )  # fmt: skip


def _bag_paths(path: Path) -> list:
    if not path.exists():
        raise FileNotFoundError(f"--bag: {path} does not exist")
    # a ROS 2 bag is its folder (with metadata.yaml); accept one of its storage files too
    if path.is_file() and path.suffix in (".mcap", ".db3") and (path.parent / "metadata.yaml").exists():
        return [path.parent]
    return [path]


def _check_topic(by_topic: dict, topic: str, msgtype: str, flag: str) -> None:
    if topic not in by_topic:
        have = ", ".join(f"{t} ({c[0].msgtype})" for t, c in sorted(by_topic.items()))
        raise ValueError(f"{flag}: topic {topic!r} is not in the bag; it has: {have}")
    carried = {c.msgtype for c in by_topic[topic]}
    if carried != {msgtype}:
        raise ValueError(f"{flag}: topic {topic!r} carries {', '.join(sorted(carried))}, not {msgtype}")


def _index(reader, by_topic, color_topic, depth_topic, info_topic) -> BagIndex:
    index = BagIndex()
    topics = (color_topic, depth_topic, info_topic, *TF_TOPICS)
    wanted = [c for t in topics if t in by_topic for c in by_topic[t]]
    for connection, _, raw in reader.messages(connections=wanted):
        topic = connection.topic
        msg = reader.deserialize(raw, connection.msgtype)
        if topic == color_topic:
            index.color.append((stamp_nanoseconds(msg.header), msg.header.frame_id))
        elif topic == depth_topic:
            index.depth.append(stamp_nanoseconds(msg.header))
        elif topic == info_topic:
            index.infos.append((stamp_seconds(msg.header), msg))
        elif connection.msgtype == TF_TYPE:
            for tf in msg.transforms:
                index.tf.add(
                    tf.header.frame_id,
                    tf.child_frame_id,
                    stamp_seconds(tf.header),
                    (tf.transform.translation.x, tf.transform.translation.y, tf.transform.translation.z),
                    (tf.transform.rotation.x, tf.transform.rotation.y, tf.transform.rotation.z,
                     tf.transform.rotation.w),
                    static=topic == "/tf_static",
                )  # fmt: skip
    return index


def _world_frame(tf: TfTree, world_frame: str | None, camera: str, warn) -> str | None:
    if not tf:
        if world_frame:
            raise ValueError(f"--world-frame {world_frame!r}: the bag has no /tf or /tf_static messages")
        warn("the bag has no /tf or /tf_static: frames are sent without a pose (identity)")
        return None
    if camera.lstrip("/") not in tf.frames:
        raise ValueError(
            f"--camera-frame: {camera!r} is not in the bag's tf tree ({', '.join(sorted(tf.frames))})"
        )
    if world_frame is None:
        return tf.root(camera)
    if world_frame.lstrip("/") not in tf.frames:
        raise ValueError(
            f"--world-frame: {world_frame!r} is not in the bag's tf tree ({', '.join(sorted(tf.frames))})"
        )
    if tf.root(world_frame) != tf.root(camera):
        raise ValueError(f"--world-frame: tf does not connect {world_frame!r} to the camera frame {camera!r}")
    return world_frame


def _frames(reader, by_topic, color_topic, depth_topic, index, depth_of, intrinsics, rectified,
            info_topic, world, camera, warn) -> Iterator[RGBDFrame]:  # fmt: skip
    color_of = {d: c for c, d in depth_of.items()}
    info_stamps = np.asarray([s for s, _ in index.infos])
    pending_color: dict = {}
    pending_depth: dict = {}
    for connection, _, raw in reader.messages(connections=by_topic[color_topic] + by_topic[depth_topic]):
        msg = reader.deserialize(raw, connection.msgtype)
        key = stamp_nanoseconds(msg.header)
        if connection.topic == color_topic and key in depth_of:
            pending_color[key] = msg
            c = key
        elif connection.topic == depth_topic and key in color_of:
            pending_depth[key] = msg
            c = color_of[key]
        else:
            continue  # not in a pair
        if c not in pending_color or depth_of[c] not in pending_depth:
            continue
        color_msg, depth_msg = pending_color.pop(c), pending_depth.pop(depth_of[c])
        stamp = c * 1e-9
        pose = None
        if world is not None:
            try:
                pose = index.tf.lookup(world, camera, stamp)
            except LookupError as error:
                warn(f"colour image at {stamp:.6f} skipped: no T_{world}_{camera}: {error}")
                continue
        k = intrinsics or _nearest_info(index.infos, info_stamps, stamp, rectified, info_topic, color_msg)
        color = color_from_image(color_msg, color_topic)
        depth, depth_scale = depth_from_image(depth_msg, depth_topic)
        if depth.shape != color.shape[:2]:
            raise ValueError(
                f"{depth_topic}: depth is {depth.shape[1]}×{depth.shape[0]} but colour is "
                f"{color.shape[1]}×{color.shape[0]}; the service needs depth registered to the colour image"
            )
        yield RGBDFrame(f"{stamp:.6f}", color, depth, depth_scale, k, pose, stamp, world)


def _nearest_info(infos, info_stamps, stamp, rectified, topic, color_msg) -> dict:
    if not infos:
        raise ValueError(f"--camera-info-topic: no messages on {topic}")
    _, msg = infos[int(np.argmin(np.abs(info_stamps - stamp)))]
    if msg.width and (msg.width, msg.height) != (color_msg.width, color_msg.height):
        raise ValueError(
            f"{topic}: CameraInfo is {msg.width}×{msg.height} but the colour image is "
            f"{color_msg.width}×{color_msg.height}"
        )
    return camera_matrix(msg, rectified, topic)
