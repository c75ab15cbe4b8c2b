"""``bifusion-client`` against a live server: encode to .npz, info, health exit codes, bench."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import TUM_DIR
from serving_harness import ROOT, ModelSpy, free_port, running_server

from bifusion import EncodeOptions


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "bifusion_client", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def live(encoder):
    with running_server(encoder) as live:
        yield live


@pytest.fixture(scope="module")
def tum_dir(tum_folder_frames):
    return TUM_DIR  # tum_folder_frames has checked it exists


def test_encode_a_folder_writes_one_npz_per_frame(live, encoder, tum_frames, tum_dir, tmp_path):
    done = cli("encode", "--address", live.address, "--folder", str(tum_dir), "--limit", "2",
               "--max-points", "1000", "--world-points", "--stream", "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["frame_id"] for line in lines] == [f.frame_id for f in tum_frames[:2]]
    for line, frame in zip(lines, tum_frames[:2], strict=True):
        saved = np.load(line["path"])
        expected = encoder.encode([frame], EncodeOptions(max_points=1000, return_points_world=True))[0]
        np.testing.assert_allclose(saved["features"], expected.features, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(saved["point_indices"], expected.point_indices)
        np.testing.assert_allclose(saved["points_world"], expected.points_world, rtol=0, atol=1e-5)
        assert str(saved["frame_id"]) == frame.frame_id
        assert float(saved["gate_mean"]) == pytest.approx(expected.stats.gate_mean, abs=1e-5)


def test_encode_a_single_pair_with_intrinsics_and_pose(live, encoder, tum_frames, tum_dir, tmp_path):
    meta = json.loads((tum_dir / "frames.json").read_text())["frames"][0]
    frame = tum_frames[0]
    pose = [str(v) for v in frame.cam_to_world.reshape(-1)]
    done = cli("encode", "--address", live.address, "--color", str(tum_dir / meta["rgb"]),
               "--depth", str(tum_dir / meta["depth"]), "--depth-scale", "5000",
               "--fx", "525", "--fy", "525", "--cx", "319.5", "--cy", "239.5", "--pose", *pose,
               "--max-points", "1000", "--frame-id", "pair", "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    saved = np.load(tmp_path / "pair.npz")
    expected = encoder.encode([frame], EncodeOptions(max_points=1000))[0]
    np.testing.assert_allclose(saved["features"], expected.features, rtol=0, atol=1e-4)

    np.savetxt(tmp_path / "pose.txt", frame.cam_to_world)  # the pose from a file gives the same
    done = cli("encode", "--address", live.address, "--color", str(tum_dir / meta["rgb"]),
               "--depth", str(tum_dir / meta["depth"]), "--depth-scale", "5000", "--fx", "525", "--fy", "525",
               "--cx", "319.5", "--cy", "239.5", "--pose", str(tmp_path / "pose.txt"), "--max-points", "1000",
               "--frame-id", "from-file", "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "from-file.npz")["features"], saved["features"])


def test_encode_reports_a_bad_frame_with_its_field(live, tum_dir, tmp_path):
    meta = json.loads((tum_dir / "frames.json").read_text())["frames"][0]
    done = cli("encode", "--address", live.address, "--color", str(tum_dir / meta["rgb"]),
               "--depth", str(tum_dir / meta["depth"]), "--fx", "nan", "--fy", "525", "--cx", "319.5",
               "--cy", "239.5", "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 1
    assert "INVALID_ARGUMENT: intrinsics.fx: must be a finite number" in done.stderr


def test_info_prints_json(live):
    done = cli("info", "--address", live.address)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["model_id"] == live.server.encoder.info.checkpoint_sha256[:12]
    assert info["demo_weights"] is True and info["limits"]["max_batch_size"] == 8


def test_health_exit_codes(live, encoder):
    serving = cli("health", "--address", live.address)
    assert (serving.returncode, serving.stdout.strip()) == (0, "SERVING")

    unreachable = cli("health", "--address", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert unreachable.returncode == 1 and unreachable.stdout.startswith("UNREACHABLE")

    spy = ModelSpy(encoder)
    spy.gate.clear()  # warm-up held: the server is up but not ready
    try:
        with running_server(spy, warmup_frames=1, wait_ready=False) as loading:
            assert spy.entered.wait(30)
            not_yet = cli("health", "--address", loading.address)
            assert (not_yet.returncode, not_yet.stdout.strip()) == (1, "NOT_SERVING")
            spy.gate.set()
    finally:
        spy.gate.set()


def test_bench_prints_latency_percentiles_and_throughput(live, tum_dir):
    done = cli("bench", "--address", live.address, "--folder", str(tum_dir), "--concurrency", "2",
               "--frames", "4", "--max-points", "500", "--float16")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["frames"] == 4 and report["errors"] == {}
    assert report["concurrency"] == 2 and report["frames_per_s"] > 0
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert report["response_bytes_per_frame"] > 500 * 256 * 2
    assert report["options"] == {
        "max_points": 500,
        "float16": True,
        "color_format": "png",
        "depth_format": "png",
    }
