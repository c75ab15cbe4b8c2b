"""The client's frame sources without a bag: time pairing, poses, tf chains, ROS images, TUM's
layout and the frames.json folder (lazy), on the real TUM frames."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TUM_DIR
from PIL import Image
from scipy.spatial.transform import Rotation, Slerp

from bifusion_client.sources import read_folder, read_tum, tum_intrinsics
from bifusion_client.sources.poses import PoseTrack, pose_matrix
from bifusion_client.sources.ros_image import camera_matrix, color_from_image, depth_from_image
from bifusion_client.sources.tf_tree import TfTree
from bifusion_client.sources.timing import associate


def associate_reference(first, second, max_difference=0.02):
    """TUM's associate.py, as published (quadratic, greedy on the smallest difference)."""
    first, second = list(first), list(second)
    potential = sorted((abs(a - b), a, b) for a in first for b in second if abs(a - b) < max_difference)
    matches = []
    for _, a, b in potential:
        if a in first and b in second:
            first.remove(a)
            second.remove(b)
            matches.append((a, b))
    return sorted(matches)


def test_associate_matches_tums_associate_py(rng):
    a = np.sort(rng.uniform(0, 10, 300))
    b = np.sort(rng.uniform(0, 10, 280))
    pairs = associate(a, b, 0.02)
    assert [(a[i], b[j]) for i, j in pairs] == associate_reference(a, b, 0.02)
    assert len({j for _, j in pairs}) == len(pairs)  # one-to-one
    assert associate(a, b, 0.0) == [] and associate([], b) == []
    with pytest.raises(ValueError, match="max difference"):
        associate(a, b, -1.0)


def test_associate_on_the_real_stamps():
    frames = json.loads((TUM_DIR / "frames.json").read_text())["frames"]
    rgb = [f["rgb_timestamp"] for f in frames]
    depth = [f["depth_timestamp"] for f in frames]
    pairs = associate(rgb, depth)
    assert [(rgb[i], depth[j]) for i, j in pairs] == associate_reference(rgb, depth)
    # colour 1 is nearer depth 2 (15.5 ms) than depth 1 (16.9 ms), which leaves colour 2 without a
    # depth image within 20 ms: associate.py pairs them so
    assert pairs == [(0, 0), (1, 2), (3, 3), (4, 4)]


def test_pose_track_lerps_translation_and_slerps_rotation(rng):
    stamps = np.array([0.0, 0.1, 0.25])
    rotations = Rotation.random(3, random_state=1)
    translations = rng.normal(size=(3, 3))
    track = PoseTrack(stamps, translations, rotations.as_quat())
    for t in (0.0, 0.03, 0.1, 0.2, 0.25):
        pose = track.at(t)
        np.testing.assert_allclose(pose[:3, :3], Slerp(stamps, rotations)([t]).as_matrix()[0], atol=1e-12)
        np.testing.assert_allclose(pose[:3, 3], [np.interp(t, stamps, translations[:, i]) for i in range(3)])
    with pytest.raises(LookupError, match="outside"):
        track.at(0.3)


def test_tf_tree_composes_static_and_dynamic_edges_through_a_common_ancestor():
    tree = TfTree()
    q = Rotation.from_rotvec([0.1, 0.2, 0.3]).as_quat()
    tree.add("world", "odom", 0.0, [1, 0, 0], q, static=True)
    tree.add("odom", "base_link", 1.0, [0, 0, 0], [0, 0, 0, 1], static=False)
    tree.add("odom", "base_link", 2.0, [2, 0, 0], [0, 0, 0, 1], static=False)
    tree.add("/base_link", "camera", 0.0, [0, 0, 1], [0, 0, 0, 1], static=True)
    tree.add("world", "marker", 0.0, [0, 5, 0], [0, 0, 0, 1], static=True)
    expected = pose_matrix([1, 0, 0], q) @ pose_matrix([1, 0, 1], [0, 0, 0, 1])  # base_link at x = 1
    np.testing.assert_allclose(tree.lookup("world", "camera", 1.5), expected, atol=1e-12)
    assert tree.root("camera") == "world"
    # sideways through the common ancestor: T_marker_camera = inv(T_world_marker) T_world_camera
    np.testing.assert_allclose(
        tree.lookup("marker", "camera", 1.5), np.linalg.inv(pose_matrix([0, 5, 0], [0, 0, 0, 1])) @ expected
    )
    with pytest.raises(LookupError, match="outside"):
        tree.lookup("world", "camera", 3.0)  # no extrapolation, like tf2
    with pytest.raises(LookupError, match="no frame 'map'"):
        tree.lookup("map", "camera", 1.5)


