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
    visual.conv1 = PatchwiseConv2d.like(visual.conv1)
    return visual


class PatchwiseConv2d(nn.Conv2d):
    """A convolution whose stride equals its kernel (each output pixel sees one patch of its
    own: ViT's patch embedding, a 1×1 projection), computed as one matmul over the patches.

    Same parameters, same state dict, same result to float32 rounding. On a CPU the matmul
    runs in MKL's gemm, which for these many rows (one per patch) gave the same bits at
    every thread count measured (products of a few rows do not: ``bifusion/fusion.py``);
    oneDNN's convolution did not: a 1×1 projection of a 14×14 token map differed by 1e-6
    between processes started at 1 and 2 threads.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride=kernel_size, bias=bias, device=device, dtype=dtype
        )

    @classmethod
    def like(cls, conv: nn.Conv2d) -> PatchwiseConv2d:
        """This module in place of ``conv`` (whose stride must equal its kernel, no padding)."""
        kernel = conv.kernel_size
        plain = conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
        if kernel[0] != kernel[1] or conv.stride != kernel or not plain:
            raise ValueError(f"{conv} is not a patchwise convolution")
        # skip_init: no random initialisation, so a model's random-init parameters after this
        # one (the demo checkpoint's) stay what they were.
        patchwise = nn.utils.skip_init(
            cls,
            conv.in_channels,
            conv.out_channels,
            kernel[0],
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        patchwise.load_state_dict(conv.state_dict())
        return patchwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        b, c, h, w = x.shape
        rows, cols = h // k, w // k  # as the convolution: a partial patch at the edge is dropped
        patches = x[:, :, : rows * k, : cols * k].reshape(b, c, rows, k, cols, k)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, rows, cols, c * k * k)
        out = F.linear(patches, self.weight.flatten(1), self.bias)
        # N×C×H×W with channels-last strides, no copy: open_clip flattens the patch
        # embedding's map back to tokens as a view, and interpolation takes either layout.
        return out.permute(0, 3, 1, 2)


class ClipTower(nn.Module):
    """Normalised B×3×S×S images → B×C×h×w features (tokens after block ``layers``,
    1×1 conv to C channels, bilinear upsampling to the feature-map size)."""

    def __init__(self, config: ClipConfig, out_dim: int, map_size: tuple[int, int]):
        super().__init__()
        self.layer_index = config.layers - 1
        self.map_size = tuple(map_size)
        self.visual = build_visual(config)
        self.proj = PatchwiseConv2d(config.width, out_dim, kernel_size=1)
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
