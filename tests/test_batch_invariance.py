"""A frame's points, voxels and valid mask are bitwise the same alone and inside any batch.

Whatever picks something discrete (the voxel under round/floor, the nearest pixel, the
image bounds, the occlusion test) is computed per point from its own frame's data; these
tests put points exactly on voxel and image boundaries and one float32 ulp either side,
and compare every such decision alone, in mixed batches, in another order, against an
independent float64 reference, and (on a GPU) against the CPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_encoder import client_points_frame, half_size

from bifusion import BiFusionEncoder, EncodeOptions, Frame, Intrinsics
from bifusion.batch import pack_frames
from bifusion.encoder import Points
from bifusion.geometry import voxel_coordinates

DISCRETE = ("point_index", "valid", "voxel")
EXACT = (*DISCRETE, "xyz_world", "rgb", "u", "v", "batch_index")
VOXEL = 0.02
# Power-of-two focal lengths make the image edges exact: u = 512·x + 319.5 is -0.5 at x = -0.625.
K = Intrinsics(512.0, 512.0, 319.5, 239.5)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


@pytest.fixture(scope="module")
def encoders(encoder):
    made = {"cpu": encoder}

    def get(device):
        if device not in made:
            made[device] = BiFusionEncoder(encoder.info.checkpoint_path, device=device)
        return made[device]

    return get


def ulp_triples(values) -> np.ndarray:
    """Each float32 value with its neighbours one ulp below and above."""
    v = np.asarray(values, np.float32)
    return np.concatenate([np.nextafter(v, np.float32(-np.inf)), v, np.nextafter(v, np.float32(np.inf))])


def boundary_points() -> np.ndarray:
    """Camera points on voxel boundaries of both modes (round: (k+½)·size, floor: k·size) and on
    pixel-rounding and image-edge boundaries, each also one ulp either side."""
    k = np.arange(-12, 13)
    on_voxel = ulp_triples(np.concatenate([(k + 0.5) * VOXEL, k * VOXEL]))
    depth = ulp_triples(np.concatenate([(k + 60.5) * VOXEL, (k + 60) * VOXEL]))  # z in 0.96..1.46
    rng = np.random.default_rng(7)
    voxel_xyz = np.stack([on_voxel, rng.permutation(on_voxel), rng.permutation(depth)[: len(on_voxel)]], 1)
    # z = 1: x = (u - cx)/fx exactly; u on the edges (-0.5, W-0.5) and on pixel centres + ½.
    u = np.array([-0.5, 639.5, 100.5, 101.5, 320.0])
    v = np.array([-0.5, 479.5, 50.5, 200.5, 240.0])
    x = ulp_triples((u - K.cx) / K.fx)
    y = ulp_triples((v - K.cy) / K.fy)
    xx, yy = np.meshgrid(x, y)
    edge_xyz = np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)], 1)
    return np.concatenate([voxel_xyz, edge_xyz]).astype(np.float32)


def boundary_frame(pose=None, with_depth=False) -> Frame:
    """Client points without colour on a colour image whose every pixel is distinct."""
    ys, xs = np.mgrid[:480, :640]
    color = np.stack([xs % 256, xs // 256 + 4 * (ys // 256), ys % 256], -1).astype(np.uint8)
    depth = np.ones((480, 640), np.float32) if with_depth else None
    return Frame(color=color, intrinsics=K, depth=depth, cam_to_world=pose, points=boundary_points())


def quarter_turn(t=(0.25, -0.5, 1.0)) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    pose[:3, 3] = t
    return pose


def geometry(encoder, frames, options) -> list[dict[str, np.ndarray]]:
    """Per frame, the points stage's outputs as CPU arrays (batch_index made frame-relative)."""
    with torch.inference_mode():
        points = encoder._points(pack_frames(frames, options, encoder.config, encoder.staging))
    counts = points.counts.tolist()
    out = [{} for _ in frames]
    for name in EXACT:
        for i, part in enumerate(torch.split(getattr(points, name).cpu(), counts)):
            out[i][name] = (part - i).numpy() if name == "batch_index" else part.numpy()
    return out


