"""The batched encoder on real frames: invariance, no per-frame loops, gating, occlusion."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from bifusion import EncodeOptions, Frame, Intrinsics
from bifusion import geometry as geo
from bifusion.batch import pack_frames


def assert_same_result(a, b, atol=1e-4):
    np.testing.assert_array_equal(a.point_indices, b.point_indices)
    np.testing.assert_array_equal(a.valid, b.valid)
    np.testing.assert_allclose(a.features, b.features, rtol=0, atol=atol)
    np.testing.assert_allclose(a.alpha, b.alpha, rtol=0, atol=atol)


def half_size(frame: Frame) -> Frame:
    """The same view at 320×240: nearest-neighbour depth, intrinsics scaled about pixel centres."""
    color = np.asarray(Image.fromarray(frame.color).resize((320, 240), Image.BILINEAR))
    depth = frame.depth[::2, ::2].copy()
    k = frame.intrinsics
    return dataclasses.replace(
        frame,
        color=color,
        depth=depth,
        intrinsics=Intrinsics(k.fx / 2, k.fy / 2, (k.cx + 0.5) / 2 - 0.5, (k.cy + 0.5) / 2 - 0.5),
        frame_id=frame.frame_id + "-half",
    )


def client_points_frame(frame: Frame, n: int, rng, with_rgb: bool) -> Frame:
    """Points sampled from the frame's own depth, sent as client points (camera frame)."""
    v, u = np.nonzero(frame.depth > 0)
    pick = rng.choice(len(u), n, replace=False)
    u, v = u[pick], v[pick]
    z = frame.depth[v, u] / frame.depth_scale
    k = frame.intrinsics
    xyz = np.stack(((u - k.cx) * z / k.fx, (v - k.cy) * z / k.fy, z), axis=1)
    if with_rgb:
        xyz = np.concatenate((xyz, frame.color[v, u].astype(np.float64)), axis=1)
    return dataclasses.replace(frame, points=xyz.astype(np.float32), frame_id=frame.frame_id + "-pts")


def test_outputs_have_the_documented_shapes_and_invariants(encoder, tum_frames):
    (result,) = encoder.encode(tum_frames[:1])
    n = encoder.config.max_points
    assert result.features.shape == (n, 256) and result.features.dtype == np.float32
    assert result.alpha.shape == (n,) and result.valid.shape == (n,) and result.valid.dtype == bool
    assert result.point_indices.dtype == np.int64
    assert np.all(np.diff(result.point_indices) > 0), "depth points come in raster order"
    np.testing.assert_allclose(np.linalg.norm(result.features, axis=1), 1.0, atol=1e-5)
    assert result.stats.num_points == n
    assert result.stats.gate_mean == pytest.approx(result.alpha[result.valid].mean(), abs=1e-6)
    assert set(result.timings_ms) == {"prepare", "points", "clip", "unet", "fusion", "output"}
    assert result.points_world is None


def test_batch_of_three_real_frames_equals_one_at_a_time(encoder, tum_frames):
    frames = tum_frames[:3]
    batched = encoder.encode(frames)
    for frame, together in zip(frames, batched, strict=True):
        (alone,) = encoder.encode([frame])
        assert_same_result(together, alone)


def test_mixed_sizes_point_counts_and_sources_batch_together(encoder, tum_frames, rng):
    frames = [
        tum_frames[0],
        half_size(tum_frames[1]),
        client_points_frame(tum_frames[2], 3000, rng, with_rgb=False),
        client_points_frame(tum_frames[3], 2500, rng, with_rgb=True),
    ]
    options = [
        EncodeOptions(max_points=8000),
        EncodeOptions(max_points=5000, return_points_world=True),
        EncodeOptions(),
        EncodeOptions(occlusion_tau=0.0),
    ]
    batched = encoder.encode(frames, options)
    assert [r.stats.num_points for r in batched] == [8000, 5000, 3000, 2500]
    for frame, opts, together in zip(frames, options, batched, strict=True):
        (alone,) = encoder.encode([frame], [opts])
        assert_same_result(together, alone)
        assert together.frame_id == frame.frame_id
    assert batched[1].points_world.shape == (5000, 3) and batched[0].points_world is None
    np.testing.assert_array_equal(batched[2].point_indices, np.arange(3000))


