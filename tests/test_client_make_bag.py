"""``bifusion-client make-bag``: the sample frames as a bag a camera driver would record, which
``encode --bag`` reads with its default topics, the poses those of frames.json."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import test_client_cli
from conftest import TUM_DIR
from PIL import Image
from test_client_cli import cli

pytest.importorskip("rosbags", reason="the [ros] extra (rosbags) is not installed")

from bifusion_client.encode_io import DEFAULT_COLOR_TOPIC, DEFAULT_DEPTH_TOPIC
from bifusion_client.sources import read_rosbag
from bifusion_client.sources.poses import matrix_to_quaternion, quaternion_to_matrix

live = test_client_cli.live  # the same module-scoped live server fixture


@pytest.mark.parametrize("name", ["sample.bag", "sample"])  # ROS 1; ROS 2 in MCAP
def test_make_bag_writes_the_folders_frames_as_a_driver_would(tmp_path, name):
    path = tmp_path / name
    done = cli("make-bag", "--folder", str(TUM_DIR), "--out-bag", str(path))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary == {"bag": str(path), "format": "ros1" if name.endswith(".bag") else "mcap", "frames": 5,
                       "color_topic": DEFAULT_COLOR_TOPIC, "depth_topic": DEFAULT_DEPTH_TOPIC,
                       "world_frame": "map"}  # fmt: skip
    warnings = []
    frames = list(read_rosbag(path, DEFAULT_COLOR_TOPIC, DEFAULT_DEPTH_TOPIC, world_frame="map",
                              warn=warnings.append))  # fmt: skip
    assert warnings == []  # every colour image has its depth image, and a pose
    entries = json.loads((TUM_DIR / "frames.json").read_text())["frames"]
    assert len(frames) == len(entries) == 5
    for frame, entry in zip(frames, entries, strict=True):
        assert frame.frame_id == f"{entry['rgb_timestamp']:.6f}" and frame.world_frame == "map"
        np.testing.assert_array_equal(
            frame.color, np.asarray(Image.open(TUM_DIR / entry["rgb"]).convert("RGB"))
        )
        raw = np.asarray(Image.open(TUM_DIR / entry["depth"]))
        assert frame.depth.dtype == np.uint16 and frame.depth_scale == 1000.0  # 16UC1 millimetres
        np.testing.assert_array_equal(frame.depth, np.round(raw / 5.0).astype(np.uint16))
        assert frame.intrinsics == {"fx": 525.0, "fy": 525.0, "cx": 319.5, "cy": 239.5}
        np.testing.assert_allclose(frame.cam_to_world, entry["cam_to_world"], rtol=0, atol=1e-12)

    again = cli("make-bag", "--folder", str(TUM_DIR), "--out-bag", str(path))
    assert again.returncode == 1 and f"--out-bag: {path} exists already" in again.stderr


def test_a_failed_make_bag_leaves_no_bag(tmp_path):
    meta = json.loads((TUM_DIR / "frames.json").read_text())
    meta["frames"] = [{**f, "rgb": str(TUM_DIR / f["rgb"]), "depth": str(TUM_DIR / f["depth"])}
                      for f in meta["frames"][:2]]  # fmt: skip
    meta["frames"][1]["depth"] = str(tmp_path / "missing.png")  # the second frame cannot be read
    (tmp_path / "frames.json").write_text(json.dumps(meta))
    done = cli("make-bag", "--folder", str(tmp_path), "--out-bag", str(tmp_path / "new" / "sample.bag"))
    assert done.returncode == 1 and "missing.png: No such file or directory" in done.stderr, done.stderr
    assert not (tmp_path / "new").exists()


def test_the_robotics_example_runs_on_the_made_bag(live, tmp_path):
    """docs/robotics.md's --bag example, flag for flag, on a bag made from the sample frames
    (two frames and few points, to stay quick on a CPU)."""
    bag = tmp_path / "sample_bag"
    assert cli("make-bag", "--folder", str(TUM_DIR), "--out-bag", str(bag)).returncode == 0
    run = tmp_path / "run"
    rerun = ["--rerun", str(run / "features.rrd")] if importlib.util.find_spec("rerun") else []
    done = cli("encode", "--address", live.address, "--bag", str(bag),
               "--color-topic", "/camera/color/image_raw",
               "--depth-topic", "/camera/aligned_depth_to_color/image_raw",
               "--world-frame", "map", "--float16", "--out-dir", str(run / "npz"),
               "--pictures", str(run / "pictures"),
               "--ply", str(run / "ply"), "--out-bag", str(run / "features.bag"), *rerun,
               "--limit", "2", "--max-points", "500")  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["num_points"] for line in lines] == [500, 500]
    entries = json.loads((TUM_DIR / "frames.json").read_text())["frames"]
    saved = np.load(run / "npz" / f"{lines[0]['frame_id']}.npz")
    np.testing.assert_allclose(saved["cam_to_world"], entries[0]["cam_to_world"], rtol=0, atol=1e-12)
    assert len(list((run / "ply").glob("*.ply"))) == len(list((run / "pictures").glob("*.png"))) == 2


def test_matrix_to_quaternion_inverts_quaternion_to_matrix(rng):
    quaternions = rng.normal(size=(500, 4))
    quaternions[:4] = np.eye(4)  # the identity and the three half turns: one branch each
    for q in quaternions:
        q = q / np.linalg.norm(q)
        back = matrix_to_quaternion(quaternion_to_matrix(q))
        np.testing.assert_allclose(back * np.sign(back @ q), q, rtol=0, atol=1e-12)
