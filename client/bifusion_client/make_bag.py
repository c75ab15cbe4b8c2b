"""``bifusion-client make-bag``: a ROS bag of RGB-D frames as a camera driver records them, made
from a ``frames.json`` folder (the sample frames), so ``encode --bag`` can be tried without a robot.

Per frame, at its colour time stamp: the colour image (``rgb8``) on ``--color-topic``, the depth
image (``16UC1``, millimetres, registered to the colour image) on ``--depth-topic``, a
``CameraInfo`` beside the colour topic, and the pose as tf ``world frame -> camera frame``.
The defaults are ``encode``'s, so ``encode --bag`` reads the bag without topic flags.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .new_outputs import NewOutputs
from .sinks.bag_writer import BagWriter
from .sources.frame import RGBDFrame
from .sources.poses import matrix_to_quaternion

DEFAULT_WORLD_FRAME = "map"
DEFAULT_CAMERA_FRAME = "camera_color_optical_frame"
FRAME_PERIOD_S = 1 / 30  # stamps for frames that have none, as a 30 Hz camera's


def write_frames_bag(
    frames: Iterable[RGBDFrame],
    path: str | Path,
    fmt: str | None,
    color_topic: str,
    depth_topic: str,
    world_frame: str = DEFAULT_WORLD_FRAME,
    camera_frame: str = DEFAULT_CAMERA_FRAME,
) -> int:
    """Writes the frames into a new bag at ``path``; returns how many. A failure removes what was
    made, so the bag is complete or absent."""
    info_topic = color_topic.rsplit("/", 1)[0] + "/camera_info"
    created = NewOutputs([Path(path)])
    count = 0
    try:
        with BagWriter(path, fmt, flag="--out-bag") as bag:
            for frame in frames:
                stamp = frame.stamp if frame.stamp is not None else 1.0 + count * FRAME_PERIOD_S
                if frame.cam_to_world is not None:
                    transform = transform_message(bag, stamp, world_frame, camera_frame, frame.cam_to_world)
                    bag.write("/tf", bag.message("tf2_msgs/msg/TFMessage", transforms=[transform]), stamp)
                bag.write(color_topic, image_message(bag, stamp, camera_frame, frame.color, "rgb8"), stamp)
                depth, encoding = _ros_depth(frame)
                bag.write(depth_topic, image_message(bag, stamp, camera_frame, depth, encoding), stamp)
                bag.write(
                    info_topic,
                    camera_info_message(bag, stamp, camera_frame, frame.color.shape[1::-1], frame.intrinsics),
                    stamp,
                )
                count += 1
    except BaseException:
        created.remove()
        raise
    return count


def _ros_depth(frame: RGBDFrame) -> tuple[np.ndarray, str]:
    """16UC1 millimetres (REP 118) from uint16 depth at any scale; float metres stay 32FC1."""
    if frame.depth.dtype == np.uint16:
        millimetres = np.round(frame.depth.astype(np.float64) * (1000.0 / frame.depth_scale))
        return np.clip(millimetres, 0, np.iinfo(np.uint16).max).astype(np.uint16), "16UC1"
    return frame.depth_metres(), "32FC1"


def image_message(bag: BagWriter, stamp: float, frame_id: str, pixels: np.ndarray, encoding: str):
    """A sensor_msgs/Image of ``pixels`` (H×W or H×W×C, little-endian) in ``encoding``."""
    height, width = pixels.shape[:2]
    data = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<"), copy=False)
    data = data.view(np.uint8).reshape(-1)
    return bag.message(
        "sensor_msgs/msg/Image",
        header=bag.header(stamp, frame_id),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=data.size // height,
        data=data,
    )


def camera_info_message(
    bag: BagWriter, stamp: float, frame_id: str, size_wh, intrinsics: dict, distortion=None
):
    """A plumb_bob sensor_msgs/CameraInfo; no ``distortion``: the images are undistorted."""
    fx, fy, cx, cy = (float(intrinsics[k]) for k in ("fx", "fy", "cx", "cy"))
    width, height = (int(v) for v in size_wh)
    return bag.message(
        "sensor_msgs/msg/CameraInfo",
        header=bag.header(stamp, frame_id),
        height=height,
        width=width,
        distortion_model="plumb_bob",
        d=np.zeros(5) if distortion is None else np.asarray(distortion, dtype=np.float64),
        k=np.array([fx, 0, cx, 0, fy, cy, 0, 0, 1], dtype=np.float64),
        r=np.eye(3).reshape(-1),
        p=np.array([fx, 0, cx, 0, 0, fy, cy, 0, 0, 0, 1, 0], dtype=np.float64),
        binning_x=0,
        binning_y=0,
        roi=bag.message(
            "sensor_msgs/msg/RegionOfInterest", x_offset=0, y_offset=0, height=0, width=0, do_rectify=False
        ),
    )


def transform_message(bag: BagWriter, stamp: float, parent: str, child: str, pose: np.ndarray):
    """A geometry_msgs/TransformStamped: ``pose`` is T_parent_child (4×4)."""
    pose = np.asarray(pose, dtype=np.float64)
    x, y, z, w = matrix_to_quaternion(pose[:3, :3])
    tx, ty, tz = pose[:3, 3]
    return bag.message(
        "geometry_msgs/msg/TransformStamped",
        header=bag.header(stamp, parent),
        child_frame_id=child,
        transform=bag.message(
            "geometry_msgs/msg/Transform",
            translation=bag.message("geometry_msgs/msg/Vector3", x=float(tx), y=float(ty), z=float(tz)),
            rotation=bag.message(
                "geometry_msgs/msg/Quaternion", x=float(x), y=float(y), z=float(z), w=float(w)
            ),
        ),
    )