def assert_bitwise(a: dict, b: dict, fields=EXACT):
    for name in fields:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def mixed_batch(tum_frames):
    """Frames of three sizes, depth and client points, different options, boundary cases."""
    rng = np.random.default_rng(3)
    frames = [
        tum_frames[0],
        boundary_frame(),
        half_size(tum_frames[1]),
        boundary_frame(quarter_turn(), with_depth=True),
        client_points_frame(tum_frames[2], 700, rng, with_rgb=True),
        dataclasses.replace(tum_frames[3], cam_to_world=None),
        boundary_frame(tum_frames[4].cam_to_world),
    ]
    options = [
        EncodeOptions(max_points=2000),
        EncodeOptions(),
        EncodeOptions(max_points=1500),
        EncodeOptions(occlusion_tau=0.25),
        EncodeOptions(),
        EncodeOptions(max_points=20_000),
        EncodeOptions(),
    ]
    return frames, options


@pytest.mark.parametrize("device", DEVICES)
def test_each_frame_alone_equals_it_inside_mixed_batches_bitwise(encoders, mixed_batch, device):
    encoder = encoders(device)
    frames, options = mixed_batch
    alone = [geometry(encoder, [f], [o])[0] for f, o in zip(frames, options, strict=True)]
    together = geometry(encoder, frames, options)
    order = [6, 3, 0, 5, 1, 4, 2]
    reordered = geometry(encoder, [frames[i] for i in order], [options[i] for i in order])
    pairs = geometry(encoder, frames[1:3], options[1:3])
    for i, single in enumerate(alone):
        assert len(single["valid"]) > 0
        assert_bitwise(single, together[i])
        assert_bitwise(single, reordered[order.index(i)])
    for single, paired in zip(alone[1:3], pairs, strict=True):
        assert_bitwise(single, paired)


@pytest.mark.parametrize("device", DEVICES)
def test_boundary_decisions_follow_an_independent_float64_reference(encoders, device):
    encoder = encoders(device)
    frame = boundary_frame()
    got = geometry(encoder, [frame], [EncodeOptions()])[0]
    xyz = frame.points.astype(np.float64)
    # Identity pose: world = camera exactly; round half to even, as torch.round.
    np.testing.assert_array_equal(got["xyz_world"], frame.points)
    np.testing.assert_array_equal(got["voxel"], np.round(xyz / VOXEL).astype(np.float32))
    u = K.fx * xyz[:, 0] / xyz[:, 2] + K.cx
    v = K.fy * xyz[:, 1] / xyz[:, 2] + K.cy
    inside = (u >= -0.5) & (u < 639.5) & (v >= -0.5) & (v < 479.5)
    np.testing.assert_array_equal(got["valid"], inside)
    # The edges are half-open: exactly -0.5 is on the image, exactly W - 0.5 is not.
    assert got["valid"][(u == -0.5) & (v == 240.0)].all()
    assert not got["valid"][(u == 639.5) & (v == 240.0)].any()
    # Colour comes from the nearest pixel, floor(u + 0.5), for every point on the image.
    ui = np.floor(u + 0.5).astype(int)[inside]
    vi = np.floor(v + 0.5).astype(int)[inside]
    np.testing.assert_array_equal(got["rgb"][inside], frame.color[vi, ui].astype(np.float32))
    # Both sides of every boundary are present, so a one-ulp flip would show: one ulp below
    # and above each (k+½)·size fall in neighbouring voxels (x of the first 3×50 points).
    assert 0 < got["valid"].sum() < len(got["valid"])
    below, above = got["voxel"][:25, 0], got["voxel"][100:125, 0]
    np.testing.assert_array_equal(below + 1, above)


