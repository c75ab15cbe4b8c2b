"""Every kind of bad input gets INVALID_ARGUMENT naming the proto field, never reaches the
model, and leaves the server answering good frames."""

from __future__ import annotations

import io
import math

import grpc
import numpy as np
import pytest
from PIL import Image
from serving_harness import health_status, running_server

from bifusion_client.api import BiFusionClient, error_field
from bifusion_client.request import build_request, request_from_folder_frame
from bifusion_wire import encoder_pb2 as pb

MIB = 1024 * 1024
LIMIT = 4 * MIB  # the server's --max-message-bytes here


@pytest.fixture(scope="module")
def live(encoder):
    with running_server(encoder, max_message_bytes=LIMIT) as live:
        yield live


@pytest.fixture(scope="module")
def client(live):
    with BiFusionClient(live.address, max_message_bytes=4 * LIMIT) as client:
        yield client


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_color(request, frame):
    request.color.data = png(frame.color)
    request.color.encoding = pb.ColorImage.PNG


def png_depth(request, depth):
    request.depth.data = png(depth)
    request.depth.encoding = pb.DepthImage.PNG16


def set_pose(request, pose):
    request.cam_to_world[:] = list(np.asarray(pose, dtype=float).reshape(-1))


def scaled_pose(request):
    pose = np.asarray(request.cam_to_world).reshape(4, 4).copy()
    pose[:3, :3] *= 2.0
    set_pose(request, pose)


def big_raw_frame(frame):
    """A 1280×960 raw frame: about 6 MiB on the wire, over the 4 MiB limit, under twice it."""
    color = np.zeros((960, 1280, 3), np.uint8)
    depth = np.full((960, 1280), 5000, np.uint16)
    return build_request(
        color, depth, (525, 525, 639.5, 479.5), depth_scale=5000.0, color_format="raw", depth_format="raw"
    )


def points_request(frame, points: pb.Tensor):
    request = request_from_folder_frame(frame, max_points=500)
    request.ClearField("depth")
    request.points.CopyFrom(points)
    return request


# name: (how to break a good request, the field the error must name, words the message must hold)
CASES = {
    "missing intrinsics": (lambda r, f: r.ClearField("intrinsics"), "intrinsics", "required"),
    "declared width differs from image": (
        lambda r, f: (png_color(r, f), setattr(r.intrinsics, "width", 320)),
        "intrinsics.width",
        "640×480",
    ),
    "depth size differs from colour": (
        lambda r, f: png_depth(r, f.depth[:240, :320]),
        "depth",
        "320×240",
    ),
    "raw colour truncated": (
        lambda r, f: setattr(r.color, "data", r.color.data[:1000]),
        "color.data",
        "truncated: expected 921600 bytes, got 1000",
    ),
    "raw depth truncated": (
        lambda r, f: setattr(r.depth, "data", r.depth.data[:1000]),
        "depth.data",
        "truncated: expected 614400 bytes, got 1000",
    ),
    "raw colour too long": (
        lambda r, f: setattr(r.color, "data", r.color.data + b"\0" * 6),
        "color.data",
        "too long",
    ),
    "truncated PNG": (
        lambda r, f: (png_depth(r, f.depth), setattr(r.depth, "data", r.depth.data[:5000])),
        "depth",
        "corrupt PNG",
    ),
    "corrupt PNG": (
        lambda r, f: (
            setattr(r.color, "data", b"\x89PNG\r\n\x1a\n" + b"garbage" * 100),
            setattr(r.color, "encoding", pb.ColorImage.PNG),
        ),
        "color",
        "corrupt PNG",
    ),
    "PNG sent as JPEG": (
        lambda r, f: (png_color(r, f), setattr(r.color, "encoding", pb.ColorImage.JPEG)),
        "color.encoding",
        "says JPEG but the data is PNG",
    ),
    "colour encoding unset": (
        lambda r, f: setattr(r.color, "encoding", pb.ColorImage.ENCODING_UNSPECIFIED),
        "color.encoding",
        "RAW_RGB8",
    ),
    "missing colour": (lambda r, f: r.ClearField("color"), "color.data", "required"),
    "8-bit depth PNG": (
        lambda r, f: png_depth(r, (f.depth >> 8).astype(np.uint8)),
        "depth",
        "16-bit",
    ),
    "points of dtype float64": (None, "points.dtype", "float32"),
    "points of shape N×4": (None, "points", "N×3"),
    "points of 65 dimensions": (None, "points.shape", "65 dimensions"),
    "NaN intrinsics": (lambda r, f: setattr(r.intrinsics, "fx", math.nan), "intrinsics.fx", "finite"),
    "negative focal length": (lambda r, f: setattr(r.intrinsics, "fy", -525.0), "intrinsics.fy", "positive"),
    "non-rigid pose": (lambda r, f: scaled_pose(r), "cam_to_world", "orthonormal"),
    "pose of 15 numbers": (
        lambda r, f: set_pose(r, np.eye(4).reshape(-1)[:15]),
        "cam_to_world",
        "16 numbers",
    ),
    "NaN pose": (lambda r, f: set_pose(r, np.full(16, math.nan)), "cam_to_world", "finite"),
    "pose translation 1e300": (
        lambda r, f: set_pose(r, np.array([1, 0, 0, 1e300, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1.0])),
        "cam_to_world",
        "translation",
    ),
    "depth scale missing": (
        lambda r, f: setattr(r.depth, "depth_scale", 0.0),
        "depth.depth_scale",
        "positive",
    ),
    "neither depth nor points": (lambda r, f: r.ClearField("depth"), "depth", "required"),
    "max_points over the limit": (
        lambda r, f: setattr(r.options, "max_points", 10**6),
        "options.max_points",
        "200000",
    ),
    "response would exceed the message limit": (
        lambda r, f: setattr(r.options, "max_points", 20000),
        "options.max_points",
        "FLOAT16",
    ),
    "negative occlusion threshold": (
        lambda r, f: setattr(r.options, "occlusion_tau", -1.0),
        "options.occlusion_tau",
        "≥ 0",
    ),
    "unknown output dtype": (
        lambda r, f: setattr(r.options, "output_dtype", 7),
        "options.output_dtype",
        "FLOAT16",
    ),
    "frame id too long": (lambda r, f: setattr(r, "frame_id", "x" * 1000), "frame_id", "256"),
    "oversize message": (None, "color.data", "over the server's limit"),
}


