"""The frame every source yields: what one request needs, plus when it was taken."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class RGBDFrame:
    """One registered RGB-D frame, ready for :func:`bifusion_client.request.request_from_folder_frame`.

    ``depth`` is H×W uint16 (metres = value / ``depth_scale``) or H×W float32 metres with NaN
    (or 0) where there is no reading. ``cam_to_world`` is T_world_cam (camera axes x right,
    y down, z forward; metres); None when the source has no pose (the server then uses the
    identity). ``stamp`` is the colour image's time in seconds (None when unknown).
    """

    frame_id: str
    color: np.ndarray  # H×W×3 uint8, RGB
    depth: np.ndarray
    depth_scale: float
    intrinsics: dict  # fx, fy, cx, cy in pixels
    cam_to_world: np.ndarray | None  # 4×4 float64
    stamp: float | None = None
    world_frame: str | None = None  # the name of the pose's world frame, when the source knows it

    def depth_metres(self) -> np.ndarray:
        """Depth as float32 metres, NaN where there is no reading."""
        if self.depth.dtype == np.uint16:
            metres = self.depth.astype(np.float32) / np.float32(self.depth_scale)
            metres[self.depth == 0] = np.nan
            return metres
        metres = self.depth.astype(np.float32, copy=True)
        metres[~(metres > 0)] = np.nan  # 0, negative and NaN all mean no reading
        return metres


class CountedFrames:
    """Frames read lazily, one at a time, with their number known up front (a progress bar's
    ETA); ``count`` is an upper bound when the reader may still skip frames."""

    def __init__(self, frames: Iterator[RGBDFrame], count: int):
        self._frames = frames
        self.count = count

    def __iter__(self) -> CountedFrames:
        return self

    def __next__(self) -> RGBDFrame:
        return next(self._frames)
