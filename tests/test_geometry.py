"""Camera geometry on the real TUM frames and the 2D sampling convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from bifusion import EncodeOptions
from bifusion import geometry as geo


def backproject_every(frame, step: int, max_depth: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera xyz and (u, v) of every ``step``-th pixel with depth in 0.1..max_depth m."""
    depth = torch.from_numpy(frame.depth.astype(np.float64)) / frame.depth_scale
    v, u = torch.meshgrid(
        torch.arange(0, depth.shape[0], step), torch.arange(0, depth.shape[1], step), indexing="ij"
    )
    z = depth[v, u]
    keep = (z > 0.1) & (z < max_depth)
    u, v, z = u[keep].double(), v[keep].double(), z[keep]
    k = torch.tensor(frame.intrinsics.as_array()).expand(len(z), 4)
    return geo.backproject(u, v, z, k), torch.stack((u, v), dim=1)


def test_round_trip_lands_every_point_on_its_pixel_centre(tum_frames):
    for frame in tum_frames:
        xyz_cam, uv = backproject_every(frame, step=1, max_depth=10.0)
        pose = torch.from_numpy(frame.cam_to_world)
        world = geo.transform(xyz_cam, pose)
        back = geo.transform(world, geo.invert_rigid(pose))
        k = torch.tensor(frame.intrinsics.as_array()).expand(len(back), 4)
        u, v = geo.project(back, k)
        w, h = torch.tensor(frame.width), torch.tensor(frame.height)
        assert len(u) > 200_000
        assert geo.inside_image(u, v, back[:, 2], w, h).all()
        error = torch.maximum((u - uv[:, 0]).abs(), (v - uv[:, 1]).abs()).max()
        assert error < 1e-3, f"frame {frame.frame_id}: max reprojection error {error:.2e} px"


