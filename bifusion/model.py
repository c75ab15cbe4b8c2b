"""The BiFusion network: its modules and the per-stage computations on packed points."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .clip_tower import ClipTower
from .config import ModelConfig
from .fusion import Head, LiteFusionGate
from .minkowski import ME
from .unet import Res16UNet34C


class BiFusionModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dim = config.feature_dim
        self.clip = ClipTower(config.clip, dim, config.feature_map_size)
        self.unet = Res16UNet34C(config.unet)
        self.proj_3d = nn.Sequential(nn.Linear(self.unet.out_channels, dim), nn.LayerNorm(dim))
        self.head2d = Head(dim, config.head_dropout)
        self.head3d = Head(dim, config.head_dropout)
        self.fusion = LiteFusionGate(dim, config.gate_hidden, config.gate_tau, config.se_hidden)
        self.register_buffer("color_mean", torch.tensor(config.color_mean), persistent=False)
        self.register_buffer("color_std", torch.tensor(config.color_std), persistent=False)

    def features_3d(
        self, xyz_world: torch.Tensor, rgb: torch.Tensor, batch_index: torch.Tensor
    ) -> torch.Tensor:
        """Voxelise all frames' points (batch index as ME's first coordinate), run the
        U-Net once, slice voxel features back to points, project to ``feature_dim``."""
        scaled = xyz_world / self.config.voxel_size
        voxel = torch.round(scaled) if self.config.voxel_mode == "round" else torch.floor(scaled)
        coords = torch.cat((batch_index.unsqueeze(1).to(voxel.dtype), voxel), dim=1)
        field = ME.TensorField(
            features=(rgb - self.color_mean) / self.color_std,
            coordinates=coords,
            quantization_mode=ME.SparseTensorQuantizationMode.UNWEIGHTED_AVERAGE,
            device=xyz_world.device,
        )
        out = self.unet(field.sparse())
        return self.proj_3d(out.slice(field).F)

    def fuse(
        self,
        sampled_2d: torch.Tensor,
        point_3d: torch.Tensor,
        valid: torch.Tensor,
        batch_index: torch.Tensor,
        num_frames: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Heads, gate, masked SE and the one L2 normalisation."""
        sampled_2d = torch.where(valid.unsqueeze(-1), sampled_2d, torch.zeros_like(sampled_2d))
        f2d = self.head2d(sampled_2d)
        f3d = self.head3d(point_3d)
        fused, alpha = self.fusion(f2d, f3d, valid, batch_index, num_frames)
        return F.normalize(fused, dim=-1), alpha
