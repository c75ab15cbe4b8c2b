"""Shared fixtures: the real TUM frames and one encoder on the demo checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bifusion_client.frames_folder import FolderFrame, load_frames_folder

DATA_DIR = Path(os.environ.get("BIFUSION_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
TUM_DIR = DATA_DIR / "tum_fr1_xyz"


def to_frame(f: FolderFrame, **overrides):
    """An encoder input from a folder frame (its fields are Frame's, intrinsics as a mapping)."""
    from bifusion import Frame, Intrinsics

    return Frame(**{**vars(f), "intrinsics": Intrinsics(**f.intrinsics), **overrides})


def tum_sequence(folder: Path) -> tuple[Path, list[dict]]:
    """The sample frames laid out as a TUM RGB-D sequence (rgb/, depth/, rgb.txt, depth.txt,
    groundtruth.txt) in ``folder/seq``; returns it and frames.json's entries."""
    seq = folder / "seq"
    seq.mkdir()
    entries = json.loads((TUM_DIR / "frames.json").read_text())["frames"]
    for sub in ("rgb", "depth"):
        shutil.copytree(TUM_DIR / sub, seq / sub)
    (seq / "rgb.txt").write_text("".join(f"{e['rgb_timestamp']:.6f} {e['rgb']}\n" for e in entries))
    (seq / "depth.txt").write_text("".join(f"{e['depth_timestamp']:.6f} {e['depth']}\n" for e in entries))
    shutil.copy(TUM_DIR / "groundtruth.txt", seq / "groundtruth.txt")
    return seq, entries


@pytest.fixture(scope="session")
def tum_folder_frames() -> list[FolderFrame]:
    if not TUM_DIR.is_dir():
        pytest.fail(f"real frames not found at {TUM_DIR} (set BIFUSION_DATA_DIR)")
    return load_frames_folder(TUM_DIR)


@pytest.fixture(scope="session")
def tum_frames(tum_folder_frames):
    """The five real frames as encoder inputs (uint16 depth, ros_default intrinsics, real poses)."""
    return [to_frame(f) for f in tum_folder_frames]


@pytest.fixture(scope="session")
def encoder():
    """The encoder on the embedded demo checkpoint, CPU, shared by the whole session."""
    from bifusion import BiFusionEncoder

    return BiFusionEncoder(device="cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
