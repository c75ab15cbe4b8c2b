"""The 2D branch: open_clip ViT-B/16 cut after its first blocks, to a 256-d feature map."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import _build_vision_tower
from torch import nn

from .config import ClipConfig


def build_visual(config: ClipConfig) -> nn.Module:
    """open_clip's own VisionTransformer for ``config.model_name``, blocks past
    ``config.layers`` pruned together with the final norm and projection."""
    model_cfg = open_clip.get_model_config(config.model_name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no model config named {config.model_name!r}")
    vision_cfg = dict(model_cfg["vision_cfg"], image_size=config.image_size)
    visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=config.quick_gelu)
    visual.prune_intermediate_layers(indices=[config.layers - 1], prune_norm=True, prune_head=True)
    return visual


class ClipTower(nn.Module):
    """Normalised B×3×S×S images → B×C×h×w features (tokens after block ``layers``,
    1×1 conv to C channels, bilinear upsampling to the feature-map size)."""

    def __init__(self, config: ClipConfig, out_dim: int, map_size: tuple[int, int]):
        super().__init__()
        self.layer_index = config.layers - 1
        self.map_size = tuple(map_size)
        self.visual = build_visual(config)
        self.proj = nn.Conv2d(config.width, out_dim, kernel_size=1)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1) * 255, persistent=False)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens after the last kept block, B×width×grid×grid."""
        out = self.visual.forward_intermediates(
            images,
            indices=[self.layer_index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NCHW",
        )
        return out["image_intermediates"][0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """0..255 float images → CLIP-normalised input."""
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.proj(self.tokens(self.normalize(images)))
        return F.interpolate(maps, size=self.map_size, mode="bilinear", align_corners=False)