def count_calls(monkeypatch, obj, name):
    calls = []
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append(args[0].shape if args and hasattr(args[0], "shape") else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def test_one_clip_and_one_unet_call_per_batch(encoder, tum_frames, monkeypatch):
    model = encoder.model
    clip_calls = count_calls(monkeypatch, model.clip.visual, "forward_intermediates")
    unet_calls = count_calls(monkeypatch, model.unet, "forward")
    fuse_calls = count_calls(monkeypatch, model, "fuse")
    frames = [tum_frames[0], half_size(tum_frames[1]), tum_frames[2]]
    encoder.encode(frames, EncodeOptions(max_points=2000))
    assert len(clip_calls) == 1 and clip_calls[0][0] == 3
    assert len(unet_calls) == 1 and len(fuse_calls) == 1
    assert fuse_calls[0][0] == 3  # the three frames' 2D maps, fused together


def test_invalid_points_2d_features_cannot_change_any_output(encoder, tum_frames, rng, monkeypatch):
    base = client_points_frame(tum_frames[0], 3000, rng, with_rgb=False)
    points = base.points.copy()
    points[:1000, :2] *= 3.0  # far outside the field of view
    points[1000:1300, 2] *= -1.0  # behind the camera
    frame = dataclasses.replace(base, points=points)
    other = tum_frames[1]
    options = [EncodeOptions(), EncodeOptions(max_points=3000)]
    reference = encoder.encode([frame, other], options)
    valid = reference[0].valid
    assert 0 < valid.sum() < len(valid) - 1000

    original = encoder.model.mix

    def poisoned_mix(sampled, point_3d, valid):
        noise = torch.randn_like(sampled) * 1e3
        return original(torch.where(valid.unsqueeze(-1), sampled, noise), point_3d, valid)

    monkeypatch.setattr(encoder.model, "mix", poisoned_mix)
    poisoned = encoder.encode([frame, other], options)
    for a, b in zip(reference, poisoned, strict=True):
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.alpha, b.alpha)
    r = reference[0]
    assert np.all(r.alpha[~r.valid] == 0.0)
    assert np.all(r.alpha[r.valid] > 0.0) and np.all(r.alpha <= 1.0)
    np.testing.assert_allclose(np.linalg.norm(r.features, axis=1), 1.0, atol=1e-5)
    assert r.stats.valid_ratio == pytest.approx(valid.mean())


def test_occlusion_test_rejects_points_behind_the_depth_surface(encoder, tum_frames, rng):
    surface = client_points_frame(tum_frames[0], 2000, rng, with_rgb=True)
    behind = surface.points.copy()
    behind[:, :3] *= 1.5  # same pixels, 50 % further than the measured depth
    frame = dataclasses.replace(surface, points=np.concatenate((surface.points, behind)))
    (tested,) = encoder.encode([frame], EncodeOptions(occlusion_tau=0.25))
    assert tested.valid[:2000].all()
    assert not tested.valid[2000:].any()
    (untested,) = encoder.encode([frame], EncodeOptions(occlusion_tau=0.0))
    assert untested.valid.all()
    no_depth = dataclasses.replace(frame, depth=None)
    (without_depth,) = encoder.encode([no_depth], EncodeOptions(occlusion_tau=0.25))
    assert without_depth.valid.all()


def test_float_metre_depth_equals_uint16_with_scale(encoder, tum_frames):
    frame = tum_frames[0]
    metres = dataclasses.replace(frame, depth=frame.depth.astype(np.float32) / np.float32(frame.depth_scale))
    a, b = encoder.encode([frame, metres], EncodeOptions(max_points=4000))
    assert_same_result(a, b, atol=1e-5)


