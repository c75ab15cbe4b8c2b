"""The numbers the model computes with, from a frame's fields.

Validation and the encoder both call these, so a frame is judged on exactly the values the
model will see (the same dtype, the same rounding): a check can never pass a value that the
model then turns into something else.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .types import Frame

# MinkowskiEngine keeps voxel coordinates in float32, exact for integers below 2**24. A camera
# point and the pose translation are each held within 2**22 voxels, so a world point
# (|R·x| ≤ √3 of the bound, plus t) stays below 2**24 and its voxel index is exact.
COORDINATE_LIMIT_VOXELS = 2**22


def coordinate_limit(config: ModelConfig) -> float:
    """Largest |coordinate| in metres allowed for camera points and the pose translation."""
    return COORDINATE_LIMIT_VOXELS * config.voxel_size


def depth_metres(frame: Frame) -> np.ndarray:
    """Flat float32 depth in metres: uint16 times float32(1/scale); no reading (0, NaN, inf) is 0."""
    depth = frame.depth.reshape(-1)
    if depth.dtype == np.uint16:
        with np.errstate(over="ignore", invalid="ignore"):  # 1/scale = inf: no depth in range
            return depth.astype(np.float32) * np.float32(1.0 / frame.depth_scale)
    with np.errstate(over="ignore"):
        metres = depth.astype(np.float32, copy=False)
    return np.nan_to_num(metres, nan=0.0, posinf=0.0, neginf=0.0)


def pose_matrix(cam_to_world: np.ndarray | None) -> np.ndarray:
    """A frame's 4×4 camera-to-world transform as float64 (identity when absent)."""
    if cam_to_world is None:
        return np.eye(4)
    return np.asarray(cam_to_world, dtype=np.float64).reshape(4, 4)


def intrinsics_vector(frame: Frame) -> np.ndarray:
    """fx, fy, cx, cy as float64."""
    return frame.intrinsics.as_array()


def client_points(points: np.ndarray) -> np.ndarray:
    """A frame's client points as float32 N×6 (camera xyz, rgb NaN where not sent)."""
    with np.errstate(over="ignore"):
        points = np.asarray(points, dtype=np.float32)
    if points.shape[1] == 6:
        return points
    return np.concatenate([points, np.full((len(points), 3), np.nan, np.float32)], axis=1)
