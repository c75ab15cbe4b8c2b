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

from bifusion_client.make_bag import camera_info_message, image_message, transform_message
from bifusion_client.sinks.bag_writer import BagWriter

COLOR_TOPIC = "/camera/rgb/image_color"
DEPTH_TOPIC = "/camera/depth_registered/image"
INFO_TOPIC = "/camera/rgb/camera_info"
CAMERA_FRAME = "camera_rgb_optical_frame"
ROS_DEFAULT_K = {"fx": 525.0, "fy": 525.0, "cx": 319.5, "cy": 239.5}
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
                transform_message(bag, first, "world", "odom", T_WORLD_ODOM),
                transform_message(bag, first, "base_link", CAMERA_FRAME, T_BASE_CAMERA),
            ]
            bag.write("/tf_static", bag.message("tf2_msgs/msg/TFMessage", transforms=static), first)
            for stamp, edge in zip(stamps, edges, strict=True):
                if tf_after is not None and stamp < tf_after:
                    continue
                transform = transform_message(bag, float(stamp), "odom", "base_link", edge)
                bag.write("/tf", bag.message("tf2_msgs/msg/TFMessage", transforms=[transform]), float(stamp))
        for entry in tum_frames(tum_dir):
            rgb = np.asarray(Image.open(tum_dir / entry["rgb"]).convert("RGB"))
            raw = np.asarray(Image.open(tum_dir / entry["depth"]))
            color_stamp, depth_stamp = entry["rgb_timestamp"], entry["depth_timestamp"]
            pixels = rgb if color_encoding == "rgb8" else rgb[:, :, ::-1]
            color = image_message(bag, color_stamp, CAMERA_FRAME, pixels, color_encoding)
            bag.write(COLOR_TOPIC, color, color_stamp)
            depth = image_message(
                bag, depth_stamp, CAMERA_FRAME, depth_as(raw, depth_encoding), depth_encoding
            )
            bag.write(DEPTH_TOPIC, depth, depth_stamp)
            info = camera_info_message(
                bag, color_stamp, CAMERA_FRAME, rgb.shape[1::-1], ROS_DEFAULT_K, distortion
            )
            bag.write(INFO_TOPIC, info, color_stamp)
    return path
