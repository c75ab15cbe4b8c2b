"""The bifusion-client distribution, installed from client/ into venvs of its own, on the oldest
supported runtime (Python 3.9 with the floor protobuf/grpcio/numpy/pillow/tqdm of
client/pyproject.toml) and the newest (Python 3.13 with the newest releases): real calls
against a live server on real frames, the CLI, and no torch anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import numpy as np
import pytest
from client_venvs import FLOOR, NEWEST, client_venv, find_python
from conftest import TUM_DIR
from serving_harness import ROOT, running_server

from bifusion import EncodeOptions

RUNTIMES = {runtime.name: runtime for runtime in (FLOOR, NEWEST)}


@pytest.fixture(scope="module")
def live(encoder):
    with running_server(encoder) as live:
        yield live


@pytest.fixture(scope="module", params=sorted(RUNTIMES))
def venv_bin(request):
    runtime = RUNTIMES[request.param]
    python = find_python(runtime.python)
    if python is None:
        pytest.skip(
            f"no usable CPython {runtime.python} with the venv module (tried $BIFUSION_PYTHON"
            f"{runtime.python.replace('.', '')}, python{runtime.python} on PATH, ~/.pyenv/versions, "
            f"/usr/local/bin, /usr/bin): install it to test the {runtime.name} client runtime"
        )
    return runtime, client_venv(runtime, python)


def run(command: list[str], timeout: float = 300, python_protobuf: bool = False):
    # Outside the checkout and with a clean PYTHONPATH: only the installed distribution is seen.
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LC_ALL": "C.UTF-8"}
    if python_protobuf:
        env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


def test_runtime_has_the_versions_it_claims_and_no_torch(venv_bin):
    runtime, bin_dir = venv_bin
    script = textwrap.dedent(
        """
        import importlib.util, json, sys
        import google.protobuf, grpc, numpy, PIL, tqdm
        import bifusion_client.cli, bifusion_client.api, bifusion_client.loadgen
        import bifusion_wire.encoder_pb2_grpc, bifusion_wire.documented
        print(json.dumps({
            "python": "%d.%d" % sys.version_info[:2],
            "protobuf": google.protobuf.__version__, "grpcio": grpc.__version__,
            "numpy": numpy.__version__, "pillow": PIL.__version__, "tqdm": tqdm.__version__,
            "torch": importlib.util.find_spec("torch") is not None,
            "bifusion": importlib.util.find_spec("bifusion") is not None,
            "client_file": bifusion_client.cli.__file__,
        }))
        """
    )
    done = run([str(bin_dir / "python"), "-c", script])
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["python"] == runtime.python
    assert not found["torch"] and not found["bifusion"]
    assert str(ROOT) not in found["client_file"]  # the installed copy, not the checkout
    for pin in runtime.requirements:
        name, version = pin.split("==")
        assert found[name] == version, (name, found)


def test_stubs_work_on_the_pure_python_protobuf_backend(venv_bin):
    """Distro and source builds of protobuf may run without the C extension; -W error: no warnings."""
    _, bin_dir = venv_bin
    script = textwrap.dedent(
        """
        from google.protobuf.internal import api_implementation
        assert api_implementation.Type() == "python", api_implementation.Type()
        from bifusion_wire import encoder_pb2 as pb, encoder_pb2_grpc
        request = pb.EncodeFrameRequest(frame_id="f", cam_to_world=[1.0] * 16)
        request.options.occlusion_tau = 0.0
        back = pb.EncodeFrameRequest.FromString(request.SerializeToString())
        assert back == request and back.options.HasField("occlusion_tau")
        print("ok")
        """
    )
    done = run([str(bin_dir / "python"), "-W", "error", "-c", script], python_protobuf=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_cli_help_shows_defaults(venv_bin):
    _, bin_dir = venv_bin
    for command in ([], ["encode"], ["bench"], ["info"]):
        done = run([str(bin_dir / "bifusion-client"), *command, "--help"])
        assert done.returncode == 0, done.stderr
        assert "usage: bifusion-client" in done.stdout
    encode_help = run([str(bin_dir / "bifusion-client"), "encode", "--help"]).stdout
    assert "(default: 1000.0)" in encode_help  # --depth-scale


def test_cli_health_info_and_encode_against_a_live_server(venv_bin, live, encoder, tum_frames, tmp_path):
    _, bin_dir = venv_bin
    cli = str(bin_dir / "bifusion-client")
    health = run([cli, "health", "--address", live.address])
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr

    info = run([cli, "info", "--address", live.address])
    assert info.returncode == 0, info.stderr
    model = json.loads(info.stdout)
    assert model["demo_weights"] is True and model["amp"] is False
    assert isinstance(model["limits"]["max_message_bytes"], int) and isinstance(model["config"], dict)

    done = run([cli, "encode", "--address", live.address, "--folder", str(TUM_DIR), "--limit", "2",
                "--stream", "--max-points", "500", "--float16", "--out", str(tmp_path)])  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = encoder.encode(tum_frames[:2], EncodeOptions(max_points=500))
    for frame, want in zip(tum_frames[:2], expected, strict=True):
        saved = np.load(tmp_path / f"{frame.frame_id}.npz")
        np.testing.assert_allclose(saved["features"], want.features, rtol=0, atol=2e-3)
        np.testing.assert_array_equal(saved["point_indices"], want.point_indices)


def test_python_api_with_raw_images_against_a_live_server(venv_bin, live, encoder, tum_frames, tmp_path):
    _, bin_dir = venv_bin
    frame = tum_frames[0]
    np.savez(tmp_path / "frame.npz", color=frame.color, depth=frame.depth, pose=frame.cam_to_world)
    script = textwrap.dedent(
        f"""
        import numpy as np
        from bifusion_client.api import BiFusionClient
        frame = np.load({str(tmp_path / "frame.npz")!r})
        with BiFusionClient({live.address!r}) as client:
            result = client.encode_frame(
                frame["color"], frame["depth"], {{"fx": 525.0, "fy": 525.0, "cx": 319.5, "cy": 239.5}},
                cam_to_world=frame["pose"], depth_scale={frame.depth_scale}, max_points=500,
                world_points=True, color_format="raw", depth_format="raw", frame_id="api",
            )
        np.savez({str(tmp_path / "out.npz")!r}, **result.arrays())
        """
    )
    done = run([str(bin_dir / "python"), "-c", script])
    assert done.returncode == 0, done.stderr
    saved = np.load(tmp_path / "out.npz")
    want = encoder.encode([frame], EncodeOptions(max_points=500, return_points_world=True))[0]
    np.testing.assert_allclose(saved["features"], want.features, rtol=0, atol=1e-4)
    np.testing.assert_allclose(saved["points_world"], want.points_world, rtol=0, atol=1e-5)


def test_client_sources_are_python_3_9_syntax():
    """Every module of the distribution compiles on 3.9 (the venv tests run only some paths)."""
    python = find_python(FLOOR.python)
    if python is None:
        pytest.skip(f"no usable CPython {FLOOR.python}")
    files = sorted(str(p) for p in (ROOT / "client").rglob("*.py"))
    script = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f, encoding='utf-8').read(), f, 'exec')"
    done = subprocess.run([python, "-c", script, *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(files) >= 10, files
