"""A failed ``bifusion-client encode`` leaves nothing in the way of the corrected re-run: inputs
and the server are checked before any output exists, and a run that wrote no frame of points
removes what it created (never what was there before). Over real gRPC on loopback."""

from __future__ import annotations

import json

import pytest
import test_client_cli
from conftest import TUM_DIR
from rosbag_data import COLOR_TOPIC, DEPTH_TOPIC, write_rgbd_bag
from serving_harness import free_port
from test_client_cli import cli, pair_args

live = test_client_cli.live  # the same module-scoped live server fixture
NO_ROSBAGS = "the [ros] extra (rosbags) is not installed"


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    pytest.importorskip("rosbags", reason=NO_ROSBAGS)
    return write_rgbd_bag(tmp_path_factory.mktemp("bag") / "in.bag", TUM_DIR, "ros1")


def outputs(root) -> list[str]:
    """Every output flag, under a folder that does not exist yet."""
    return ["--out-dir", str(root / "npz"), "--ply", str(root / "ply"), "--pictures", str(root / "pictures"),
            "--out-bag", str(root / "clouds.bag")]  # fmt: skip


def assert_rerun_works(live, source: list[str], root) -> None:
    done = cli("encode", "--address", live.address, *source, "--limit", "1", "--max-points", "300",
               *outputs(root))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(list((root / "npz").glob("*.npz"))) == 1 and (root / "clouds.bag").is_file()


def test_a_bag_topic_the_bag_lacks_leaves_no_output(live, bag, tmp_path):
    root = tmp_path / "run"
    done = cli("encode", "--address", live.address, "--bag", str(bag), *outputs(root))  # default topics
    assert done.returncode == 1
    assert "--color-topic: topic '/camera/color/image_raw' is not in the bag" in done.stderr, done.stderr
    assert not root.exists()
    assert_rerun_works(
        live, ["--bag", str(bag), "--color-topic", COLOR_TOPIC, "--depth-topic", DEPTH_TOPIC], root
    )


def test_a_world_frame_the_bag_lacks_leaves_no_output(live, bag, tmp_path):
    root = tmp_path / "run"
    topics = ["--bag", str(bag), "--color-topic", COLOR_TOPIC, "--depth-topic", DEPTH_TOPIC]
    done = cli("encode", "--address", live.address, *topics, "--world-frame", "map", *outputs(root))
    assert done.returncode == 1
    assert "--world-frame: 'map' is not in the bag's tf tree" in done.stderr, done.stderr
    assert not root.exists()
    assert_rerun_works(live, [*topics, "--world-frame", "world"], root)


def test_no_server_leaves_no_output_and_names_the_address(live, tmp_path):
    root = tmp_path / "run"
    address = f"127.0.0.1:{free_port()}"
    done = cli("encode", "--address", address, "--folder", str(TUM_DIR), *outputs(root))
    assert done.returncode == 1 and done.stderr.startswith("error: UNAVAILABLE: "), done.stderr
    assert not root.exists()
    assert f"(is the server running at {address}?)" in done.stderr
    assert_rerun_works(live, ["--folder", str(TUM_DIR)], root)


def test_what_was_there_before_is_kept(live, tmp_path):
    """An existing output folder keeps its files; only what the failed run added goes."""
    out = tmp_path / "npz"
    out.mkdir()
    (out / "earlier.npz").write_bytes(b"an earlier run's file")
    done = cli("encode", "--address", f"127.0.0.1:{free_port()}", "--folder", str(TUM_DIR),
               "--out-dir", str(out), "--pictures", str(out / "pictures"))  # fmt: skip
    assert done.returncode == 1
    assert sorted(p.name for p in out.iterdir()) == ["earlier.npz"]
    assert (out / "earlier.npz").read_bytes() == b"an earlier run's file"


def test_a_run_whose_every_frame_is_empty_fails_and_leaves_no_output(live, tmp_path):
    """TUM depth (5000 a metre) read at 50 a metre puts the scene at 118 m, past the model's
    10 m: every frame comes back with 0 points, which must not look like success."""
    root = tmp_path / "run"
    done = cli("encode", "--address", live.address, *pair_args(TUM_DIR), "--depth-scale", "50",
               "--max-points", "300", *outputs(root))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "warning: --depth " in done.stderr  # the scale warning comes first, as before
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the frame came back with 0 points: no depth within the model's 0.1–10 m")
    assert "(its median depth is 117.50 m at depth scale 50)" in error and "(--depth-scale)" in error
    assert not root.exists()

    right = cli("encode", "--address", live.address, *pair_args(TUM_DIR), "--depth-scale", "5000",
                "--max-points", "300", *outputs(root))  # fmt: skip
    assert right.returncode == 0, right.stderr
    assert json.loads(right.stdout)["num_points"] == 300


def test_max_points_over_the_servers_limit_names_what_was_typed(live, tmp_path):
    done = cli("encode", "--address", live.address, "--folder", str(TUM_DIR), "--max-points", "10000000",
               "--out-dir", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 1
    assert "error: --max-points 10000000 is over the server's limit of 200000 points per frame" in done.stderr
    assert "307200" not in done.stderr and not (tmp_path / "out").exists()
    bench = cli("bench", "--address", live.address, "--folder", str(TUM_DIR), "--max-points", "10000000")
    assert bench.returncode == 1 and "--max-points 10000000 is over" in bench.stderr, bench.stderr
