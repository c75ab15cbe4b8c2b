"""The Triton peer of the benchmark (bench/peers/triton*.py): its tensors both ways, its
model config, its error mapping; and, where Triton is installed (scripts/setup_peers.sh's
venv), one real tritonserver answering like the encoder does in process."""

from __future__ import annotations

import importlib.util
import socket

import grpc
import numpy as np
import pytest

from bench.peers.triton import TritonCallError, TritonEncoderClient
from bench.peers.triton_tensors import (
    INPUTS,
    OUTPUTS,
    answer_from_outputs,
    frame_from_inputs,
    inputs_from_frame,
    model_config,
    output_bytes,
    outputs_from_result,
)
from bifusion import Limits
from bifusion_client.request import request_from_folder_frame
from bifusion_server.decode import decode_request


def decoded(folder_frame, max_points=20_000):
    return decode_request(request_from_folder_frame(folder_frame, max_points=max_points), Limits())


def test_a_frame_goes_through_triton_tensors_unchanged(tum_folder_frames):
    ours = decoded(tum_folder_frames[1])
    arrays = inputs_from_frame(ours.frame, 20_000)
    assert set(arrays) == set(INPUTS)
    for name, array in arrays.items():
        assert array.shape[0] == 1 and array.dtype == INPUTS[name][0] and array.flags.c_contiguous
    frame, options = frame_from_inputs(arrays)
    assert np.array_equal(frame.color, ours.frame.color)
    assert np.array_equal(frame.depth, ours.frame.depth) and frame.depth.dtype == np.uint16
    assert frame.intrinsics == ours.frame.intrinsics  # float64 carries the floats exactly
    assert frame.depth_scale == ours.frame.depth_scale
    assert np.array_equal(frame.cam_to_world, ours.frame.cam_to_world)
    assert options == ours.options


def test_no_pose_means_identity_and_no_max_points_means_the_default(tum_folder_frames):
    frame = decoded(tum_folder_frames[0]).frame
    frame.cam_to_world = None
    back, options = frame_from_inputs(inputs_from_frame(frame, None))
    assert np.array_equal(back.cam_to_world, np.eye(4))
    assert options.max_points is None


def test_a_result_goes_through_triton_tensors_unchanged(rng):
    from bifusion import FrameResult, FrameStats

    n = 300
    result = FrameResult(
        frame_id="f",
        features=rng.standard_normal((n, 256)).astype(np.float32),
        alpha=rng.random(n).astype(np.float32),
        valid=rng.random(n) > 0.3,
        point_indices=rng.permutation(640 * 480)[:n].astype(np.int64),
        stats=FrameStats(n, 0.7, 0.5),
        timings_ms={"unet": 12.5, "clip": 3.0},
    )
    arrays = outputs_from_result(result, batch_size=3)
    assert set(arrays) == set(OUTPUTS)
    assert all(a.shape[0] == 1 and a.dtype == OUTPUTS[name][0] for name, a in arrays.items())
    answer = answer_from_outputs("f", arrays, wire_bytes=7)
    for name in ("features", "alpha", "valid", "point_indices"):
        assert np.array_equal(getattr(answer, name), getattr(result, name))
    assert (answer.batch_size, answer.stage_ms, answer.wire_bytes) == (3, {"unet": 12.5}, 7)
    sizes = output_bytes(n, 256)
    assert all(sizes[name] >= a.nbytes for name, a in arrays.items())


def test_the_model_config_carries_our_batching(tum_folder_frames):
    text = model_config(16, 5.0, "cuda", instances=2, checkpoint="/ckpt.safetensors")
    assert 'backend: "python"' in text and "max_batch_size: 16" in text
    assert "max_queue_delay_microseconds: 5000 }" in text
    assert "count: 2 kind: KIND_GPU" in text and "KIND_CPU" in model_config(8, 2.5, "cpu")
    assert '"/ckpt.safetensors"' in text
    # Triton's own parser, where tritonclient is installed.
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert [i.name for i in config.input] == list(INPUTS)
    assert config.input[0].allow_ragged_batch and not config.input[2].allow_ragged_batch
    assert [o.name for o in config.output] == list(OUTPUTS)


def test_a_triton_failure_counts_as_a_failed_rpc_with_its_status():
    assert isinstance(TritonCallError("StatusCode.UNAVAILABLE", "gone"), grpc.RpcError)
    assert TritonCallError("StatusCode.UNAVAILABLE", "gone").code() == grpc.StatusCode.UNAVAILABLE
    assert TritonCallError(None, "?").code() == grpc.StatusCode.INTERNAL


def test_shared_memory_tensors_are_laid_out_aligned_and_apart():
    offsets: dict[str, int] = {}
    total = TritonEncoderClient._layout({"a": 5, "b": 64, "c": 1}, offsets)
    assert offsets == {"a": 0, "b": 64, "c": 128} and total == 192


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tritonserver_answers_like_the_encoder_over_grpc_and_shared_memory(request, tum_folder_frames):
    if importlib.util.find_spec("pytriton") is None:  # its files are used, not its Python API
        pytest.skip("Triton lives in the peers' venv (scripts/setup_peers.sh)")
    pytest.importorskip("tritonclient.grpc")
    encoder = request.getfixturevalue("encoder")  # only once Triton is known to be there
    from pathlib import Path

    from bench.peers.triton import TritonServer

    root = Path(__file__).resolve().parents[1]
    points = 2000
    requests = [request_from_folder_frame(f, max_points=points) for f in tum_folder_frames[:2]]
    inputs = {}
    for message in requests:
        frame = decode_request(message, Limits()).frame
        inputs[message.frame_id] = inputs_from_frame(frame, points)
    server = TritonServer(
        (free_port(), free_port(), free_port()), "cpu", 8, 5.0, import_paths=[str(root), str(root / "client")]
    )
    try:
        server.wait_ready(timeout=300)
        for shared in (False, True):
            with TritonEncoderClient(server.address, inputs, shared, points, 256) as client:
                for message in requests:
                    answer = client.encode_request(message, timeout=120)
                    frame, options = frame_from_inputs(inputs[message.frame_id])
                    want = encoder.encode([frame], options)[0]
                    assert answer.batch_size == 1
                    assert np.array_equal(answer.point_indices, want.point_indices)
                    assert np.array_equal(answer.valid, want.valid)
                    assert np.array_equal(answer.features, want.features)
                    assert np.array_equal(answer.alpha, want.alpha)
                    assert (answer.wire_bytes == 0) == shared
    finally:
        server.stop()
