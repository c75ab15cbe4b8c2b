"""Shared fixtures: the real TUM frames and one encoder on the demo checkpoint."""

from __future__ import annotations

import os
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
