"""A frame that yields no points is an OK result with zero points, alone, in a batch and served.

The reproduction: RAW_UINT16 depth 40000 everywhere with depth_scale = 399999.99191999994 is
0.1000000020 m in float64 but 0.099999994 m in the model's float32, just under the 0.1 m
minimum depth, so the frame has no points. It used to pass validation and then fail inside
MinkowskiEngine (INTERNAL) alone, or return OK in a batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from serving_harness import running_server

from bifusion import EncodeOptions, InputError
from bifusion.inputs import depth_metres
from bifusion_client.api import BiFusionClient
from bifusion_client.request import build_request, request_from_folder_frame

SCALE = 399999.99191999994


def near_the_minimum(frame):
    return dataclasses.replace(
        frame, depth=np.full_like(frame.depth, 40000), depth_scale=SCALE, frame_id="sky"
    )


def assert_empty(result):
    assert result.stats.num_points == 0
    assert result.features.shape == (0, 256) and result.features.dtype == np.float32
    assert result.alpha.shape == (0,) and result.valid.shape == (0,) and result.point_indices.shape == (0,)
    assert result.stats.valid_ratio == 0.0 and result.stats.gate_mean == 0.0


def test_the_model_arithmetic_puts_the_depth_under_the_minimum(tum_frames, encoder):
    frame = near_the_minimum(tum_frames[0])
    in_float64 = 40000 / SCALE
    assert in_float64 >= encoder.config.min_depth  # float64 would keep it
    assert (depth_metres(frame) < encoder.config.min_depth).all()  # the model's float32 does not


def test_a_frame_without_points_alone_is_an_empty_result(tum_frames, encoder):
    frame = near_the_minimum(tum_frames[0])
    encoder.validate(frame)
    (result,) = encoder.encode([frame], EncodeOptions(return_points_world=True))
    assert_empty(result)
    assert result.points_world.shape == (0, 3)
    assert result.frame_id == "sky"


def test_empty_frames_in_a_batch_leave_the_others_unchanged(tum_frames, encoder):
    options = EncodeOptions(max_points=2000)
    empty = near_the_minimum(tum_frames[0])
    sky = dataclasses.replace(tum_frames[1], depth=np.zeros_like(tum_frames[1].depth))
    alone = encoder.encode(tum_frames[2:3], options)[0]
    results = encoder.encode([empty, tum_frames[2], sky], options)
    assert_empty(results[0])
    assert_empty(results[2])
    np.testing.assert_array_equal(results[1].point_indices, alone.point_indices)
    np.testing.assert_allclose(results[1].features, alone.features, rtol=0, atol=1e-5)
    assert results[1].stats.num_points == 2000


def test_a_batch_of_only_empty_frames_skips_the_unet(tum_frames, encoder, monkeypatch):
    calls = []
    monkeypatch.setattr(encoder.model.unet, "forward", lambda x: calls.append(1))
    results = encoder.encode([near_the_minimum(f) for f in tum_frames[:2]])
    assert [r.stats.num_points for r in results] == [0, 0]
    assert not calls


def test_a_pose_beyond_float32_is_refused_naming_the_field(tum_frames, encoder):
    pose = tum_frames[0].cam_to_world.copy()
    pose[2, 3] = 1e300
    with pytest.raises(InputError, match="cam_to_world"):
        encoder.encode([dataclasses.replace(tum_frames[0], cam_to_world=pose)])


@pytest.fixture(scope="module")
def live(encoder):
    with running_server(encoder) as server:
        yield server


def test_served_empty_frame_is_ok_alone_and_beside_a_good_one(live, tum_folder_frames):
    frame = tum_folder_frames[0]
    depth = np.full_like(frame.depth, 40000)
    empty = build_request(
        frame.color,
        depth,
        frame.intrinsics,
        depth_scale=SCALE,
        frame_id="sky",
        color_format="raw",
        depth_format="raw",
    )
    good = request_from_folder_frame(tum_folder_frames[1], max_points=1000)
    failures = live.metric("bifusion_batch_failures_total", model_instance="0")
    assert failures is not None
    with BiFusionClient(live.address) as client:
        result = client.encode_request(empty, timeout=60)
        assert result.num_points == 0 and result.features.shape == (0, 256)
        assert result.valid_ratio == 0.0 and result.gate_mean == 0.0
        streamed = list(client.encode_stream([empty, good, empty], timeout=120))
    assert [r.num_points for r in streamed] == [0, 1000, 0]
    assert live.metric("bifusion_batch_failures_total", model_instance="0") == failures
