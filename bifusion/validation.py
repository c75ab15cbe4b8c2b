"""Checks on a frame before it joins a batch; every failure names its field.

The checks look at the numbers the model will compute with (``inputs``), in the model's
dtype, so nothing that passes here turns non-finite or out of range inside the model.
A frame whose depth yields no point in the depth range is not an error: it is encoded
as a result with zero points (a camera facing the sky must not end a robot's stream).
"""

from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig
from .errors import InputError
from .inputs import client_points, coordinate_limit, intrinsics_vector, pose_matrix
from .types import EncodeOptions, Frame, Limits

RIGID_TOLERANCE = 1e-3


def validate_frame(frame: Frame, options: EncodeOptions, config: ModelConfig, limits: Limits) -> None:
    bound = coordinate_limit(config)
    _check_color(frame.color, limits)
    _check_intrinsics(frame)
    if frame.cam_to_world is not None:
        check_pose(frame.cam_to_world, bound)
    if frame.depth is not None:
        _check_depth(frame)
    _check_options(options, limits)
    if frame.points is not None:
        _check_points(frame, limits, bound)
    elif frame.depth is None:
        raise InputError("depth", "a depth image is required when no points are sent")
    else:
        _check_backprojection_extent(frame, config, bound)


def _check_color(color, limits: Limits) -> None:
    if not isinstance(color, np.ndarray):
        raise InputError("color", f"expected a numpy array, got {type(color).__name__}")
    if color.dtype != np.uint8:
        raise InputError("color", f"dtype must be uint8, got {color.dtype}")
    if color.ndim != 3 or color.shape[2] != 3:
        raise InputError("color", f"shape must be H×W×3, got {tuple(color.shape)}")
    height, width = color.shape[:2]
    if min(height, width) < limits.min_image_side or max(height, width) > limits.max_image_side:
        raise InputError(
            "color",
            f"size {width}×{height} is outside "
            f"{limits.min_image_side}..{limits.max_image_side} pixels a side",
        )


def _check_intrinsics(frame: Frame) -> None:
    for name in ("fx", "fy", "cx", "cy"):
        value = getattr(frame.intrinsics, name)
        if not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
            raise InputError(f"intrinsics.{name}", f"must be a finite number, got {value!r}")
        if value <= 0:
            raise InputError(f"intrinsics.{name}", f"must be positive, got {value}")


def check_pose(pose, bound: float) -> None:
    """A finite rigid transform: orthonormal rotation with det +1, last row 0 0 0 1, and a
    translation within ``bound`` metres."""
    raw = np.asarray(pose)
    if raw.shape != (4, 4):
        raise InputError("cam_to_world", f"must be 4×4, got shape {raw.shape}")
    if not np.issubdtype(raw.dtype, np.number):
        raise InputError("cam_to_world", "must hold finite numbers")
    arr = pose_matrix(raw)
    if not np.isfinite(arr).all():
        raise InputError("cam_to_world", "must hold finite numbers")
    if np.abs(arr[:3, 3]).max() > bound:
        raise InputError(
            "cam_to_world", f"translation {arr[:3, 3].tolist()} is beyond ±{bound:g} m on an axis"
        )
    if np.abs(arr[3] - (0, 0, 0, 1)).max() > 1e-6:
        raise InputError("cam_to_world", f"last row must be 0 0 0 1, got {arr[3].tolist()}")
    rot = arr[:3, :3]
    with np.errstate(over="ignore", invalid="ignore"):  # huge entries: inf or NaN, refused below
        error = np.abs(rot.T @ rot - np.eye(3)).max()
    if not error <= RIGID_TOLERANCE or np.linalg.det(rot) < 0:
        raise InputError(
            "cam_to_world",
            f"rotation is not orthonormal with det +1 (max |RᵀR − I| = {error:.2e}); "
            "scale, shear and reflection are not allowed",
        )


def _check_depth(frame: Frame) -> None:
    depth = frame.depth
    if not isinstance(depth, np.ndarray):
        raise InputError("depth", f"expected a numpy array, got {type(depth).__name__}")
    if depth.dtype not in (np.uint16, np.float32, np.float64):
        raise InputError("depth", f"dtype must be uint16 or float32 metres, got {depth.dtype}")
    if depth.shape != frame.color.shape[:2]:
        raise InputError(
            "depth",
            f"shape {tuple(depth.shape)} does not match the colour image's "
            f"{tuple(frame.color.shape[:2])} (H, W); depth must be registered to colour",
        )
    if depth.dtype == np.uint16:
        scale = frame.depth_scale
        if not isinstance(scale, (int, float, np.floating)) or not math.isfinite(scale) or scale <= 0:
            raise InputError("depth_scale", f"must be a positive finite number, got {scale!r}")


def _check_backprojection_extent(frame: Frame, config: ModelConfig, bound: float) -> None:
    """Depth points reach at most |pixel − principal point| · max_depth / focal length
    sideways; extreme intrinsics must not push them beyond the coordinate bound."""
    fx, fy, cx, cy = intrinsics_vector(frame)
    for name, focal, centre, size in (("fx", fx, cx, frame.width), ("fy", fy, cy, frame.height)):
        with np.errstate(over="ignore"):  # a tiny focal length: inf, refused below
            reach = max(abs(centre), abs(size - 1 - centre)) * config.max_depth / focal
        if not reach <= bound:
            raise InputError(
                f"intrinsics.{name}",
                f"back-projected points would reach {reach:g} m, beyond ±{bound:g} m "
                "(check the focal length and principal point)",
            )


def _check_points(frame: Frame, limits: Limits, bound: float) -> None:
    points = frame.points
    if not isinstance(points, np.ndarray):
        raise InputError("points", f"expected a numpy array, got {type(points).__name__}")
    if points.dtype not in (np.float32, np.float64):
        raise InputError("points", f"dtype must be float32, got {points.dtype}")
    if points.ndim != 2 or points.shape[1] not in (3, 6):
        raise InputError("points", f"shape must be N×3 (xyz) or N×6 (xyz+rgb), got {tuple(points.shape)}")
    if not 1 <= len(points) <= limits.max_points:
        raise InputError("points", f"count must be within 1..{limits.max_points}, got {len(points)}")
    xyz = client_points(points)[:, :3]  # as the model holds them: float32
    if not np.isfinite(points).all() or not np.isfinite(xyz).all():
        raise InputError("points", "must hold finite float32 numbers")
    if np.abs(xyz).max() > bound:
        raise InputError("points", f"coordinates must lie within ±{bound:g} m")
    if points.shape[1] == 6 and (points[:, 3:].min() < 0 or points[:, 3:].max() > 255):
        raise InputError("points", "rgb columns must lie in 0..255")


def _check_options(options: EncodeOptions, limits: Limits) -> None:
    if options.max_points is not None and not 1 <= options.max_points <= limits.max_points:
        raise InputError(
            "options.max_points", f"must be within 1..{limits.max_points}, got {options.max_points}"
        )
    tau = options.occlusion_tau
    if tau is not None and (not math.isfinite(tau) or tau < 0):
        raise InputError("options.occlusion_tau", f"must be a finite number ≥ 0, got {tau}")
