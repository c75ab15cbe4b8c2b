"""A whole ``frames.json`` folder in memory, as the tests and benchmarks use it.

``bifusion_client.sources.folder.read_folder`` reads the same folder lazily (what ``encode`` uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources.folder import read_folder


@dataclass
class FolderFrame:
    frame_id: str
    color: np.ndarray  # H×W×3 uint8
    depth: np.ndarray  # H×W uint16
    depth_scale: float
    intrinsics: dict[str, float]  # fx, fy, cx, cy
    cam_to_world: np.ndarray  # 4×4 float64


def load_frames_folder(
    folder: str | Path, intrinsics: str = "ros_default", limit: int | None = None
) -> list[FolderFrame]:
    """Frames of ``folder/frames.json`` in order; ``intrinsics`` picks one of its sets."""
    return [
        FolderFrame(f.frame_id, f.color, f.depth, f.depth_scale, f.intrinsics, f.cam_to_world)
        for f in read_folder(folder, intrinsics=intrinsics, limit=limit)
    ]
