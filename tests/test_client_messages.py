"""What ``bifusion-client`` says when something is off: each message names the flag and the file,
says what is wrong and what to do. None of these needs a server."""

from __future__ import annotations

import json

import pytest
from conftest import TUM_DIR, tum_sequence
from test_client_cli import cli, pair_args

from bifusion_client.cli import build_parser
from bifusion_client.sources import read_tum, tum_intrinsics

NOWHERE = "127.0.0.1:1"  # nothing is sent: every case fails before


def test_missing_files_are_named_with_their_flag(tmp_path):
    missing = tmp_path / "missing.png"
    cases = [
        (pair_args(TUM_DIR, color=missing), f"error: --color {missing}: No such file or directory"),
        (pair_args(TUM_DIR, depth=missing), f"error: --depth {missing}: No such file or directory"),
        ([*pair_args(TUM_DIR), "--pose", str(tmp_path / "pose.txt")],
         f"error: --pose {tmp_path / 'pose.txt'}: No such file or directory"),
    ]  # fmt: skip
    for flags, words in cases:
        done = cli("encode", "--address", NOWHERE, *flags, "--out", str(tmp_path / "out"))
        assert done.returncode == 1 and done.stderr.strip() == words, (flags, done.stderr)
    assert not (tmp_path / "out").exists()


def test_a_broken_frames_json_names_the_file_and_the_flag(tmp_path):
    (tmp_path / "frames.json").write_text('{"frames": [,]}')
    for command in (["encode", "--out", str(tmp_path / "out")], ["bench"]):
        done = cli(command[0], "--address", NOWHERE, "--folder", str(tmp_path), *command[1:])
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip() == (
            f"error: --folder: {tmp_path / 'frames.json'} is not valid JSON: "
            "Expecting value: line 1 column 13 (char 12)"
        )


def test_a_missing_image_of_a_folder_is_named_with_the_flag(tmp_path):
    meta = json.loads((TUM_DIR / "frames.json").read_text())
    meta["frames"] = meta["frames"][:1]
    (tmp_path / "frames.json").write_text(json.dumps(meta))  # its images are not in tmp_path
    done = cli("encode", "--address", NOWHERE, "--folder", str(tmp_path), "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"error: --folder: {tmp_path / meta['frames'][0]['rgb']}: No such file or directory"
    )


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("localhost", "localhost:50051"),
        ("localhost:6000", "localhost:6000"),
        ("10.1.2.3", "10.1.2.3:50051"),
        ("[::1]", "[::1]:50051"),
        ("[::1]:6000", "[::1]:6000"),
        ("::1", "[::1]:50051"),
        ("dns:///encoder.svc", "dns:///encoder.svc:50051"),
        ("dns:///encoder.svc:6000", "dns:///encoder.svc:6000"),
        ("unix:/run/bifusion.sock", "unix:/run/bifusion.sock"),
    ],
)
def test_an_address_without_a_port_gets_the_services(given, target):
    """gRPC itself would try 443."""
    from bifusion_client.arg_types import address

    assert address(given) == target
    assert build_parser().parse_args(["health", "--address", given]).address == target


def test_the_address_from_the_environment_gets_the_port_too(monkeypatch):
    monkeypatch.setenv("BIFUSION_ADDRESS", "encoder-host")
    assert build_parser().parse_args(["info"]).address == "encoder-host:50051"


def test_health_names_the_address_it_could_not_reach():
    done = cli("health", "--address", NOWHERE, "--timeout", "5")
    assert done.returncode == 1 and done.stdout.startswith("UNREACHABLE (UNAVAILABLE: ")
    assert done.stdout.strip().endswith(f"(is the server running at {NOWHERE}?))"), done.stdout


def test_a_misspelt_flag_shows_the_subcommands_usage(tmp_path):
    done = cli("encode", "--folder", str(TUM_DIR), "--outt", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith("usage: bifusion-client encode "), done.stderr
    assert f"error: unrecognized arguments: --outt {tmp_path} (did you mean --out?)" in done.stderr
    bench = cli("bench", "--folder", str(TUM_DIR), "--concurency", "2")
    assert bench.returncode == 2 and bench.stderr.startswith("usage: bifusion-client bench ")
    assert "(did you mean --concurrency?)" in bench.stderr


def test_every_subcommand_has_a_description_and_the_topics_their_encodings():
    for command, words in [
        ("info", "Print the server's ModelInfo as JSON"),
        ("health", "grpc.health.v1"),
        ("bench", "concurrent clients"),
        ("make-bag", "Write the frames of a frames.json folder"),
    ]:
        done = cli(command, "--help")
        assert done.returncode == 0 and words in " ".join(done.stdout.split()), (command, done.stdout)
    encode = " ".join(cli("encode", "--help").stdout.split())
    assert "sensor_msgs/Image: rgb8, bgr8, rgba8 or bgra8" in encode
    assert "port 50051 when none is given" in encode


def test_tum_pairing_says_what_it_left_out(tmp_path):
    seq, _ = tum_sequence(tmp_path)
    from bifusion_client.sources.timing import unpaired_warning

    warnings = []
    frames = read_tum(seq, tum_intrinsics("ros_default"), warn=warnings.append)
    assert frames.count == 4  # associate.py's pairs of the five frames
    assert warnings == [
        f"--tum {seq}: 1 of 5 colour images and 1 of 5 depth images left out: no partner within 0.02 s "
        "(--max-time-difference; TUM's associate.py pairs the same way)"
    ]
    assert not warnings[1:] and read_tum(seq, tum_intrinsics("ros_default"), max_difference=0.05).count == 5
    assert unpaired_warning(5, 5, 5, 0.02) is None
    assert unpaired_warning(5, 3, 3, 0.02).startswith("2 of 5 colour images left out")


def test_the_pairs_flags_with_another_source_are_refused_not_ignored(tmp_path):
    """frames.json, TUM and bags carry their own depth scale: --depth-scale 50 with --folder
    used to be ignored without a word."""
    done = cli("encode", "--address", NOWHERE, "--folder", str(TUM_DIR), "--depth-scale", "50",
               "--pose", "pose.txt", "--out", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 1 and not (tmp_path / "out").exists()
    assert done.stderr.strip() == (
        f"error: --depth-scale, --pose: only for --color/--depth; --folder {TUM_DIR} carries its own "
        "depth scale, poses and frame ids"
    )
