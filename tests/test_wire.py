"""The wire package: committed stubs match a fresh generation, the tensor codec round-trips
and rejects malformed tensors by field, and robots can use the client without torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from serving_harness import ROOT

from bifusion_wire import encoder_pb2 as pb
from bifusion_wire import health
from bifusion_wire.tensor import FieldError, from_tensor, to_tensor


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_wire", ROOT / "scripts" / "generate_wire.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    generator = load_generator()
    fresh = generator.generate(tmp_path)
    for path in fresh:
        committed = generator.CLIENT_ROOT / generator.PACKAGE / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `python scripts/generate_wire.py` and commit the result"
        )
    assert sorted(p.name for p in fresh) == sorted(generator.GENERATED)


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).standard_normal((7, 256)).astype(np.float32),
        np.arange(10, dtype=np.float16),
        np.array([True, False, True]),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.zeros((0, 3), np.float32),
        np.arange(12, dtype=">f4").reshape(3, 4),  # big-endian in, little-endian on the wire
    ],
)
def test_tensor_round_trip(array):
    message = pb.Tensor.FromString(to_tensor(array).SerializeToString())
    back = from_tensor(message, "x")
    assert back.shape == array.shape and back.dtype.name == array.dtype.name
    np.testing.assert_array_equal(back, array)
    assert len(message.data) == array.size * array.itemsize  # raw bytes, nothing else


def test_from_tensor_is_a_view_of_the_bytes():
    message = to_tensor(np.ones((1000, 3), np.float32))
    view = from_tensor(message, "points")
    assert not view.flags.writeable and not view.flags.owndata


@pytest.mark.parametrize(
    "tensor, field, words",
    [
        (
            pb.Tensor(dtype="float32", shape=[10, 3], data=bytes(100)),
            "p.data",
            "truncated: expected 120 bytes, got 100",
        ),
        (
            pb.Tensor(dtype="float32", shape=[2], data=bytes(12)),
            "p.data",
            "too long: expected 8 bytes, got 12",
        ),
        (pb.Tensor(dtype="complex64", shape=[1], data=bytes(8)), "p.dtype", "must be one of"),
        (pb.Tensor(dtype="float32", shape=[-1, 3], data=b""), "p.shape", "≥ 0"),
        # numpy takes at most 64 dimensions: the header is refused before numpy sees it.
        (pb.Tensor(dtype="float32", shape=[1] * 65, data=bytes(4)), "p.shape", "65 dimensions"),
        (pb.Tensor(dtype="float32", shape=[1] * 9, data=bytes(4)), "p.shape", "more than the 8 allowed"),
        # Dimensions whose product overflows 64 bits are compared with the byte count exactly.
        (pb.Tensor(dtype="float32", shape=[2**62, 2**62, 3], data=bytes(12)), "p.data", "truncated"),
        (pb.Tensor(dtype="uint8", shape=[2**63 - 1, 0], data=b"x"), "p.data", "too long"),
    ],
)
def test_malformed_tensors_name_their_field(tensor, field, words):
    with pytest.raises(FieldError) as caught:
        from_tensor(tensor, "p")
    assert caught.value.field == field and words in caught.value.message


def test_allowed_dtypes_are_enforced():
    with pytest.raises(FieldError, match=r"points\.dtype: must be one of float32"):
        from_tensor(to_tensor(np.zeros((2, 3), np.float64)), "points", dtypes=("float32",))


def test_client_works_without_torch_or_the_encoder_package():
    """Import and use the client with torch and bifusion made unimportable."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        sys.modules["bifusion"] = None
        import numpy as np
        from bifusion_client.api import BiFusionClient, error_field
        from bifusion_client.cli import build_parser
        from bifusion_client.frames_folder import load_frames_folder
        from bifusion_client.loadgen import run_load
        from bifusion_client.request import build_request
        from bifusion_client.result import EncodeResult
        from bifusion_client import arg_types, depth_check, model_info, progress
        from bifusion_wire import documented, health
        color, depth = np.zeros((32, 32, 3), np.uint8), np.full((32, 32), 1000, np.uint16)
        request = build_request(color, depth, (30, 30, 15.5, 15.5))
        assert request.intrinsics.width == 32 and request.depth.depth_scale == 1000.0
        build_parser().parse_args(["health", "--address", "127.0.0.1:1"])
        loaded = [name for name, module in sys.modules.items() if module is not None]
        assert not [name for name in loaded if name.split(".")[0] in ("torch", "bifusion")], loaded
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("service", ["", "bifusion.v1.BiFusionEncoder", "é" * 200])
def test_hand_encoded_health_request_matches_grpc_health(service):
    expected = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert health.encode_check_request(service) == expected


def test_hand_decoded_health_response_matches_grpc_health():
    statuses = health_pb2.HealthCheckResponse.ServingStatus
    for name in health.STATUS_NAMES:
        data = health_pb2.HealthCheckResponse(status=statuses.Value(name)).SerializeToString()
        assert health.decode_check_response(data) == name
        # Fields a newer server might add (length-delimited, varint, fixed64) are skipped.
        unknown = b"\x12\x03abc" + b"\x18\x96\x01" + b"\x21" + bytes(8)
        assert health.decode_check_response(data + unknown) == name
    with pytest.raises(ValueError, match="truncated"):
        health.decode_check_response(b"\x08")
