"""``sensor_msgs/Image`` and ``CameraInfo`` messages -> numpy (no ROS needed)."""

from __future__ import annotations

import numpy as np

# encoding -> (dtype, channels, channel order to RGB)
COLOR_ENCODINGS = {
    "rgb8": ("u1", 3, [0, 1, 2]),
    "bgr8": ("u1", 3, [2, 1, 0]),
    "rgba8": ("u1", 4, [0, 1, 2]),
    "bgra8": ("u1", 4, [2, 1, 0]),
}
# encoding -> dtype; 16UC1 is millimetres (REP 118), 32FC1 metres with NaN = no reading
DEPTH_ENCODINGS = {"16UC1": "u2", "mono16": "u2", "32FC1": "f4"}
MILLIMETRES_PER_METRE = 1000.0


def image_pixels(msg, dtype: str, channels: int, topic: str) -> np.ndarray:
    """The H×W×C pixels of an Image message, honouring ``step`` (row padding) and ``is_bigendian``."""
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    dt = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<")
    row_bytes = width * channels * dt.itemsize
    data = np.asarray(msg.data, dtype=np.uint8).reshape(-1)
    if height <= 0 or width <= 0 or step < row_bytes or data.size < step * height:
        raise ValueError(
            f"{topic}: image {width}×{height} with step {step} does not fit its {data.size} data bytes"
        )
    rows = data[: step * height].reshape(height, step)[:, :row_bytes]
    pixels = np.ascontiguousarray(rows).view(dt).reshape(height, width, channels)
    return pixels.astype(dt.newbyteorder("="), copy=False)


def color_from_image(msg, topic: str) -> np.ndarray:
    """H×W×3 uint8 RGB from an Image in rgb8, bgr8, rgba8 or bgra8."""
    if msg.encoding not in COLOR_ENCODINGS:
        raise ValueError(
            f"{topic}: colour encoding {msg.encoding!r} is not supported (use {', '.join(COLOR_ENCODINGS)})"
        )
    dtype, channels, order = COLOR_ENCODINGS[msg.encoding]
    return np.ascontiguousarray(image_pixels(msg, dtype, channels, topic)[:, :, order])


def depth_from_image(msg, topic: str) -> tuple:
    """(depth, depth_scale) from an Image in 16UC1/mono16 (uint16 millimetres, scale 1000) or
    32FC1 (float32 metres, NaN where there is no reading)."""
    if msg.encoding not in DEPTH_ENCODINGS:
        raise ValueError(
            f"{topic}: depth encoding {msg.encoding!r} is not supported (use {', '.join(DEPTH_ENCODINGS)})"
        )
    depth = image_pixels(msg, DEPTH_ENCODINGS[msg.encoding], 1, topic)[:, :, 0]
    if depth.dtype == np.uint16:
        return depth, MILLIMETRES_PER_METRE
    return depth.astype(np.float32, copy=False), 1.0


def camera_matrix(msg, rectified: bool, topic: str) -> dict:
    """fx, fy, cx, cy of a CameraInfo. A rectified image's camera is P's (ROS: D and K describe
    the raw image); an unrectified image must have no distortion, then K is its camera."""
    k = _field(msg, "k")
    d = _field(msg, "d")
    p = _field(msg, "p")
    if rectified:
        if p.size == 12 and p[0] > 0 and p[5] > 0:
            return {"fx": float(p[0]), "fy": float(p[5]), "cx": float(p[2]), "cy": float(p[6])}
    elif d.size and np.any(d != 0):
        raise ValueError(
            f"{topic}: the camera has distortion D = {np.round(d, 6).tolist()} ({msg.distortion_model}); "
            "the service needs rectified images: read a rectified image topic (image_rect*) or pass "
            "--assume-rectified if these images are already undistorted"
        )
    if k.size != 9 or not (k[0] > 0 and k[4] > 0):
        raise ValueError(f"{topic}: CameraInfo K has no focal length: {k.tolist()}")
    return {"fx": float(k[0]), "fy": float(k[4]), "cx": float(k[2]), "cy": float(k[5])}


def _field(msg, name: str) -> np.ndarray:
    """ROS 2 names CameraInfo's matrices k, d, p; ROS 1 (as rosbags reads it) K, D, P."""
    value = getattr(msg, name, None)
    if value is None:
        value = getattr(msg, name.upper())
    return np.asarray(value, dtype=np.float64).reshape(-1)


def stamp_nanoseconds(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def stamp_seconds(header) -> float:
    return stamp_nanoseconds(header) * 1e-9