def _image_msg(pixels: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False):
    height, width = pixels.shape[:2]
    rows = np.ascontiguousarray(pixels.astype(pixels.dtype.newbyteorder(">" if bigendian else "<")))
    rows = rows.view(np.uint8).reshape(height, -1)
    data = np.concatenate([rows, np.zeros((height, pad), np.uint8)], axis=1)  # row padding
    return SimpleNamespace(height=height, width=width, encoding=encoding, is_bigendian=int(bigendian),
                           step=data.shape[1], data=data.reshape(-1))  # fmt: skip


def test_ros_images_decode_each_encoding_exactly(tum_folder_frames):
    frame = tum_folder_frames[0]
    rgb = frame.color
    np.testing.assert_array_equal(color_from_image(_image_msg(rgb, "rgb8"), "/c"), rgb)
    np.testing.assert_array_equal(
        color_from_image(_image_msg(rgb[:, :, ::-1].copy(), "bgr8", pad=8), "/c"), rgb
    )
    millimetres = (frame.depth // 5).astype(np.uint16)
    depth, scale = depth_from_image(_image_msg(millimetres, "16UC1", pad=4, bigendian=True), "/d")
    assert scale == 1000.0 and depth.dtype == np.uint16
    np.testing.assert_array_equal(depth, millimetres)
    metres = np.where(frame.depth > 0, frame.depth / 5000.0, np.nan).astype(np.float32)
    depth, scale = depth_from_image(_image_msg(metres, "32FC1"), "/d")
    assert scale == 1.0 and depth.dtype == np.float32
    np.testing.assert_array_equal(depth, metres)  # NaN where there was no reading
    with pytest.raises(ValueError, match=r"/c: colour encoding 'mono8' is not supported"):
        color_from_image(_image_msg(rgb[:, :, 0], "mono8"), "/c")
    short = _image_msg(rgb, "rgb8")
    short.data = short.data[:-10]
    with pytest.raises(ValueError, match="does not fit"):
        color_from_image(short, "/c")


def test_camera_info_refuses_distortion_unless_rectified():
    k = [525.0, 0, 319.5, 0, 525.0, 239.5, 0, 0, 1]
    p = [520.0, 0, 320.0, 0, 0, 520.0, 240.0, 0, 0, 0, 1, 0]
    plain = SimpleNamespace(k=k, d=[0.0] * 5, p=p, distortion_model="plumb_bob")
    assert camera_matrix(plain, False, "/i") == {"fx": 525.0, "fy": 525.0, "cx": 319.5, "cy": 239.5}
    ros1 = SimpleNamespace(K=k, D=[0.26, -0.95, 0, 0, 1.16], P=p, distortion_model="plumb_bob")
    with pytest.raises(ValueError, match="--assume-rectified"):
        camera_matrix(ros1, False, "/i")
    # a rectified image's camera is P
    assert camera_matrix(ros1, True, "/i") == {"fx": 520.0, "fy": 520.0, "cx": 320.0, "cy": 240.0}


@pytest.fixture(scope="module")
def tum_layout(tmp_path_factory):
    """The real frames in TUM's own layout: rgb.txt, depth.txt, groundtruth.txt."""
    root = tmp_path_factory.mktemp("tum")
    frames = json.loads((TUM_DIR / "frames.json").read_text())["frames"]
    for sub in ("rgb", "depth"):
        shutil.copytree(TUM_DIR / sub, root / sub)
    header = "# colour images\n# file: 'rgbd_dataset_freiburg1_xyz.bag'\n# timestamp filename\n"
    (root / "rgb.txt").write_text(header + "".join(f"{f['rgb_timestamp']:.6f} {f['rgb']}\n" for f in frames))
    (root / "depth.txt").write_text(
        header + "".join(f"{f['depth_timestamp']:.6f} {f['depth']}\n" for f in frames)
    )
    shutil.copy(TUM_DIR / "groundtruth.txt", root / "groundtruth.txt")
    return root


def test_tum_layout_pairs_by_time_and_interpolates_the_ground_truth(tum_layout):
    frames = list(read_tum(tum_layout, tum_intrinsics("ros_default")))
    meta = {f["rgb_timestamp"]: f for f in json.loads((TUM_DIR / "frames.json").read_text())["frames"]}
    depth_files = json.loads((TUM_DIR / "frames.json").read_text())["frames"]
    assert len(frames) == 4  # associate.py's pairs of these five stamps
    for frame, (_, j) in zip(frames, [(0, 0), (1, 2), (3, 3), (4, 4)], strict=True):
        entry = meta[frame.stamp]
        assert frame.frame_id == f"{entry['rgb_timestamp']:.6f}"
        np.testing.assert_array_equal(
            frame.color, np.asarray(Image.open(TUM_DIR / entry["rgb"]).convert("RGB"))
        )
        np.testing.assert_array_equal(frame.depth, np.asarray(Image.open(TUM_DIR / depth_files[j]["depth"])))
        assert frame.depth_scale == 5000.0
        assert frame.intrinsics == {"fx": 525.0, "fy": 525.0, "cx": 319.5, "cy": 239.5}
        np.testing.assert_allclose(
            frame.cam_to_world, entry["cam_to_world_interp_at_rgb_timestamp"], atol=1e-9
        )


def test_tum_reads_lazily_and_refuses_what_it_cannot_use(tum_layout, tmp_path):
    shutil.copytree(tum_layout, tmp_path / "seq")
    frames = read_tum(tmp_path / "seq", tum_intrinsics("ros_default"))
    last = sorted((tmp_path / "seq" / "rgb").iterdir())[-1]
    last.unlink()  # images are opened one pair at a time: the first frames still come
    assert [next(frames).color.shape for _ in range(3)] == [(480, 640, 3)] * 3
    with pytest.raises(FileNotFoundError, match=last.name):
        next(frames)
    with pytest.raises(ValueError, match="--assume-rectified"):
        tum_intrinsics("fr1")
    assert tum_intrinsics("fr1", assume_rectified=True)["fx"] == 517.3
    with pytest.raises(FileNotFoundError, match=r"rgb\.txt"):
        read_tum(tmp_path, tum_intrinsics("ros_default"))


def test_folder_source_is_lazy_and_carries_stamps(tum_folder_frames, tmp_path):
    shutil.copytree(TUM_DIR, tmp_path / "seq")
    frames = read_folder(tmp_path / "seq", limit=3)
    first = next(frames)
    (tmp_path / "seq" / "rgb" / sorted(p.name for p in (TUM_DIR / "rgb").iterdir())[2]).unlink()
    assert first.stamp == pytest.approx(1305031102.175304)
    np.testing.assert_array_equal(first.color, tum_folder_frames[0].color)
    next(frames)
    with pytest.raises(FileNotFoundError):
        next(frames)  # the third image was read only now, after it had gone
    with pytest.raises(ValueError, match="--intrinsics-set: 'nope' is not in"):
        read_folder(TUM_DIR, intrinsics="nope")


def test_sources_and_sinks_need_neither_torch_nor_scipy(tmp_path):
    """What a robot installs: numpy, Pillow, grpcio, protobuf (rosbags and rerun only when asked)."""
    script = f"""
import sys
for name in ("torch", "scipy", "bifusion", "rosbags", "rerun"):
    sys.modules[name] = None  # any import of them now fails
from bifusion_client import encode_io
from bifusion_client.sinks import colors, npz, pictures, ply, pointcloud2, rerun
from bifusion_client.sources import read_folder
frame = next(read_folder({str(TUM_DIR)!r}))
print(frame.frame_id)
try:
    pointcloud2.PointCloud2Sink({str(tmp_path / "x.bag")!r}, colors.FeaturePCA())
except ImportError as error:
    print(error)
from bifusion_client.cli import main
try:  # the CLI says which extra to install, in one line
    main(["encode", "--address", "127.0.0.1:9", "--bag", {str(TUM_DIR)!r}, "--out-dir", {str(tmp_path)!r}])
except SystemExit as exit:
    print("exit", exit.code)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "1305031102.175304",
        "writing bags needs the rosbags package: pip install 'bifusion-client[ros]'",
        "exit 1",
    ]
    assert (
        done.stderr == "error: reading bags needs the rosbags package: pip install 'bifusion-client[ros]'\n"
    )
