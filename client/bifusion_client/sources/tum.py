"""RGB-D frames in TUM RGB-D's own layout: ``rgb.txt``, ``depth.txt`` and ``groundtruth.txt``.

Colour and depth are paired by time stamp as TUM's ``associate.py`` does; the pose is the ground
truth (``timestamp tx ty tz qx qy qz qw``, T_world_cam) interpolated at the colour stamp.
Images are read one pair at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .frame import CountedFrames, RGBDFrame
from .poses import PoseTrack
from .timing import DEFAULT_MAX_DIFFERENCE_S, associate, unpaired_warning

TUM_DEPTH_SCALE = 5000.0  # TUM depth PNGs: metres = value / 5000
# Intrinsics of TUM's cameras (https://cvg.cit.tum.de/data/datasets/rgbd-dataset/file_formats).
# TUM recommends ros_default for the registered depth images it ships; fr1/fr2 are the colour
# cameras' own calibrations, whose distortion the service does not undo.
TUM_INTRINSICS = {
    "ros_default": {"fx": 525.0, "fy": 525.0, "cx": 319.5, "cy": 239.5},
    "fr1": {"fx": 517.3, "fy": 516.5, "cx": 318.6, "cy": 255.3},
    "fr2": {"fx": 520.9, "fy": 521.0, "cx": 325.1, "cy": 249.7},
    "fr3": {"fx": 535.4, "fy": 539.2, "cx": 320.1, "cy": 247.6},
}
DISTORTED_SETS = ("fr1", "fr2")


def tum_intrinsics(name: str, assume_rectified: bool = False) -> dict:
    if name not in TUM_INTRINSICS:
        raise ValueError(f"--intrinsics-set: {name!r} is not one of {', '.join(TUM_INTRINSICS)}")
    if name in DISTORTED_SETS and not assume_rectified:
        raise ValueError(
            f"--intrinsics-set {name}: that camera has lens distortion the service does not undo; "
            "use ros_default (TUM's choice for its registered depth) or pass --assume-rectified"
        )
    return dict(TUM_INTRINSICS[name])


def read_list(path: Path) -> tuple:
    """(stamps, columns) of a TUM list file: ``stamp value...`` per line, ``#`` comments."""
    stamps, rows = [], []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            try:
                stamps.append(float(parts[0]))
            except ValueError:
                raise ValueError(f"{path}:{number}: time stamp {parts[0]!r} is not a number") from None
            rows.append(parts[1:])
    return np.asarray(stamps, dtype=np.float64), rows


def read_groundtruth(path: Path) -> PoseTrack:
    stamps, rows = read_list(path)
    try:
        values = np.asarray(rows, dtype=np.float64)
    except ValueError:
        raise ValueError(f"{path}: every line must be 'timestamp tx ty tz qx qy qz qw'") from None
    if values.ndim != 2 or values.shape[1] != 7:
        raise ValueError(f"{path}: every line must be 'timestamp tx ty tz qx qy qz qw'")
    return PoseTrack(stamps, values[:, :3], values[:, 3:])


def read_tum(
    folder: str | Path,
    intrinsics: dict,
    depth_scale: float = TUM_DEPTH_SCALE,
    max_difference: float = DEFAULT_MAX_DIFFERENCE_S,
    limit: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> CountedFrames:
    """Frames of a TUM sequence folder, lazily, in colour-stamp order. Without groundtruth.txt
    the poses are None; colour frames outside the ground truth's span are skipped (``warn``)."""
    folder = Path(folder)
    for name in ("rgb.txt", "depth.txt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"--tum: {folder / name} not found (a TUM sequence has rgb.txt and depth.txt)"
            )
    rgb_stamps, rgb_rows = read_list(folder / "rgb.txt")
    depth_stamps, depth_rows = read_list(folder / "depth.txt")
    gt_path = folder / "groundtruth.txt"
    track = read_groundtruth(gt_path) if gt_path.is_file() else None
    pairs = associate(rgb_stamps, depth_stamps, max_difference)
    if not pairs:
        raise ValueError(f"--tum: no colour image in {folder} has a depth image within {max_difference} s")
    unpaired = unpaired_warning(len(rgb_stamps), len(depth_stamps), len(pairs), max_difference)
    if unpaired and warn:
        warn(f"--tum {folder}: {unpaired}")
    pairs = pairs[:limit]
    frames = _frames(folder, pairs, rgb_stamps, rgb_rows, depth_rows, intrinsics, depth_scale, track, warn)
    return CountedFrames(frames, len(pairs))


def _frames(folder, pairs, rgb_stamps, rgb_rows, depth_rows, intrinsics, depth_scale, track, warn):
    for i, j in pairs:
        stamp = float(rgb_stamps[i])
        pose = None
        if track is not None:
            if not track.covers(stamp):
                if warn:
                    warn(f"{rgb_rows[i][0]} skipped: {stamp:.6f} is outside groundtruth.txt")
                continue
            pose = track.at(stamp)
        yield RGBDFrame(
            frame_id=Path(rgb_rows[i][0]).stem,
            color=load_image(load_color, folder / rgb_rows[i][0], "--tum"),
            depth=load_image(load_depth, folder / depth_rows[j][0], "--tum"),
            depth_scale=depth_scale,
            intrinsics=dict(intrinsics),
            cam_to_world=pose,
            stamp=stamp,
        )


def load_image(loader: Callable[[Path], np.ndarray], path: Path, flag: str) -> np.ndarray:
    """``loader(path)``; a file that is missing or not an image is named with the source's flag."""
    try:
        return loader(path)
    except OSError as error:
        # the same kind (FileNotFoundError, …), so callers can still tell them apart
        raise type(error)(f"{flag}: {path}: {error.strerror or error}") from None


def load_color(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def load_depth(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        depth = np.asarray(image)
    if depth.ndim != 2 or depth.dtype.kind not in "ui":
        raise ValueError(
            f"{path}: depth must be a single-channel 16-bit PNG, got {depth.dtype} {depth.shape}"
        )
    return depth.astype(np.uint16, copy=False)
