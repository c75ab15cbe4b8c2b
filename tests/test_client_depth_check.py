"""The depth-scale warning on the real TUM depth: silent when the scale is right, and naming the
scale that fits when it is not."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bifusion_client.depth_check import depth_scale_warning, median_depth_m


def test_right_scale_is_silent_and_wrong_scale_names_the_fit(tum_folder_frames):
    depth = tum_folder_frames[0].depth
    assert median_depth_m(depth, 5000.0) == pytest.approx(np.median(depth[depth > 0]) / 5000.0, rel=1e-6)
    assert depth_scale_warning(depth, 5000.0, "frame a") is None
    warning = depth_scale_warning(depth, 1000.0, "frame a")
    assert warning.startswith("frame a: median depth is 5.88 m with depth scale 1000 (5875 units)")
    assert "Try a depth scale of 5000 (TUM RGB-D): 1.18 m." in warning


def test_png_bytes_and_float_metres_are_checked_too(tum_folder_frames):
    depth = tum_folder_frames[0].depth
    buffer = io.BytesIO()
    Image.fromarray(depth).save(buffer, format="PNG")
    assert "5.88 m" in depth_scale_warning(buffer.getvalue(), 1000.0, "--depth d.png")

    millimetres_as_float = depth.astype(np.float32) / 5.0  # float32 "metres" that are millimetres
    warning = depth_scale_warning(millimetres_as_float, 1.0, "frame b")
    assert "with float metres" in warning and "Try" not in warning
    assert depth_scale_warning(depth.astype(np.float32) / 5000.0, 1.0, "frame b") is None


def test_no_valid_depth_gives_no_warning():
    empty = np.zeros((48, 64), np.uint16)
    assert median_depth_m(empty, 1000.0) is None and depth_scale_warning(empty, 1000.0, "x") is None
    nan = np.full((48, 64), np.nan, np.float32)
    assert depth_scale_warning(nan, 1.0, "x") is None