def bad_request(name: str, frame) -> pb.EncodeFrameRequest:
    if name == "points of dtype float64":
        array = np.zeros((10, 3), np.float64)
        return points_request(frame, pb.Tensor(dtype="float64", shape=[10, 3], data=array.tobytes()))
    if name == "points of shape N×4":
        array = np.ones((10, 4), np.float32)
        return points_request(frame, pb.Tensor(dtype="float32", shape=[10, 4], data=array.tobytes()))
    if name == "points of 65 dimensions":
        return points_request(frame, pb.Tensor(dtype="float32", shape=[1] * 65, data=bytes(4)))
    if name == "oversize message":
        return big_raw_frame(frame)
    request = request_from_folder_frame(frame, max_points=500, color_format="raw", depth_format="raw")
    CASES[name][0](request, frame)
    return request


def expect_invalid(client, request, field, words):
    with pytest.raises(grpc.RpcError) as caught:
        client.encode_request(request, timeout=30)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(f"{field}: "), error.details()
    assert words in error.details(), error.details()
    assert error_field(error) == field


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_invalid_argument_naming_the_field(live, client, tum_folder_frames, name):
    _, field, words = CASES[name]
    expect_invalid(client, bad_request(name, tum_folder_frames[0]), field, words)
    assert health_status(live.address) == "SERVING"


def test_after_every_bad_input_a_good_frame_is_answered(live, client, tum_folder_frames):
    frame = tum_folder_frames[0]
    frames_before = live.metric("bifusion_frames_total")
    for name, (_, field, words) in CASES.items():
        expect_invalid(client, bad_request(name, frame), field, words)
    assert live.metric("bifusion_frames_total") == frames_before  # none reached the model
    assert live.metric("bifusion_batch_failures_total", model_instance="0") == 0
    result = client.encode_request(request_from_folder_frame(frame, max_points=500))
    assert result.features.shape == (500, 256)
    assert live.metric("bifusion_frames_total") == frames_before + 1
    assert live.metric("bifusion_requests_total", rpc="EncodeFrame", code="INVALID_ARGUMENT") >= len(CASES)


def test_unparseable_request_bytes(live):
    with grpc.insecure_channel(live.address) as channel:
        call = channel.unary_unary("/bifusion.v1.BiFusionEncoder/EncodeFrame")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff garbage", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("request: not a valid bifusion.v1.EncodeFrameRequest")


def huge_raw_frame():
    """9.6 MB of raw colour: over twice the 4 MiB limit."""
    color = np.zeros((1600, 2000, 3), np.uint8)
    return build_request(color, None, (500, 500, 999.5, 799.5), points=np.ones((1, 3)), color_format="raw")


def test_message_over_twice_the_limit_is_refused_naming_the_field_and_counted(live, client):
    refused_before = live.metric("bifusion_requests_total", rpc="EncodeFrame", code="INVALID_ARGUMENT") or 0
    expect_invalid(client, huge_raw_frame(), "color.data", "over the server's limit of 4194304")
    # Counted before the status is sent: a client that has seen the error sees it counted.
    after = live.metric("bifusion_requests_total", rpc="EncodeFrame", code="INVALID_ARGUMENT")
    assert after == refused_before + 1
    assert health_status(live.address) == "SERVING"


def test_message_over_four_times_the_limit_is_refused_by_grpc_unread(live):
    unlimited = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(live.address, options=unlimited) as channel:
        call = channel.unary_unary("/bifusion.v1.BiFusionEncoder/EncodeFrame")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as caught:
            call(bytes(4 * LIMIT + 1), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.details()
    assert health_status(live.address) == "SERVING"


def test_an_oversize_message_in_a_stream_comes_after_the_responses_before_it(live, client, tum_folder_frames):
    good = request_from_folder_frame(tum_folder_frames[0], max_points=500)
    before = live.metric("bifusion_requests_total", rpc="EncodeStream", code="INVALID_ARGUMENT") or 0
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for result in client.encode_stream([good, huge_raw_frame()], timeout=60):
            received.append(result.frame_id)
    assert received == [good.frame_id]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "#1 in the stream: color.data: the request is" in caught.value.details()
    after = live.metric("bifusion_requests_total", rpc="EncodeStream", code="INVALID_ARGUMENT")
    assert after == before + 1


def test_a_bad_frame_ends_a_stream_after_the_good_ones_before_it(live, client, tum_folder_frames):
    requests = [
        request_from_folder_frame(f, max_points=500, depth_format="raw") for f in tum_folder_frames[:4]
    ]
    requests[2].depth.data = requests[2].depth.data[:1000]
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for result in client.encode_stream(requests, timeout=60):
            received.append(result.frame_id)
    assert received == [requests[0].frame_id, requests[1].frame_id]
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"frame {requests[2].frame_id!r} (#2 in the stream): "
        "depth.data: truncated: expected 614400 bytes, got 1000"
    )
    assert error_field(error) == "depth.data"
