"""End to end over loopback gRPC with the real TUM frames: served == in-process encoder."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serving_harness import running_server

from bifusion import EncodeOptions
from bifusion_client.api import BiFusionClient
from bifusion_client.request import build_request, request_from_folder_frame

MAX_POINTS = 2000
TOLERANCE = 1e-4  # the encoder's batch-invariance bound
CLIENTS = 8


@pytest.fixture(scope="module")
def live(encoder):
    with running_server(encoder, max_batch_size=8) as live:
        yield live


@pytest.fixture(scope="module")
def reference(encoder, tum_frames):
    """Each frame encoded alone, in process (world points included)."""
    options = EncodeOptions(max_points=MAX_POINTS, return_points_world=True)
    return {f.frame_id: encoder.encode([f], options)[0] for f in tum_frames}


def assert_matches(result, expected, features_tol=TOLERANCE):
    assert result.frame_id == expected.frame_id
    assert result.features.dtype == np.float32
    assert result.features.shape == expected.features.shape == (MAX_POINTS, 256)
    np.testing.assert_array_equal(result.point_indices, expected.point_indices)
    np.testing.assert_array_equal(result.valid, expected.valid)
    np.testing.assert_allclose(result.features, expected.features, rtol=0, atol=features_tol)
    np.testing.assert_allclose(result.alpha, expected.alpha, rtol=0, atol=TOLERANCE)
    assert result.num_points == expected.stats.num_points
    assert result.valid_ratio == pytest.approx(expected.stats.valid_ratio, abs=1e-6)
    assert result.gate_mean == pytest.approx(expected.stats.gate_mean, abs=1e-5)


def concurrently(count, fn):
    """Run ``fn(i)`` on ``count`` threads released together; returns the results in order."""
    barrier = threading.Barrier(count)

    def run(i):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def test_unary_with_8_concurrent_clients_matches_in_process_encoder(live, reference, tum_folder_frames):
    frames = tum_folder_frames

    def one_client(i):
        frame = frames[i % len(frames)]
        with BiFusionClient(live.address) as client:
            return client.encode_request(
                request_from_folder_frame(frame, max_points=MAX_POINTS, world_points=True)
            )

    results = concurrently(CLIENTS, one_client)
    for result in results:
        expected = reference[result.frame_id]
        assert_matches(result, expected)
        np.testing.assert_allclose(result.points_world, expected.points_world, rtol=0, atol=1e-5)
        assert result.model_id == live.server.encoder.info.checkpoint_sha256[:12]
        assert set(result.stage_ms) == {"prepare", "points", "clip", "unet", "fusion", "output"}
    # The batcher batched: at least one response ran in a batch of several frames, and the
    # batch-size histogram saw fewer model calls than frames.
    assert max(r.batch_size for r in results) > 1
    calls = live.metric("bifusion_batch_size_count", model_instance="0")
    assert live.metric("bifusion_batch_size_sum", model_instance="0") / calls > 1


def test_streams_from_8_concurrent_clients_match_in_order(live, reference, tum_folder_frames):
    frames = tum_folder_frames

    def one_stream(i):
        order = [frames[(i + k) % len(frames)] for k in range(3)]
        requests = [request_from_folder_frame(f, max_points=MAX_POINTS) for f in order]
        with BiFusionClient(live.address) as client:
            return [f.frame_id for f in order], list(client.encode_stream(requests))

    batch_sizes = []
    for sent, results in concurrently(CLIENTS, one_stream):
        assert [r.frame_id for r in results] == sent  # one response per frame, in request order
        for result in results:
            assert_matches(result, reference[result.frame_id])
            batch_sizes.append(result.batch_size)
    assert max(batch_sizes) > 1  # frames of different streams shared model calls


def test_float16_output_halves_features_and_stays_close(live, reference, tum_folder_frames):
    frame = tum_folder_frames[1]
    with BiFusionClient(live.address) as client:
        full = client.encode_request(request_from_folder_frame(frame, max_points=MAX_POINTS))
        half = client.encode_request(request_from_folder_frame(frame, max_points=MAX_POINTS, float16=True))
    assert half.features_dtype == "float16" and full.features_dtype == "float32"
    assert half.features.dtype == np.float32  # widened back by the client
    features_bytes = MAX_POINTS * 256 * 2
    assert full.wire_bytes - half.wire_bytes == pytest.approx(features_bytes, rel=0.01)
    assert_matches(half, reference[frame.frame_id], features_tol=1e-3)


@pytest.mark.parametrize("color_format, depth_format", [("raw", "raw"), ("png", "raw"), ("raw", "png")])
def test_raw_and_png_encodings_give_the_same_features(
    live, reference, tum_folder_frames, color_format, depth_format
):
    frame = tum_folder_frames[2]
    request = request_from_folder_frame(
        frame, max_points=MAX_POINTS, color_format=color_format, depth_format=depth_format
    )
    with BiFusionClient(live.address) as client:
        assert_matches(client.encode_request(request), reference[frame.frame_id])


def test_float32_metre_depth_and_jpeg_colour(live, encoder, tum_folder_frames, tum_frames):
    frame = tum_folder_frames[3]
    metres = frame.depth.astype(np.float32) / np.float32(frame.depth_scale)
    with BiFusionClient(live.address) as client:
        result = client.encode_frame(
            frame.color,
            metres,
            frame.intrinsics,
            cam_to_world=frame.cam_to_world,
            frame_id=frame.frame_id,
            max_points=MAX_POINTS,
            color_format="jpeg",
        )
    # JPEG is lossy, so only the geometry is exactly the reference's; features stay unit-norm.
    expected = encoder.encode([tum_frames[3]], EncodeOptions(max_points=MAX_POINTS))[0]
    np.testing.assert_array_equal(result.point_indices, expected.point_indices)
    np.testing.assert_allclose(np.linalg.norm(result.features, axis=1), 1.0, atol=1e-5)


def test_client_points_with_occlusion_test(live, encoder, tum_frames, tum_folder_frames):
    rng = np.random.default_rng(0)
    xyz = rng.uniform((-1, -1, 0.5), (1, 1, 3), size=(500, 3)).astype(np.float32)
    rgb = rng.uniform(0, 255, size=(500, 3)).astype(np.float32)
    points = np.concatenate([xyz, rgb], axis=1)
    folder = tum_folder_frames[0]
    expected = encoder.encode(
        [dataclasses.replace(tum_frames[0], points=points)], EncodeOptions(occlusion_tau=0.25)
    )[0]
    request = build_request(
        folder.color,
        folder.depth,
        folder.intrinsics,
        cam_to_world=folder.cam_to_world,
        depth_scale=folder.depth_scale,
        points=points,
        frame_id=folder.frame_id,
        occlusion_tau=0.25,
    )
    with BiFusionClient(live.address) as client:
        result = client.encode_request(request)
    np.testing.assert_array_equal(result.point_indices, np.arange(500))  # rows of the client's points
    np.testing.assert_array_equal(result.valid, expected.valid)
    assert 0 < result.valid_ratio < 1  # the occlusion test removed some, kept some
    np.testing.assert_allclose(result.features, expected.features, rtol=0, atol=TOLERANCE)


def test_model_info(live):
    with BiFusionClient(live.address) as client:
        info = client.model_info()
    encoder_info = live.server.encoder.info
    assert info.checkpoint_sha256 == encoder_info.checkpoint_sha256
    assert info.model_id == encoder_info.checkpoint_sha256[:12]
    assert info.demo_weights is True
    assert info.device == "cpu"
    assert info.feature_dim == 256
    assert info.limits.max_batch_size == 8
    assert info.limits.default_max_points == 20000
    assert info.limits.max_message_bytes == 64 * 1024 * 1024
    assert info.limits.max_image_side == encoder_info.limits.max_image_side
    assert info.server_version
