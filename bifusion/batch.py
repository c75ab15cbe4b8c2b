"""Packing a list of frames into device tensors the encoder's stages share.

Images of all frames are concatenated pixel-wise (frames may differ in size), client
point sets row-wise; per-frame camera data is stacked. The loop here only moves each
frame's arrays into the packed buffers; every computation afterwards is batched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .inputs import client_points, depth_metres, intrinsics_vector, pose_matrix
from .staging import HostStaging, Part
from .types import EncodeOptions, Frame


@dataclass
class PackedBatch:
    num_frames: int
    widths: torch.Tensor  # B, int64
    heights: torch.Tensor  # B, int64
    intrinsics: torch.Tensor  # B×4 (fx, fy, cx, cy), float64
    cam_to_world: torch.Tensor  # B×4×4, float64
    color: torch.Tensor  # (Σ H·W)×3 uint8, frame f's pixels start at pixel_offsets[f]
    pixel_offsets: torch.Tensor  # B
    depth: torch.Tensor  # (Σ H·W) metres, 0 where a frame has no depth image
    has_depth: torch.Tensor  # B bool
    client_points: torch.Tensor  # (Σ N)×6 camera xyz + rgb (rgb NaN when not sent)
    client_counts: torch.Tensor  # B, 0 for frames whose points come from depth
    uses_client_points: torch.Tensor  # B bool
    max_points: torch.Tensor  # B
    occlusion_tau: torch.Tensor  # B, 0 = no occlusion test
    size_groups: list[tuple[list[int], int, int]]  # (frame indices, H, W) sharing a size

    @property
    def device(self) -> torch.device:
        return self.color.device


def pack_frames(
    frames: Sequence[Frame],
    options: Sequence[EncodeOptions],
    config: ModelConfig,
    staging: HostStaging,
) -> PackedBatch:
    """One host-to-device transfer for the whole batch: every frame's arrays are written
    once, straight into the (pinned, on CUDA) staging buffer."""
    sizes = [(f.height, f.width) for f in frames]
    pixels = [h * w for h, w in sizes]
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, size in enumerate(sizes):
        groups[size].append(i)

    def column(values, dtype, row_shape=()):
        return Part([np.asarray(values).reshape(-1, *row_shape)], np.dtype(dtype), row_shape)

    parts = dict(
        widths=column([w for _, w in sizes], np.int64),
        heights=column([h for h, _ in sizes], np.int64),
        # Geometry in float64: roundings that pick a voxel or a pixel see exact inputs.
        intrinsics=column([intrinsics_vector(f) for f in frames], np.float64, (4,)),
        cam_to_world=column([pose_matrix(f.cam_to_world) for f in frames], np.float64, (4, 4)),
        color=Part([f.color.reshape(-1, 3) for f in frames], np.dtype(np.uint8), (3,)),
        pixel_offsets=column(np.cumsum([0, *pixels[:-1]]), np.int64),
        depth=Part(
            [
                depth_metres(f) if f.depth is not None else np.zeros(n, np.float32)
                for f, n in zip(frames, pixels, strict=True)
            ],
            np.dtype(np.float32),
        ),
        has_depth=column([f.depth is not None for f in frames], np.bool_),
        client_points=Part(
            [client_points(f.points) for f in frames if f.points is not None], np.dtype(np.float32), (6,)
        ),
        client_counts=column([0 if f.points is None else len(f.points) for f in frames], np.int64),
        uses_client_points=column([f.points is not None for f in frames], np.bool_),
        max_points=column([o.max_points or config.max_points for o in options], np.int64),
        occlusion_tau=column(
            [config.occlusion_tau if o.occlusion_tau is None else o.occlusion_tau for o in options],
            np.float32,
        ),
    )
    return PackedBatch(
        num_frames=len(frames),
        size_groups=[(idx, h, w) for (h, w), idx in groups.items()],
        **staging.upload(parts),
    )
