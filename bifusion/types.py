"""Typed inputs and outputs of the encoder."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels; pixel centres sit at integer coordinates."""

    fx: float
    fy: float
    cx: float
    cy: float

    def as_array(self) -> np.ndarray:
        return np.array([self.fx, self.fy, self.cx, self.cy], dtype=np.float64)


@dataclass
class Frame:
    """One RGB-D frame.

    ``depth`` is H×W uint16 (metres = value / ``depth_scale``) or float32 metres, 0 or
    non-finite meaning no reading. ``points`` (N×3 xyz or N×6 xyz+rgb with rgb in 0..255,
    camera frame, metres) replaces depth back-projection when given; depth may then
    still be sent for the occlusion test. ``cam_to_world`` is T_world_cam (identity
    when absent).
    """

    color: np.ndarray
    intrinsics: Intrinsics
    depth: np.ndarray | None = None
    depth_scale: float = 1000.0
    cam_to_world: np.ndarray | None = None
    points: np.ndarray | None = None
    frame_id: str = ""

    @property
    def height(self) -> int:
        return int(self.color.shape[0])

    @property
    def width(self) -> int:
        return int(self.color.shape[1])


@dataclass(frozen=True)
class EncodeOptions:
    """Per-frame options; ``None`` takes the checkpoint's default."""

    max_points: int | None = None
    return_points_world: bool = False
    # Occlusion test for client points with a depth image: valid only where
    # |depth(u, v) - z| <= tau * z. 0 disables it.
    occlusion_tau: float | None = None


@dataclass(frozen=True)
class Limits:
    """Hard bounds on what a single frame may ask for."""

    max_points: int = 200_000
    max_image_side: int = 4096
    min_image_side: int = 16


@dataclass(frozen=True)
class FrameStats:
    num_points: int
    valid_ratio: float
    gate_mean: float


@dataclass
class FrameResult:
    """Per-point outputs of one frame, as CPU numpy arrays.

    ``point_indices`` is the flat pixel index ``v * W + u`` for depth-derived points,
    or the row of the client's point array when the client sent points.
    """

    frame_id: str
    features: np.ndarray  # N×256 float32, unit L2 norm
    alpha: np.ndarray  # N float32, 0 where not valid
    valid: np.ndarray  # N bool
    point_indices: np.ndarray  # N int64
    stats: FrameStats
    points_world: np.ndarray | None = None  # N×3 float32
    # Stage timings of the batch this frame ran in, milliseconds.
    timings_ms: dict[str, float] = field(default_factory=dict)
