"""Bags written with rosbags from the real TUM frames (ROS 1, ROS 2 sqlite3, MCAP; rgb8, bgr8,
16UC1, 32FC1; a robot's tf tree) read back by the client: pixels exact, depth in metres, poses
within 1e-6 of the tf interpolation."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import TUM_DIR
from PIL import Image
from rosbag_data import (
    CAMERA_FRAME,
    COLOR_TOPIC,
    DEPTH_TOPIC,
    T_WORLD_ODOM,
    depth_as,
    expected_pose,
    tum_frames,
    write_rgbd_bag,
)

pytest.importorskip("rosbags", reason="the [ros] extra (rosbags) is not installed")

from bifusion_client.sources import read_rosbag
from bifusion_client.sources.timing import associate

UNPAIRED = (
    "1 of 5 colour images and 1 of 5 depth images left out: no partner within 0.02 s "
    "(--max-time-difference; TUM's associate.py pairs the same way)"
)
CASES = [
    ("ros1", "rgb8", "16UC1"),
    ("sqlite3", "bgr8", "32FC1"),
    ("mcap", "bgr8", "16UC1"),
    ("mcap", "rgb8", "32FC1"),
]


def bag_path(tmp_path, fmt):
    return tmp_path / ("frames.bag" if fmt == "ros1" else f"frames_{fmt}")


@pytest.mark.parametrize(("fmt", "color_encoding", "depth_encoding"), CASES)
def test_bag_frames_read_back_equal_the_originals(tmp_path, fmt, color_encoding, depth_encoding):
    path = write_rgbd_bag(bag_path(tmp_path, fmt), TUM_DIR, fmt, color_encoding, depth_encoding)
    frames = list(read_rosbag(path, COLOR_TOPIC, DEPTH_TOPIC))
    entries = tum_frames(TUM_DIR)
    pairs = associate([e["rgb_timestamp"] for e in entries], [e["depth_timestamp"] for e in entries])
    assert len(frames) == len(pairs) == 4
    for frame, (i, j) in zip(frames, pairs, strict=True):
        color = np.asarray(Image.open(TUM_DIR / entries[i]["rgb"]).convert("RGB"))
        raw = np.asarray(Image.open(TUM_DIR / entries[j]["depth"]))
        assert frame.stamp == pytest.approx(entries[i]["rgb_timestamp"], abs=1e-6)
        assert frame.frame_id == f"{entries[i]['rgb_timestamp']:.6f}"
        np.testing.assert_array_equal(frame.color, color)
        metres = frame.depth_metres()
        truth = np.where(raw > 0, raw / 5000.0, np.nan)
        np.testing.assert_array_equal(np.isnan(metres), raw == 0)
        if depth_encoding == "16UC1":  # whole millimetres: what a ROS driver publishes
            assert frame.depth.dtype == np.uint16 and frame.depth_scale == 1000.0
            np.testing.assert_array_equal(frame.depth, depth_as(raw, "16UC1"))
            np.testing.assert_allclose(metres, truth, rtol=0, atol=0.5e-3, equal_nan=True)
        else:
            assert frame.depth.dtype == np.float32
            np.testing.assert_array_equal(metres, depth_as(raw, "32FC1"))
            np.testing.assert_allclose(metres, truth, rtol=1e-6, equal_nan=True)
        assert frame.intrinsics == {"fx": 525.0, "fy": 525.0, "cx": 319.5, "cy": 239.5}
        assert frame.world_frame == "world"  # the root of the tf tree
        np.testing.assert_allclose(frame.cam_to_world, expected_pose(TUM_DIR, frame.stamp), rtol=0, atol=1e-6)


def test_world_frame_by_name_wider_pairing_and_mcap_files(tmp_path):
    path = write_rgbd_bag(bag_path(tmp_path, "mcap"), TUM_DIR, "mcap")
    frames = list(read_rosbag(path, COLOR_TOPIC, DEPTH_TOPIC, world_frame="odom", camera_frame=CAMERA_FRAME))
    t_world_odom = expected_pose(TUM_DIR, frames[0].stamp) @ np.linalg.inv(frames[0].cam_to_world)
    np.testing.assert_allclose(t_world_odom, T_WORLD_ODOM, atol=1e-6)  # poses now relative to odom
    assert frames[0].world_frame == "odom"
    # a wide pairing window pairs colour 2 with depth 1 as well; nothing is left out
    assert len(list(read_rosbag(path, COLOR_TOPIC, DEPTH_TOPIC, max_difference=0.05))) == 5
    # the .mcap file inside the bag folder, and the same file on its own (no metadata.yaml)
    (mcap,) = path.glob("*.mcap")
    for source in (mcap, shutil.copy(mcap, tmp_path / "bare.mcap")):
        again = list(read_rosbag(source, COLOR_TOPIC, DEPTH_TOPIC))
        assert len(again) == 4
        np.testing.assert_array_equal(again[-1].color, frames[-1].color)
        np.testing.assert_allclose(again[-1].cam_to_world, expected_pose(TUM_DIR, again[-1].stamp), atol=1e-6)


def test_a_colour_image_before_the_first_tf_is_skipped_with_a_warning(tmp_path):
    first_stamp = tum_frames(TUM_DIR)[0]["rgb_timestamp"]
    path = write_rgbd_bag(bag_path(tmp_path, "ros1"), TUM_DIR, "ros1", tf_after=first_stamp + 0.01)
    warnings = []
    frames = list(read_rosbag(path, COLOR_TOPIC, DEPTH_TOPIC, warn=warnings.append))
    assert [f.frame_id for f in frames] == ["1305031102.211214", "1305031102.275326", "1305031102.311267"]
    assert warnings.pop(0) == f"--bag {path}: {UNPAIRED}"
    assert len(warnings) == 1
    assert warnings[0].startswith("colour image at 1305031102.175304 skipped: no T_world_camera_rgb_optical")
    assert "tf 'odom' -> 'base_link': time 1305031102.175304 is outside the poses' span" in warnings[0]


def test_bag_errors_name_the_flag(tmp_path):
    path = write_rgbd_bag(
        bag_path(tmp_path, "ros1"), TUM_DIR, "ros1", distortion=(0.2624, -0.9531, -0.0054, 0.0026, 1.1633)
    )
    with pytest.raises(ValueError, match=r"distortion .*--assume-rectified"):
        list(read_rosbag(path, COLOR_TOPIC, DEPTH_TOPIC))
    assert len(list(read_rosbag(path, COLOR_TOPIC, DEPTH_TOPIC, assume_rectified=True))) == 4
    with pytest.raises(
        ValueError, match=r"--color-topic: topic '/rgb' is not in the bag; it has: .*image_color"
    ):
        list(read_rosbag(path, "/rgb", DEPTH_TOPIC))
    with pytest.raises(
        ValueError, match=r"--depth-topic: topic '/camera/rgb/camera_info' carries .*CameraInfo"
    ):
        list(read_rosbag(path, COLOR_TOPIC, "/camera/rgb/camera_info"))
    with pytest.raises(ValueError, match="--world-frame: 'map' is not in the bag's tf tree"):
        list(read_rosbag(path, COLOR_TOPIC, DEPTH_TOPIC, world_frame="map", assume_rectified=True))
    with pytest.raises(FileNotFoundError, match="--bag"):
        list(read_rosbag(tmp_path / "missing.bag", COLOR_TOPIC, DEPTH_TOPIC))


def test_a_bag_without_tf_gives_frames_without_a_pose(tmp_path):
    path = write_rgbd_bag(bag_path(tmp_path, "sqlite3"), TUM_DIR, "sqlite3", with_tf=False)
    warnings = []
    frames = list(read_rosbag(path, COLOR_TOPIC, DEPTH_TOPIC, warn=warnings.append))
    assert len(frames) == 4 and all(f.cam_to_world is None for f in frames)
    assert warnings == [
        "the bag has no /tf or /tf_static: frames are sent without a pose (identity)",
        f"--bag {path}: {UNPAIRED}",  # pairing says what it left out, and why
    ]
    with pytest.raises(ValueError, match="--world-frame 'world': the bag has no /tf"):
        list(read_rosbag(path, COLOR_TOPIC, DEPTH_TOPIC, world_frame="world"))