@pytest.mark.parametrize("mode", ["round", "floor"])
def test_voxel_boundaries_in_both_modes_match_float64(mode):
    points = torch.from_numpy(boundary_points().astype(np.float64))
    reference = np.round if mode == "round" else np.floor
    got = voxel_coordinates(points, VOXEL, mode).numpy()
    np.testing.assert_array_equal(got, reference(points.numpy() / VOXEL))
    # A point one ulp below a floor boundary k·size lands in voxel k-1 or k, never elsewhere.
    assert np.abs(got - points.numpy() / VOXEL).max() <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_makes_the_same_discrete_decisions_as_the_cpu(encoders, mixed_batch):
    frames, options = mixed_batch
    cpu = geometry(encoders("cpu"), frames, options)
    gpu = geometry(encoders("cuda"), frames, options)
    for a, b in zip(cpu, gpu, strict=True):
        assert_bitwise(a, b, DISCRETE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_of_a_frame_alone_and_in_a_batch_of_five(encoders, tum_frames):
    encoder = encoders("cuda")
    batch = encoder.encode(tum_frames, EncodeOptions(return_points_world=True))
    for frame, together in zip(tum_frames, batch, strict=True):
        alone = encoder.encode([frame], EncodeOptions(return_points_world=True))[0]
        np.testing.assert_array_equal(alone.point_indices, together.point_indices)
        np.testing.assert_array_equal(alone.valid, together.valid)
        np.testing.assert_array_equal(alone.points_world, together.points_world)
        np.testing.assert_allclose(alone.features, together.features, rtol=0, atol=1e-4)
        np.testing.assert_allclose(alone.alpha, together.alpha, rtol=0, atol=1e-4)


def test_gate_mean_is_accumulated_in_float64_at_the_point_limit(encoder):
    """At the 200 000-point limit a float32 sum of alpha drifts by ~3.5e-5."""
    n = encoder.limits.max_points
    gen = torch.Generator().manual_seed(0)
    alpha = torch.rand(n, generator=gen)
    valid = torch.rand(n, generator=gen) > 0.2
    alpha = torch.where(valid, alpha, torch.zeros_like(alpha))
    zeros = torch.zeros(n, 3)
    points = Points(
        rgb=zeros,
        batch_index=torch.zeros(n, dtype=torch.long),
        point_index=torch.arange(n),
        counts=torch.tensor([n]),
        u=zeros[:, 0].double(),
        v=zeros[:, 0].double(),
        valid=valid,
        xyz_world=zeros,
        voxel=zeros,
    )
    frame = Frame(color=np.zeros((16, 16, 3), np.uint8), intrinsics=K)
    (result,) = encoder._results([frame], [EncodeOptions()], points, torch.zeros(n, 1), alpha)
    expected = alpha.double()[valid].mean().item()
    assert abs(result.stats.gate_mean - expected) < 1e-12
    assert result.stats.valid_ratio == valid.double().mean().item()


@pytest.mark.parametrize("group", [1, 3])
def test_the_3d_branch_by_groups_of_frames_gives_each_frame_its_own_result(encoder, mixed_batch, group):
    """``group_3d``: CLIP on the whole batch, the U-Net and the fusion on groups of frames (a
    batch policy may pick it where that is faster). Each frame gets what the whole batch gives
    it, to float32 rounding, and the same points and mask bitwise."""
    frames, options = mixed_batch
    empty = dataclasses.replace(frames[0], depth=np.zeros_like(frames[0].depth), frame_id="empty")
    frames, options = [*frames, empty], [*options, EncodeOptions()]
    whole = encoder.encode(frames, options)
    calls = []
    features_3d = encoder.model.features_3d

    def counted(voxel, rgb, batch_index):
        calls.append(int(batch_index.max()) + 1 if len(batch_index) else 0)
        return features_3d(voxel, rgb, batch_index)

    encoder.group_3d, encoder.model.features_3d = group, counted
    try:
        grouped = encoder.encode(frames, options)
    finally:
        encoder.group_3d = None
        del encoder.model.features_3d
    assert len(calls) == -(-len(frames) // group) and max(calls) <= group
    assert grouped[-1].stats.num_points == 0 and len(grouped[-1].features) == 0
    for a, b in zip(whole, grouped, strict=True):
        np.testing.assert_array_equal(a.point_indices, b.point_indices)
        np.testing.assert_array_equal(a.valid, b.valid)
        np.testing.assert_allclose(a.features, b.features, rtol=0, atol=1e-4)
        np.testing.assert_allclose(a.alpha, b.alpha, rtol=0, atol=1e-4)
        assert b.timings_ms.keys() == a.timings_ms.keys()
