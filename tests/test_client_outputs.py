"""``bifusion-client encode`` from a bag and a TUM sequence into every output (npz, PLY,
PointCloud2 bag, pictures, Rerun), over real gRPC on loopback, checked against the encoder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import test_client_cli
from conftest import TUM_DIR, tum_sequence
from PIL import Image
from rosbag_data import COLOR_TOPIC, DEPTH_TOPIC, expected_pose, write_rgbd_bag
from test_client_cli import cli

from bifusion import EncodeOptions, Frame, Intrinsics
from bifusion_client.sinks.colors import FeaturePCA, heat_colors
from bifusion_client.sinks.pictures import LABEL_HEIGHT, point_owner
from bifusion_client.sinks.ply import PLY_DTYPE

NO_ROSBAGS = "the [ros] extra (rosbags) is not installed"
MAX_POINTS = 2000
live = test_client_cli.live  # the same module-scoped live server fixture


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    pytest.importorskip("rosbags", reason=NO_ROSBAGS)
    return write_rgbd_bag(tmp_path_factory.mktemp("bag") / "in_mcap", TUM_DIR, "mcap", "bgr8", "16UC1")


def read_ply(path):
    data = path.read_bytes()
    header, _, body = data.partition(b"end_header\n")
    lines = header.decode("ascii").splitlines()
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"]
    count = int(next(line for line in lines if line.startswith("element vertex")).split()[-1])
    assert [line.split()[1:] for line in lines if line.startswith("property")] == [
        ["float", "x"], ["float", "y"], ["float", "z"], ["uchar", "red"], ["uchar", "green"],
        ["uchar", "blue"], ["float", "alpha"], ["uchar", "valid"],
    ]  # fmt: skip
    return np.frombuffer(body, dtype=PLY_DTYPE, count=count)


def read_clouds(path):
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    with AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        return [
            (connection.topic, reader.deserialize(raw, connection.msgtype))
            for connection, _, raw in reader.messages()
        ]


def cloud_arrays(msg):
    names = [f.name for f in msg.fields]
    assert names == ["x", "y", "z", "rgb", "alpha", "valid"]
    assert [f.datatype for f in msg.fields] == [7, 7, 7, 7, 7, 2] and msg.point_step == 24
    layout = np.dtype({"names": names, "formats": ["<f4", "<f4", "<f4", "<u4", "<f4", "u1"],
                       "offsets": [f.offset for f in msg.fields], "itemsize": msg.point_step})  # fmt: skip
    return np.frombuffer(np.asarray(msg.data, dtype=np.uint8).tobytes(), dtype=layout, count=msg.width)


def test_encode_a_bag_into_every_output(live, encoder, bag, tmp_path):
    out = {name: tmp_path / name for name in ("npz", "ply", "pictures")}
    args = ["encode", "--address", live.address, "--bag", str(bag), "--color-topic", COLOR_TOPIC,
            "--depth-topic", DEPTH_TOPIC, "--max-points", str(MAX_POINTS), "--float16", "--stream",
            "--out-dir", str(out["npz"]), "--ply", str(out["ply"]), "--pictures", str(out["pictures"]),
            "--out-bag", str(tmp_path / "clouds.bag")]  # fmt: skip
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 4  # associate.py's pairs of the five frames

    from bifusion_client.sources import read_rosbag

    frames = list(read_rosbag(bag, COLOR_TOPIC, DEPTH_TOPIC))
    saved = [np.load(out["npz"] / f"{frame.frame_id}.npz") for frame in frames]
    pca = FeaturePCA().fit(saved[0]["features"].astype(np.float32))  # fitted on the first frame only
    clouds = read_clouds(tmp_path / "clouds.bag")
    assert [topic for topic, _ in clouds] == ["/bifusion/points"] * 4
    # the encoder in-process, on the frames as read from the bag (millimetre depth), in one batch
    encoded = encoder.encode(
        [Frame(color=f.color, depth=f.depth, depth_scale=1000.0, cam_to_world=f.cam_to_world,
               intrinsics=Intrinsics(**f.intrinsics)) for f in frames],
        EncodeOptions(max_points=MAX_POINTS, return_points_world=True),
    )  # fmt: skip
    for frame, npz, line, (_, cloud), expected in zip(frames, saved, lines, clouds, encoded, strict=True):
        assert line["frame_id"] == frame.frame_id and line["path"] == str(
            out["npz"] / f"{frame.frame_id}.npz"
        )
        # self-contained npz: float16 kept, and the frame's geometry and time
        assert npz["features"].dtype == np.float16 and npz["features"].shape == (MAX_POINTS, 256)
        np.testing.assert_array_equal(npz["image_size_wh"], [640, 480])
        np.testing.assert_array_equal(npz["intrinsics_fx_fy_cx_cy"], [525.0, 525.0, 319.5, 239.5])
        np.testing.assert_allclose(npz["cam_to_world"], expected_pose(TUM_DIR, frame.stamp), atol=1e-6)
        assert bool(npz["has_pose"]) and float(npz["stamp"]) == pytest.approx(frame.stamp, abs=1e-6)
        assert float(npz["depth_scale"]) == 1000.0
        np.testing.assert_allclose(npz["features"].astype(np.float32), expected.features, rtol=0, atol=2e-3)
        np.testing.assert_array_equal(npz["point_indices"], expected.point_indices)
        np.testing.assert_allclose(npz["points_world"], expected.points_world, rtol=0, atol=1e-5)
        colors = pca.colors(npz["features"].astype(np.float32))
        # PLY: same points, PCA colours from the first frame's fit, alpha, valid
        ply = read_ply(out["ply"] / f"{frame.frame_id}.ply")
        np.testing.assert_array_equal(np.stack([ply["x"], ply["y"], ply["z"]], 1), npz["points_world"])
        np.testing.assert_array_equal(np.stack([ply["red"], ply["green"], ply["blue"]], 1), colors)
        np.testing.assert_array_equal(ply["alpha"], npz["alpha"])
        np.testing.assert_array_equal(ply["valid"], npz["valid"])
        # PointCloud2: world frame, the image's stamp, the same attributes
        assert cloud.header.frame_id == "world"
        assert cloud.header.stamp.sec + cloud.header.stamp.nanosec * 1e-9 == pytest.approx(
            frame.stamp, abs=1e-6
        )
        points = cloud_arrays(cloud)
        np.testing.assert_array_equal(
            np.stack([points["x"], points["y"], points["z"]], 1), npz["points_world"]
        )
        packed = (colors[:, 0].astype(np.uint32) << 16) | (colors[:, 1].astype(np.uint32) << 8) | colors[:, 2]
        np.testing.assert_array_equal(points["rgb"], packed)
        np.testing.assert_array_equal(points["alpha"], npz["alpha"])
        np.testing.assert_array_equal(points["valid"], npz["valid"])
        # picture: colour | valid | alpha | PCA, each point painted at its own pixel
        picture = np.asarray(Image.open(out["pictures"] / f"{frame.frame_id}.png"))
        assert picture.shape == (480 + LABEL_HEIGHT, 4 * 640, 3)
        panels = [picture[LABEL_HEIGHT:, k * 640 : (k + 1) * 640] for k in range(4)]
        np.testing.assert_array_equal(panels[0], frame.color)
        v, u = np.divmod(npz["point_indices"], 640)
        valid = npz["valid"].astype(bool)
        np.testing.assert_array_equal(panels[1][v, u].min(axis=1) > 200, valid)  # white where valid
        np.testing.assert_array_equal(panels[2][v[valid], u[valid]], heat_colors(npz["alpha"][valid]))
        np.testing.assert_array_equal(panels[3][v, u], colors)
        owner = point_owner(npz["point_indices"], frame.depth > 0)
        painted, has_depth = owner >= 0, frame.depth > 0
        assert not np.any(painted & ~has_depth)  # holes in the depth stay black
        assert painted[has_depth].mean() > 0.999  # filled, not a scatter of dots
        np.testing.assert_array_equal(panels[3][owner < 0], 0)


def test_encode_writes_a_rerun_recording(live, bag, tmp_path):
    pytest.importorskip("rerun", reason="the [rerun] extra (rerun-sdk) is not installed")
    path = tmp_path / "run.rrd"
    done = cli("encode", "--address", live.address, "--bag", str(bag), "--color-topic", COLOR_TOPIC,
               "--depth-topic", DEPTH_TOPIC, "--max-points", "500", "--limit", "2",
               "--rerun", str(path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert path.read_bytes()[:4] == b"RRF2"  # an .rrd
    try:
        from rerun.chunk import RrdReader
    except ImportError:
        return  # older rerun-sdk: no reader to look inside with
    rows = {}
    for chunk in RrdReader(path).stream().to_chunks():
        rows[chunk.entity_path] = rows.get(chunk.entity_path, 0) + chunk.num_rows
    for entity in ("/world/camera/image", "/world/points/pca", "/world/points/alpha"):
        assert rows.get(entity) == 2, (entity, rows)


def fake_result(n: int, rng):
    features = rng.normal(size=(n, 256)).astype(np.float32)
    return SimpleNamespace(
        features=features / np.linalg.norm(features, axis=1, keepdims=True),
        points_world=rng.normal(size=(n, 3)).astype(np.float32),
        alpha=rng.uniform(size=n).astype(np.float32),
        valid=rng.uniform(size=n) > 0.3,
    )


@pytest.mark.parametrize(
    ("name", "fmt", "storage"), [("out_mcap", None, "mcap"), ("out_db", "sqlite3", "sqlite3")]
)
def test_pointcloud2_into_ros2_bags(tmp_path, rng, name, fmt, storage):
    pytest.importorskip("rosbags", reason=NO_ROSBAGS)
    from bifusion_client.sinks.pointcloud2 import PointCloud2Sink

    pca = FeaturePCA()
    sink = PointCloud2Sink(tmp_path / name, pca, world_frame="map", topic="/features", fmt=fmt)
    results = [fake_result(300, rng), fake_result(200, rng)]
    for stamp, result in zip((10.5, 10.6), results, strict=True):
        sink.write(SimpleNamespace(stamp=stamp, world_frame="odom"), result)
    sink.close()
    assert "storage_identifier: " + storage in (tmp_path / name / "metadata.yaml").read_text()
    clouds = read_clouds(tmp_path / name)
    got = [(topic, msg.header.frame_id, msg.width) for topic, msg in clouds]
    assert got == [("/features", "map", 300), ("/features", "map", 200)]  # --world-frame wins
    for (_, msg), result in zip(clouds, results, strict=True):
        points = cloud_arrays(msg)
        np.testing.assert_array_equal(points["alpha"], result.alpha)
        np.testing.assert_array_equal(points["valid"], result.valid)
    with pytest.raises(FileExistsError, match="never overwritten"):
        PointCloud2Sink(tmp_path / name, pca)


def test_pca_colours_are_fitted_once_and_deterministic(rng):
    first, second = fake_result(400, rng).features, fake_result(400, rng).features
    pca = FeaturePCA()
    a = pca.colors(first)
    b = pca.colors(second)  # the first frame's fit, not a new one
    np.testing.assert_array_equal(b, FeaturePCA().fit(first).colors(second))
    assert not np.array_equal(b, FeaturePCA().fit(second).colors(second))
    np.testing.assert_array_equal(a, FeaturePCA().fit(first).colors(first))  # no sign flips between runs
    assert a.dtype == np.uint8 and a.shape == (400, 3) and a.min() == 0 and a.max() == 255
    np.testing.assert_array_equal(
        heat_colors(np.array([0.0, 1.0, 2.0])), [[0, 0, 4], [252, 255, 164], [252, 255, 164]]
    )


def test_a_frame_without_points_leaves_the_pca_fit_to_a_later_frame(rng):
    """A frame with no points (every depth out of range) is not an error: the outputs show it,
    and the colours are fitted on the first frame that has points."""
    pca = FeaturePCA()
    assert pca.colors(np.zeros((0, 256), dtype=np.float32)).shape == (0, 3) and not pca.fitted
    later = fake_result(400, rng).features
    np.testing.assert_array_equal(pca.colors(later), FeaturePCA().fit(later).colors(later))


def test_encode_a_tum_sequence_to_npz(live, tmp_path):
    seq, entries = tum_sequence(tmp_path)
    done = cli("encode", "--address", live.address, "--tum", str(seq), "--limit", "2", "--max-points", "500",
               "--out-dir", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["frame_id"] for line in lines] == ["1305031102.175304", "1305031102.211214"]
    first = np.load(lines[0]["path"])
    assert first["features"].dtype == np.float32 and float(first["depth_scale"]) == 5000.0
    np.testing.assert_allclose(
        first["cam_to_world"], entries[0]["cam_to_world_interp_at_rgb_timestamp"], atol=1e-9
    )
    assert float(first["stamp"]) == entries[0]["rgb_timestamp"]

    # a source that fails half-way through a stream: the frames before it are written, and
    # the error says what failed (not a bare CANCELLED from gRPC)
    (seq / entries[1]["rgb"]).unlink()
    done = cli("encode", "--address", live.address, "--tum", str(seq), "--stream", "--max-points", "300",
               "--out-dir", str(tmp_path / "partial"))  # fmt: skip
    assert done.returncode == 1 and entries[1]["rgb"].split("/")[-1] in done.stderr, done.stderr
    assert "CANCELLED" not in done.stderr
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == ["1305031102.175304.npz"]


def test_encode_needs_an_output_and_names_bad_flags(live, bag, tmp_path):
    done = cli("encode", "--address", live.address, "--bag", str(bag))
    assert done.returncode == 1 and "encode needs at least one output: --out-dir" in done.stderr
    done = cli("encode", "--address", live.address, "--bag", str(bag), "--color-topic", "/nope",
               "--out-dir", str(tmp_path))  # fmt: skip
    assert done.returncode == 1 and "--color-topic: topic '/nope' is not in the bag" in done.stderr
    done = cli("encode", "--address", live.address, "--bag", str(bag), "--color-topic", COLOR_TOPIC,
               "--depth-topic", DEPTH_TOPIC, "--fx", "500", "--out-dir", str(tmp_path))  # fmt: skip
    assert done.returncode == 1 and "missing --fy, --cx, --cy" in done.stderr
