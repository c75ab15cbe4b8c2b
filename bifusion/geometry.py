"""Batched camera geometry on packed point sets.

Points of all frames in a batch lie in one tensor; ``batch_index`` says which frame
each point belongs to, and per-frame quantities are gathered with it. Nothing here
loops over frames or points.

Batch invariance: everything here is elementwise arithmetic in a fixed order (no matmul,
einsum or reduction), so a point's result depends only on its own values and its own
frame's camera — bitwise the same whatever else is in the batch, on any device. The
encoder runs these in float64 where a rounding then picks something discrete (a voxel, a
pixel, the image-bounds test).
"""

from __future__ import annotations

import torch


def segment_offsets(counts: torch.Tensor) -> torch.Tensor:
    """Start of each segment in a packed tensor, given the segment lengths."""
    return torch.cumsum(counts, 0) - counts


def segment_ids(counts: torch.Tensor) -> torch.Tensor:
    """Segment id of every element of a packed tensor (``[0, 0, 1, 2, 2, ...]``)."""
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)


def uniform_subsample(counts: torch.Tensor, max_counts: torch.Tensor) -> torch.Tensor:
    """Deterministic, evenly spread choice of at most ``max_counts[f]`` of each segment.

    Returns indices into the packed tensor: segment ``f`` keeps elements
    ``floor(k * counts[f] / kept[f])`` for ``k < kept[f]``, i.e. a regular stride through
    its elements (raster order for pixels), so coverage stays even and the result
    depends only on that segment.
    """
    kept = torch.minimum(counts, max_counts)
    seg = segment_ids(kept)
    k = torch.arange(int(kept.sum()), device=counts.device) - segment_offsets(kept)[seg]
    local = torch.div(k * counts[seg], kept[seg].clamp_min(1), rounding_mode="floor")
    return segment_offsets(counts)[seg] + local


def backproject(u: torch.Tensor, v: torch.Tensor, z: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Pixel (u, v) with depth z to camera xyz; ``intrinsics`` is P×4 (fx, fy, cx, cy)."""
    fx, fy, cx, cy = intrinsics.unbind(-1)
    return torch.stack(((u - cx) * z / fx, (v - cy) * z / fy, z), dim=-1)


def project(xyz_cam: torch.Tensor, intrinsics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera xyz to pixel coordinates. Points at z <= 0 get finite but meaningless
    coordinates; callers mask them with ``inside_image``."""
    fx, fy, cx, cy = intrinsics.unbind(-1)
    x, y, z = xyz_cam.unbind(-1)
    safe_z = torch.where(z > 0, z, torch.ones_like(z))
    return fx * x / safe_z + cx, fy * y / safe_z + cy


def inside_image(
    u: torch.Tensor, v: torch.Tensor, z: torch.Tensor, width: torch.Tensor, height: torch.Tensor
) -> torch.Tensor:
    """In front of the camera and on the image: pixel i covers [i - 0.5, i + 0.5)."""
    return (z > 0) & (u >= -0.5) & (u < width - 0.5) & (v >= -0.5) & (v < height - 0.5)


def transform(xyz: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """Apply per-point rigid transforms: ``pose`` is P×4×4 (or 4×4), ``R · xyz + t``.

    Written out element by element rather than as a (batched) matrix product, whose
    summation order a BLAS may change with the number of points.
    """
    x, y, z = xyz.unbind(-1)
    p = pose
    rows = [p[..., i, 0] * x + p[..., i, 1] * y + p[..., i, 2] * z + p[..., i, 3] for i in range(3)]
    return torch.stack(rows, dim=-1)


def invert_rigid(pose: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid 4×4 transforms, without a general matrix inverse."""
    rot_t = pose[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(pose)
    out[..., :3, :3] = rot_t
    out[..., :3, 3] = -transform(pose[..., :3, 3], out)
    out[..., 3, 3] = 1
    return out


def voxel_coordinates(xyz: torch.Tensor, voxel_size: float, mode: str) -> torch.Tensor:
    """Integer voxel coordinates (as floats) of points: ``round`` or ``floor`` of xyz / size."""
    scaled = xyz / voxel_size
    return torch.round(scaled) if mode == "round" else torch.floor(scaled)


def pixel_to_grid(
    u: torch.Tensor, v: torch.Tensor, width: torch.Tensor, height: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates to ``grid_sample`` coordinates with ``align_corners=False``.

    The image's edges map to ±1 whatever the resolution of the sampled map, so sampling
    a downscaled map at these coordinates equals scaling the intrinsics to that map.
    """
    return 2 * (u + 0.5) / width - 1, 2 * (v + 0.5) / height - 1


def sample_bilinear(
    maps: torch.Tensor, batch_index: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor
) -> torch.Tensor:
    """``grid_sample(maps, bilinear, zeros padding, align_corners=False)`` for packed points.

    ``maps`` is B×C×H×W; point p samples map ``batch_index[p]`` at (gx[p], gy[p]).
    Returns P×C. One gather over all frames instead of a padded B×Pmax grid.
    """
    b, c, h, w = maps.shape
    x = ((gx + 1) * w - 1) / 2
    y = ((gy + 1) * h - 1) / 2
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    flat = maps.permute(0, 2, 3, 1).reshape(b * h * w, c)
    out = torch.zeros(len(batch_index), c, dtype=maps.dtype, device=maps.device)
    for dx, dy, weight in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        index = (batch_index * h + yi.clamp(0, h - 1)) * w + xi.clamp(0, w - 1)
        out += flat[index] * (weight * inside).unsqueeze(-1).to(maps.dtype)
    return out


def nearest_pixel(
    u: torch.Tensor, v: torch.Tensor, width: torch.Tensor, height: torch.Tensor
) -> torch.Tensor:
    """Flat index ``v * W + u`` of the pixel containing (u, v), clamped onto the image."""
    ui = torch.floor(u + 0.5).long().clamp_min(0).minimum(width.long() - 1)
    vi = torch.floor(v + 0.5).long().clamp_min(0).minimum(height.long() - 1)
    return vi * width.long() + ui
