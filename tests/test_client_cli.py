"""``bifusion-client`` against a live server: encode to .npz, info, health exit codes, bench."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from conftest import TUM_DIR
from PIL import Image
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
    assert done.returncode == 0 and done.stderr == "", done.stderr  # no bar without a terminal
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
    scaled = ["2", "0", "0", "0", "0", "1", "0", "0", "0", "0", "1", "0", "0", "0", "0", "1"]
    done = cli("encode", "--address", live.address, "--color", str(tum_dir / meta["rgb"]),
               "--depth", str(tum_dir / meta["depth"]), "--depth-scale", "5000", "--fx", "525", "--fy", "525",
               "--cx", "319.5", "--cy", "239.5", "--pose", *scaled, "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 1
    assert "INVALID_ARGUMENT: cam_to_world: rotation is not orthonormal" in done.stderr


def pair_args(tum_dir, color=None, depth=None):
    meta = json.loads((tum_dir / "frames.json").read_text())["frames"][0]
    return ["--color", str(color or tum_dir / meta["rgb"]), "--depth", str(depth or tum_dir / meta["depth"]),
            "--fx", "525", "--fy", "525", "--cx", "319.5", "--cy", "239.5"]  # fmt: skip


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--max-points", "-5"], "argument --max-points: must be a positive integer, got -5"),
        (["--max-points", "many"], "argument --max-points: must be an integer, got 'many'"),
        (["--depth-scale", "0"], "argument --depth-scale: must be a positive number, got 0"),
        (["--occlusion-tau", "nan"], "argument --occlusion-tau: must be a number ≥ 0, got nan"),
        (["--fx", "nan"], "argument --fx: must be a positive number, got nan"),
        (["--limit", "0"], "argument --limit: must be a positive integer, got 0"),
    ],
)
def test_bad_numbers_are_refused_at_their_flag(tum_dir, tmp_path, flags, words):
    done = cli("encode", "--address", "127.0.0.1:1", *pair_args(tum_dir), *flags, "--out", str(tmp_path))
    assert done.returncode == 2 and words in done.stderr, done.stderr


def test_bad_files_are_named_with_their_flag(tum_dir, tmp_path):
    meta = json.loads((tum_dir / "frames.json").read_text())["frames"][0]
    rgb, depth = tum_dir / meta["rgb"], tum_dir / meta["depth"]
    small = tmp_path / "small-depth.png"
    Image.open(depth).resize((320, 240), Image.NEAREST).save(small)
    cases = [
        (pair_args(tum_dir, color=tum_dir / "frames.json"),
         f"error: --color {tum_dir / 'frames.json'}: not an image file; expected a PNG or JPEG colour image"),
        (pair_args(tum_dir, depth=rgb),
         f"error: --depth {rgb}: expected a 16-bit greyscale PNG, got a PNG image of mode RGB"),
        (pair_args(tum_dir, depth=small),
         f"error: --depth {small} is 320×240 but --color {rgb} is 640×480: depth must be registered"),
        (pair_args(tum_dir, depth=tmp_path / "missing.png"),
         f"error: --depth {tmp_path}/missing.png: No such file or directory"),
        (["--folder", str(tum_dir), "--intrinsics-set", "nope"],
         "error: --intrinsics-set: 'nope' is not in "),
        (["--folder", str(tmp_path)], "frames.json"),
    ]  # fmt: skip
    for flags, words in cases:
        done = cli("encode", "--address", "127.0.0.1:1", *flags, "--out", str(tmp_path / "out"))
        assert done.returncode == 1 and words in done.stderr, (flags, done.stderr)
        assert "Traceback" not in done.stderr and 'error: "' not in done.stderr


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_frame_in_a_folder_is_named_and_the_frames_before_it_are_kept(live, tum_dir, tmp_path, stream):
    """Checked on the client; in a stream too, where gRPC would only say CANCELLED."""
    meta = json.loads((tum_dir / "frames.json").read_text())
    folder = tmp_path / "folder"
    folder.mkdir()
    meta["frames"] = [{**f, "rgb": str(tum_dir / f["rgb"]), "depth": str(tum_dir / f["depth"])}
                      for f in meta["frames"][:2]]  # fmt: skip
    small = Image.open(meta["frames"][1]["depth"]).resize((320, 240), Image.NEAREST)
    small.save(folder / "small.png")
    meta["frames"][1]["depth"] = "small.png"  # the second frame's depth no longer fits its colour
    (folder / "frames.json").write_text(json.dumps(meta))
    second = Path(meta["frames"][1]["rgb"]).stem

    out = tmp_path / "out"
    done = cli("encode", "--address", live.address, "--folder", str(folder), "--max-points", "500",
               "--out", str(out), *(["--stream"] if stream else []))  # fmt: skip
    assert done.returncode == 1
    assert f"error: frame {second}: depth is 320×240 but colour is 640×480" in done.stderr, done.stderr
    assert len(done.stdout.splitlines()) == 1 and len(list(out.glob("*.npz"))) == 1


def test_misscaled_depth_is_warned_about(live, tum_dir, tmp_path):
    """TUM depth (5000 per metre) at the default scale of 1000 puts the scene 5× too far."""
    done = cli("encode", "--address", live.address, *pair_args(tum_dir), "--max-points", "500",
               "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    warning = done.stderr.strip()
    assert (
        warning.startswith("warning: --depth ") and "median depth is 5.88 m with depth scale 1000" in warning
    )
    assert "a depth scale of 5000 (TUM RGB-D): 1.18 m" in warning

    right = cli("encode", "--address", live.address, *pair_args(tum_dir), "--depth-scale", "5000",
                "--max-points", "500", "--out", str(tmp_path))  # fmt: skip
    assert right.returncode == 0 and right.stderr == "", right.stderr


def test_help_shows_defaults():
    encode = cli("encode", "--help")
    assert encode.returncode == 0
    assert "(default: 1000.0)" in encode.stdout and "(default: ros_default)" in encode.stdout
    assert "(default: None)" not in encode.stdout
    bench = cli("bench", "--help").stdout
    assert "concurrent clients (one channel each) (default: 4)" in bench


def test_info_prints_typed_json(live):
    done = cli("info", "--address", live.address)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["model_id"] == live.server.encoder.info.checkpoint_sha256[:12]
    assert info["demo_weights"] is True and info["limits"]["max_batch_size"] == 8
    assert info["amp"] is False  # false fields are shown too
    assert info["limits"]["max_message_bytes"] == 64 * 1024 * 1024  # a number, not "67108864"
    assert "config_json" not in info and isinstance(info["config"], dict)
    assert info["config"] == json.loads(json.dumps(live.server.encoder.info.config.to_dict()))


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


def cli_on_a_terminal(*args, timeout=300) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (as in an interactive shell): (rc, stdout, stderr)."""
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24×120 characters
    process = subprocess.Popen(
        [sys.executable, "-m", "bifusion_client", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=secondary, text=True,
    )  # fmt: skip
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    stdout = process.stdout.read()
    process.wait(timeout)
    return process.returncode, stdout, b"".join(chunks).decode(errors="replace")


def test_progress_bars_with_rate_and_eta_on_a_terminal(live, tum_dir, tmp_path):
    folder = ["--address", live.address, "--folder", str(tum_dir), "--max-points", "500"]
    rc, stdout, stderr = cli_on_a_terminal("encode", *folder, "--limit", "3", "--out", str(tmp_path))
    assert rc == 0, stderr
    assert len(stdout.splitlines()) == 3  # results stay on stdout, apart from the bar
    final = stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r"encode: 100%.*3/3 \[\d\d:\d\d<00:00, +[\d.]+ ?(frame/s|s/frame)\]", final), stderr

    rc, stdout, stderr = cli_on_a_terminal("bench", *folder, "--frames", "4", "--concurrency", "2")
    assert rc == 0 and json.loads(stdout)["frames"] == 4, stderr
    assert re.search(r"bench: 100%.*4/4 \[", stderr), stderr

    rc, _, stderr = cli_on_a_terminal(
        "encode", *folder, "--limit", "1", "--no-progress", "--out", str(tmp_path)
    )
    assert rc == 0 and stderr == "", stderr
