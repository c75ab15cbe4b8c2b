"""Bags written with rosbags' own writers from the real TUM frames, for the client's bag tests.

The tf tree is a robot's: ``world -> odom`` static, ``odom -> base_link`` dynamic (from the
ground truth, at its 100 Hz stamps), ``base_link -> camera_rgb_optical_frame`` static, chosen
so that the chain world -> camera is TUM's ground-truth camera pose.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.spatial.transform import Rotation

from bifusion_client.sinks.bag_writer import BagWriter

COLOR_TOPIC = "/camera/rgb/image_color"
DEPTH_TOPIC = "/camera/depth_registered/image"
INFO_TOPIC = "/camera/rgb/camera_info"
CAMERA_FRAME = "camera_rgb_optical_frame"
ROS_DEFAULT_K = (525.0, 525.0, 319.5, 239.5)
TUM_DEPTH_SCALE = 5000.0


def rigid(rotvec, translation) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    out[:3, 3] = translation
    return out


# world -> odom: the odometry origin somewhere in the room; base_link -> camera: a camera mounted
# 20 cm forward and 1 m up, looking forward (optical frame: z forward, x right, y down).
T_WORLD_ODOM = rigid([0.0, 0.0, 0.4], [0.5, -0.3, 0.0])
T_BASE_CAMERA = rigid([0.0, 0.0, 0.0], [0.2, 0.0, 1.0]) @ np.array(
    [[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=np.float64
)


def groundtruth(tum_dir: Path) -> tuple:
    rows = np.loadtxt(tum_dir / "groundtruth.txt", comments="#")
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    poses[:, :3, :3] = Rotation.from_quat(rows[:, 4:8]).as_matrix()
    poses[:, :3, 3] = rows[:, 1:4]
    return rows[:, 0], poses


def odom_base_link(tum_dir: Path) -> tuple:
    """Stamps and T_odom_base_link such that world -> odom -> base_link -> camera is the ground truth."""
    stamps, t_world_cam = groundtruth(tum_dir)
    return stamps, np.linalg.inv(T_WORLD_ODOM) @ t_world_cam @ np.linalg.inv(T_BASE_CAMERA)


def expected_pose(tum_dir: Path, t: float) -> np.ndarray:
    """T_world_cam at ``t`` as tf defines it: the dynamic edge interpolated (np.interp on the
    translation, scipy's Slerp on the rotation), composed with the static ones."""
    from scipy.spatial.transform import Slerp

    stamps, edges = odom_base_link(tum_dir)
    edge = np.eye(4)
    edge[:3, :3] = Slerp(stamps, Rotation.from_matrix(edges[:, :3, :3]))([t]).as_matrix()[0]
    edge[:3, 3] = [np.interp(t, stamps, edges[:, i, 3]) for i in range(3)]
    return T_WORLD_ODOM @ edge @ T_BASE_CAMERA


def tum_frames(tum_dir: Path) -> list:
    return json.loads((tum_dir / "frames.json").read_text())["frames"]


def depth_as(raw: np.ndarray, encoding: str) -> np.ndarray:
    """TUM depth (value / 5000 = metres) as a ROS depth image: 16UC1 millimetres or 32FC1 metres."""
    if encoding == "16UC1":
        return np.round(raw.astype(np.float64) / TUM_DEPTH_SCALE * 1000.0).astype(np.uint16)
    metres = (raw.astype(np.float64) / TUM_DEPTH_SCALE).astype(np.float32)
    metres[raw == 0] = np.nan
    return metres


def write_rgbd_bag(
    path: Path,
    tum_dir: Path,
    fmt: str,
    color_encoding: str = "rgb8",
    depth_encoding: str = "16UC1",
    distortion=(0.0, 0.0, 0.0, 0.0, 0.0),
    with_tf: bool = True,
    tf_after: float | None = None,
) -> Path:
    """A bag of the five real frames: colour, depth, camera info and (optionally) tf; the dynamic
    tf only from ``tf_after`` (seconds) on when given."""
    with BagWriter(path, fmt) as bag:
        if with_tf:
            stamps, edges = odom_base_link(tum_dir)
            first = float(stamps[0])
            static = [
                _transform(bag, first, "world", "odom", T_WORLD_ODOM),
                _transform(bag, first, "base_link", CAMERA_FRAME, T_BASE_CAMERA),
            ]
            bag.write("/tf_static", bag.message("tf2_msgs/msg/TFMessage", transforms=static), first)
            for stamp, edge in zip(stamps, edges, strict=True):
                if tf_after is not None and stamp < tf_after:
                    continue
                transform = _transform(bag, float(stamp), "odom", "base_link", edge)
                bag.write("/tf", bag.message("tf2_msgs/msg/TFMessage", transforms=[transform]), float(stamp))
        fx, fy, cx, cy = ROS_DEFAULT_K
        for entry in tum_frames(tum_dir):
            rgb = np.asarray(Image.open(tum_dir / entry["rgb"]).convert("RGB"))
            raw = np.asarray(Image.open(tum_dir / entry["depth"]))
            color_stamp, depth_stamp = entry["rgb_timestamp"], entry["depth_timestamp"]
            pixels = rgb if color_encoding == "rgb8" else rgb[:, :, ::-1]
            bag.write(COLOR_TOPIC, _image(bag, color_stamp, pixels, color_encoding), color_stamp)
            bag.write(DEPTH_TOPIC, _image(bag, depth_stamp, depth_as(raw, depth_encoding), depth_encoding),
                      depth_stamp)  # fmt: skip
            info = bag.message(
                "sensor_msgs/msg/CameraInfo",
                header=bag.header(color_stamp, CAMERA_FRAME),
                height=rgb.shape[0],
                width=rgb.shape[1],
                distortion_model="plumb_bob",
                d=np.asarray(distortion, dtype=np.float64),
                k=np.array([fx, 0, cx, 0, fy, cy, 0, 0, 1], dtype=np.float64),
                r=np.eye(3).reshape(-1),
                p=np.array([fx, 0, cx, 0, 0, fy, cy, 0, 0, 0, 1, 0], dtype=np.float64),
                binning_x=0,
                binning_y=0,
                roi=bag.message("sensor_msgs/msg/RegionOfInterest", x_offset=0, y_offset=0, height=0, width=0,
                                do_rectify=False),
            )  # fmt: skip
            bag.write(INFO_TOPIC, info, color_stamp)
    return path


def _image(bag, stamp, pixels: np.ndarray, encoding: str):
    height, width = pixels.shape[:2]
    data = np.ascontiguousarray(pixels).view(np.uint8).reshape(-1)
    return bag.message(
        "sensor_msgs/msg/Image",
        header=bag.header(stamp, CAMERA_FRAME),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=data.size // height,
        data=data,
    )


def _transform(bag, stamp: float, parent: str, child: str, transform: np.ndarray):
    x, y, z, w = Rotation.from_matrix(transform[:3, :3]).as_quat()
    tx, ty, tz = transform[:3, 3]
    return bag.message(
        "geometry_msgs/msg/TransformStamped",
        header=bag.header(stamp, parent),
        child_frame_id=child,
        transform=bag.message(
            "geometry_msgs/msg/Transform",
            translation=bag.message("geometry_msgs/msg/Vector3", x=tx, y=ty, z=tz),
            rotation=bag.message("geometry_msgs/msg/Quaternion", x=x, y=y, z=z, w=w),
        ),
    )
