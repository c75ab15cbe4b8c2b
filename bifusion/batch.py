"""Packing a list of frames into device tensors the encoder's stages share.

Images of all frames are concatenated pixel-wise (frames may differ in size), client
point sets row-wise; per-frame camera data is stacked. The loop here only moves each
frame's arrays into the packed buffers; every computation afterwards is batched.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .types import EncodeOptions, Frame


@dataclass
class PackedBatch:
    num_frames: int
    widths: torch.Tensor  # B, int64
    heights: torch.Tensor  # B, int64
    intrinsics: torch.Tensor  # B×4 (fx, fy, cx, cy)
    cam_to_world: torch.Tensor  # B×4×4
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
    device: torch.device,
) -> PackedBatch:
    def cat(arrays, dtype, empty_shape):
        # Read-only views are fine: torch.cat copies them into a fresh buffer.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)) for a in arrays]
        if not tensors:
            return torch.empty(empty_shape, dtype=getattr(torch, np.dtype(dtype).name))
        return torch.cat(tensors)

    sizes = [(f.height, f.width) for f in frames]
    pixels = [h * w for h, w in sizes]
    color = cat([f.color.reshape(-1, 3) for f in frames], np.uint8, (0, 3))
    depth = cat(
        [
            _depth_metres(f) if f.depth is not None else np.zeros(n, np.float32)
            for f, n in zip(frames, pixels, strict=True)
        ],
        np.float32,
        (0,),
    )
    client = cat([_client_points(f.points) for f in frames if f.points is not None], np.float32, (0, 6))

    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, size in enumerate(sizes):
        groups[size].append(i)

    def tensor(values, dtype):
        return torch.as_tensor(np.asarray(values), dtype=dtype)

    host = dict(
        widths=tensor([w for _, w in sizes], torch.int64),
        heights=tensor([h for h, _ in sizes], torch.int64),
        intrinsics=tensor([f.intrinsics.as_array() for f in frames], torch.float32).reshape(-1, 4),
        cam_to_world=torch.from_numpy(
            np.stack([_pose(f.cam_to_world) for f in frames]).astype(np.float32)
        ).reshape(-1, 4, 4),
        color=color,
        pixel_offsets=tensor(np.cumsum([0, *pixels[:-1]]).tolist(), torch.int64),
        depth=depth,
        has_depth=tensor([f.depth is not None for f in frames], torch.bool),
        client_points=client,
        client_counts=tensor([0 if f.points is None else len(f.points) for f in frames], torch.int64),
        uses_client_points=tensor([f.points is not None for f in frames], torch.bool),
        max_points=tensor([o.max_points or config.max_points for o in options], torch.int64),
        occlusion_tau=tensor(
            [config.occlusion_tau if o.occlusion_tau is None else o.occlusion_tau for o in options],
            torch.float32,
        ),
    )
    moved = {k: v.to(device, non_blocking=True) for k, v in host.items()}
    return PackedBatch(
        num_frames=len(frames),
        size_groups=[(idx, h, w) for (h, w), idx in groups.items()],
        **moved,
    )


def _depth_metres(frame: Frame) -> np.ndarray:
    depth = frame.depth.reshape(-1)
    if depth.dtype == np.uint16:
        return depth.astype(np.float32) * np.float32(1.0 / frame.depth_scale)
    return np.nan_to_num(depth.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)


def _client_points(points: np.ndarray) -> np.ndarray:
    if points.shape[1] == 6:
        return points
    return np.concatenate([points, np.full((len(points), 3), np.nan, np.float32)], axis=1)


def _pose(cam_to_world: np.ndarray | None) -> np.ndarray:
    return np.eye(4) if cam_to_world is None else np.asarray(cam_to_world).reshape(4, 4)
