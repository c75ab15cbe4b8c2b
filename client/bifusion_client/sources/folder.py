"""RGB-D frames of a folder described by ``frames.json`` (the layout of ``docs/robotics.md``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .frame import CountedFrames, RGBDFrame
from .tum import load_color, load_depth, load_image


def read_folder(
    folder: str | Path, intrinsics: str = "ros_default", limit: int | None = None
) -> CountedFrames:
    """Frames of ``folder/frames.json`` in order, read one at a time; ``intrinsics`` picks one of
    its sets. The manifest is checked before the first image is read."""
    folder = Path(folder)
    manifest = folder / "frames.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"--folder: {manifest} not found")
    try:
        meta = json.loads(manifest.read_text())
    except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"--folder: {manifest} is not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"--folder: {manifest} must hold a JSON object, not a {type(meta).__name__}")
    sets = meta.get("intrinsics", {})
    if intrinsics not in sets:
        raise ValueError(
            f"--intrinsics-set: {intrinsics!r} is not in {manifest} (it has {', '.join(sorted(sets))})"
        )
    k = {name: float(sets[intrinsics][name]) for name in ("fx", "fy", "cx", "cy")}
    depth_scale = float(meta.get("depth_scale", 1000.0))
    entries = meta.get("frames", [])[:limit]
    for number, entry in enumerate(entries):
        for key in ("rgb", "depth"):
            if key not in entry:
                raise ValueError(f"{manifest}: frames[{number}] has no {key!r}")
    return CountedFrames(_frames(folder, entries, k, depth_scale), len(entries))


def _frames(folder, entries, k, depth_scale):
    for entry in entries:
        pose = entry.get("cam_to_world")
        stamp = entry.get("rgb_timestamp")
        yield RGBDFrame(
            frame_id=Path(entry["rgb"]).stem,
            color=load_image(load_color, folder / entry["rgb"], "--folder"),
            depth=load_image(load_depth, folder / entry["depth"], "--folder"),
            depth_scale=depth_scale,
            intrinsics=dict(k),
            cam_to_world=None if pose is None else np.asarray(pose, dtype=np.float64),
            stamp=None if stamp is None else float(stamp),
        )