def test_encoder_world_points_reproject_onto_their_pixels(encoder, tum_frames):
    frames = tum_frames[:2]
    results = encoder.encode(frames, EncodeOptions(max_points=5000, return_points_world=True))
    for frame, result in zip(frames, results, strict=True):
        pose = torch.from_numpy(frame.cam_to_world)
        cam = geo.transform(torch.from_numpy(result.points_world).double(), geo.invert_rigid(pose))
        k = torch.tensor(frame.intrinsics.as_array()).expand(len(cam), 4)
        u, v = geo.project(cam, k)
        u0 = torch.from_numpy(result.point_indices % frame.width).double()
        v0 = torch.from_numpy(result.point_indices // frame.width).double()
        # float32 world coordinates a couple of metres from the origin: ~1e-4 px
        assert torch.maximum((u - u0).abs(), (v - v0).abs()).max() < 1e-2
        assert result.valid.all() and result.stats.valid_ratio == 1.0
        depth = frame.depth.reshape(-1)[result.point_indices] / frame.depth_scale
        np.testing.assert_allclose(cam[:, 2].numpy(), depth, rtol=1e-5)


def median_nn_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    distances, _ = cKDTree(b.numpy()).query(a.numpy())
    return float(np.median(distances))


def test_consecutive_frames_overlap_in_world_but_not_with_identity_poses(tum_frames):
    clouds = [backproject_every(f, step=4)[0] for f in tum_frames]
    poses = [torch.from_numpy(f.cam_to_world) for f in tum_frames]
    for i in range(len(clouds) - 1):
        with_pose = median_nn_distance(
            geo.transform(clouds[i + 1], poses[i + 1]), geo.transform(clouds[i], poses[i])
        )
        identity = median_nn_distance(clouds[i + 1], clouds[i])
        assert with_pose < 0.01, f"frames {i}->{i + 1}: median NN {with_pose * 1000:.1f} mm"
        assert identity > 0.01, (
            f"frames {i}->{i + 1}: identity poses already overlap ({identity * 1000:.1f} mm)"
        )


def test_encoder_world_points_of_consecutive_frames_overlap(encoder, tum_frames):
    options = EncodeOptions(max_points=60_000, return_points_world=True)
    first, second = encoder.encode(tum_frames[:2], options)
    assert (
        median_nn_distance(torch.from_numpy(second.points_world), torch.from_numpy(first.points_world)) < 0.01
    )


def test_sampling_at_map_cell_centres_returns_the_cell_values():
    height, width, map_h, map_w = 480, 640, 30, 40
    values = torch.arange(map_h * map_w, dtype=torch.float32).view(1, 1, map_h, map_w)
    maps = torch.cat((values, -values))  # two frames
    rows, cols = torch.meshgrid(torch.arange(map_h), torch.arange(map_w), indexing="ij")
    # The centre of map cell (i, j) is image pixel ((j + 0.5) · W/w − 0.5, (i + 0.5) · H/h − 0.5).
    u = ((cols.flatten() + 0.5) * width / map_w - 0.5).float()
    v = ((rows.flatten() + 0.5) * height / map_h - 0.5).float()
    gx, gy = geo.pixel_to_grid(u, v, torch.tensor(width), torch.tensor(height))
    for frame, sign in ((0, 1), (1, -1)):
        index = torch.full_like(u, frame, dtype=torch.long)
        sampled = geo.sample_bilinear(maps, index, gx, gy)[:, 0]
        torch.testing.assert_close(sampled, sign * values.flatten(), rtol=1e-6, atol=1e-4)


def test_packed_sampling_equals_grid_sample_including_borders(rng):
    maps = torch.from_numpy(rng.standard_normal((3, 5, 30, 40)).astype(np.float32))
    n = 4000
    batch_index = torch.from_numpy(rng.integers(0, 3, n))
    gx = torch.from_numpy(rng.uniform(-1.2, 1.2, n).astype(np.float32))
    gy = torch.from_numpy(rng.uniform(-1.2, 1.2, n).astype(np.float32))
    ours = geo.sample_bilinear(maps, batch_index, gx, gy)
    grid = torch.stack((gx, gy), dim=-1).view(1, n, 1, 2)
    reference = torch.cat(
        [
            F.grid_sample(maps[b : b + 1], grid, mode="bilinear", align_corners=False)[0, :, :, 0].T
            for b in range(3)
        ]
    )
    reference = reference.view(3, n, 5)[batch_index, torch.arange(n)]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("intrinsics", [(525.0, 525.0, 319.5, 239.5), (517.3, 516.5, 318.6, 255.3)])
def test_normalised_coordinates_equal_intrinsics_scaled_to_the_map(intrinsics, rng):
    width, height, map_w, map_h = 640, 480, 40, 30
    fx, fy, cx, cy = intrinsics
    xyz = torch.from_numpy(rng.uniform((-1.5, -1.0, 0.3), (1.5, 1.0, 4.0), (5000, 3)))
    u, v = geo.project(xyz, torch.tensor(intrinsics, dtype=torch.float64).expand(len(xyz), 4))
    gx, gy = geo.pixel_to_grid(u, v, torch.tensor(width), torch.tensor(height))
    # Scale the intrinsics to the 40×30 map (pixel centres stay at integer coordinates).
    sx, sy = map_w / width, map_h / height
    scaled = torch.tensor(
        (fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5), dtype=torch.float64
    )
    us, vs = geo.project(xyz, scaled.expand(len(xyz), 4))
    gxs, gys = geo.pixel_to_grid(us, vs, torch.tensor(map_w), torch.tensor(map_h))
    torch.testing.assert_close(gx, gxs, rtol=0, atol=1e-9)
    torch.testing.assert_close(gy, gys, rtol=0, atol=1e-9)


def test_uniform_subsample_is_even_deterministic_and_per_segment():
    counts = torch.tensor([10, 3, 0, 7])
    picked = geo.uniform_subsample(counts, torch.tensor([5, 5, 5, 7]))
    assert picked.tolist() == [0, 2, 4, 6, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
