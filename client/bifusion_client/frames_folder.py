"""Reading a folder of RGB-D frames described by a ``frames.json`` (TUM-style layout).

numpy and Pillow only, so robots can use it without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


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
    folder = Path(folder)
    meta = json.loads((folder / "frames.json").read_text())
    sets = meta["intrinsics"]
    if intrinsics not in sets:
        raise KeyError(f"intrinsics set {intrinsics!r} not in {sorted(sets)}")
    k = {name: float(sets[intrinsics][name]) for name in ("fx", "fy", "cx", "cy")}
    frames = []
    for entry in meta["frames"][:limit]:
        frames.append(
            FolderFrame(
                frame_id=Path(entry["rgb"]).stem,
                color=np.asarray(Image.open(folder / entry["rgb"]).convert("RGB")),
                depth=np.asarray(Image.open(folder / entry["depth"])).astype(np.uint16),
                depth_scale=float(meta.get("depth_scale", 1000.0)),
                intrinsics=k,
                cam_to_world=np.asarray(entry["cam_to_world"], dtype=np.float64),
            )
        )
    return frames