def test_identity_pose_when_absent(encoder, tum_frames):
    frame = dataclasses.replace(tum_frames[0], cam_to_world=None)
    (result,) = encoder.encode([frame], EncodeOptions(max_points=1000, return_points_world=True))
    idx = result.point_indices
    z = frame.depth.reshape(-1)[idx] / frame.depth_scale
    np.testing.assert_allclose(result.points_world[:, 2], z, rtol=1e-6)


def test_client_points_without_rgb_take_the_colour_they_project_onto(encoder, tum_frames, rng):
    frame = client_points_frame(tum_frames[0], 500, rng, with_rgb=True)
    xyz_only = dataclasses.replace(frame, points=frame.points[:, :3].copy())
    batch = pack_frames([xyz_only], [EncodeOptions()], encoder.config, encoder.staging)
    points = encoder._points(batch)
    np.testing.assert_allclose(points.rgb.numpy(), frame.points[:, 3:], atol=1e-4)


def test_voxel_mode_is_a_checkpoint_setting(tmp_path, tum_frames):
    from bifusion import BiFusionEncoder
    from bifusion.checkpoint_cli import main

    paths = {}
    for mode in ("round", "floor"):
        paths[mode] = tmp_path / f"{mode}.safetensors"
        assert main(["init", str(paths[mode]), "--voxel-mode", mode]) == 0
    results = {
        mode: BiFusionEncoder(path, device="cpu").encode(tum_frames[:1], EncodeOptions(max_points=3000))[0]
        for mode, path in paths.items()
    }
    assert BiFusionEncoder(paths["floor"], device="cpu").config.voxel_mode == "floor"
    assert np.abs(results["round"].features - results["floor"].features).max() > 1e-3


def test_voxel_coordinates_follow_the_mode():
    xyz = torch.tensor([[0.029, -0.011, 0.0]])
    scaled = xyz / 0.02
    assert torch.round(scaled).tolist() == [[1.0, -1.0, 0.0]]
    assert torch.floor(scaled).tolist() == [[1.0, -1.0, 0.0]]
    xyz = torch.tensor([[0.031, -0.009, 0.0]])
    assert torch.round(xyz / 0.02).tolist() == [[2.0, -0.0, 0.0]]
    assert torch.floor(xyz / 0.02).tolist() == [[1.0, -1.0, 0.0]]


def test_same_input_same_output(encoder, tum_frames):
    a = encoder.encode(tum_frames[4:5], EncodeOptions(max_points=3000))[0]
    b = encoder.encode(tum_frames[4:5], EncodeOptions(max_points=3000))[0]
    np.testing.assert_array_equal(a.point_indices, b.point_indices)
    np.testing.assert_array_equal(a.features, b.features)


def test_segment_helpers():
    counts = torch.tensor([2, 0, 3])
    assert geo.segment_ids(counts).tolist() == [0, 0, 2, 2, 2]
    assert geo.segment_offsets(counts).tolist() == [0, 2, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(encoder, tum_frames):
    from bifusion import BiFusionEncoder

    gpu = BiFusionEncoder(encoder.info.checkpoint_path, device="cuda")
    frames = tum_frames[:3]
    for a, b in zip(encoder.encode(frames), gpu.encode(frames), strict=True):
        assert_same_result(a, b, atol=1e-3)
    amp = BiFusionEncoder(encoder.info.checkpoint_path, device="cuda", amp=True)
    for a, b in zip(encoder.encode(frames), amp.encode(frames), strict=True):
        np.testing.assert_array_equal(a.valid, b.valid)
        assert np.mean(np.sum(a.features * b.features, axis=1)) > 0.99


@pytest.mark.parametrize("chunk", [None, 777])
def test_fusion_in_blocks_equals_all_points_at_once(encoder, tum_frames, monkeypatch, chunk):
    options = [EncodeOptions(max_points=5000), EncodeOptions(max_points=3000)]
    reference = encoder.encode(tum_frames[:2], options)
    monkeypatch.setattr(encoder, "fusion_chunk", chunk)
    for a, b in zip(reference, encoder.encode(tum_frames[:2], options), strict=True):
        assert_same_result(a, b, atol=1e-5)
