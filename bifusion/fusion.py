"""Per-point heads, the LiteFusionGate and the masked squeeze-excitation."""

from __future__ import annotations

import torch
from torch import nn


class Head(nn.Module):
    """Linear → ReLU → Dropout → Linear → LayerNorm; ``head2d`` and ``head3d`` share it."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(
            OrderedLinear(dim, dim), nn.ReLU(inplace=True), nn.Dropout(dropout), OrderedLinear(dim, dim)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.mlp(x))


# Below this many rows a product is summed in index order (ordered_linear); above it, MKL's
# gemm gave the same bits at 1, 2 and 3 threads for every shape measured.
ORDERED_ROWS = 16


def ordered_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with every output summed in index order by a sequential scan (torch
    accumulates a float32 cumulative sum in float64): the same bits at any thread count, by
    construction. For a few rows only: it holds rows×out×in products at once.

    A BLAS product of a few rows is not thread-invariant: MKL split such products by thread
    count and rounded them differently, also in its strict reproducible mode (measured on an
    AMD EPYC: 16×256 weights against 2 to 13 rows, and 256×256 against 2 or 3 rows at 3
    threads); oneDNN's convolution did the same for the squeeze-excitation's.
    """
    out = (x.unsqueeze(-2) * weight).cumsum(-1)[..., -1]
    return out if bias is None else out + bias


class OrderedLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that takes :func:`ordered_linear` for
    inputs of fewer than ``ORDERED_ROWS`` rows: a frame or a block with a handful of points."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < ORDERED_ROWS * self.in_features:
            return ordered_linear(x, self.weight, self.bias)
        return super().forward(x)


class PointwiseConv1d(nn.Conv1d):
    """A kernel-1 Conv1d (same parameters and state dict) computed by :func:`ordered_linear`:
    the squeeze-excitation's rows are one per frame, always a few."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B×C×L
        return ordered_linear(x.transpose(1, 2), self.weight.squeeze(-1), self.bias).transpose(1, 2)


class LiteFusionGate(nn.Module):
    """α = ½(1 + tanh(g/τ)) from both branches, forced to 0 where the projection is invalid,
    then a squeeze-excitation whose squeeze averages each frame's valid points only."""

    def __init__(self, dim: int, hidden: int, tau: float, se_hidden: int):
        super().__init__()
        self.tau = tau
        self.gate = nn.Sequential(
            OrderedLinear(2 * dim, hidden), nn.ReLU(inplace=True), OrderedLinear(hidden, 1)
        )
        self.se = nn.Sequential(
            PointwiseConv1d(dim, se_hidden),
            nn.ReLU(inplace=True),
            PointwiseConv1d(se_hidden, dim),
            nn.Sigmoid(),
        )

    def mix(
        self, f2d: torch.Tensor, f3d: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per point: α from both branches (0 where invalid) and ``α·f2d + (1−α)·f3d``."""
        g = self.gate(torch.cat((f2d, f3d), dim=-1)).squeeze(-1)
        alpha = 0.5 * (1 + torch.tanh(g / self.tau))
        alpha = torch.where(valid, alpha, torch.zeros_like(alpha))
        # An invalid point's 2D features must not reach the output even as NaN/inf.
        f2d = torch.where(valid.unsqueeze(-1), f2d, torch.zeros_like(f2d))
        return alpha.unsqueeze(-1) * f2d + (1 - alpha).unsqueeze(-1) * f3d, alpha

    def excite(self, valid_sums: torch.Tensor, valid_counts: torch.Tensor) -> torch.Tensor:
        """Per frame: channel weights from the mean of its valid points' mixed features
        (B×C sums over valid points, B counts clamped to ≥ 1)."""
        squeeze = valid_sums / valid_counts.clamp_min(1).unsqueeze(-1)
        return self.se(squeeze.unsqueeze(-1)).squeeze(-1)  # Conv1d wants B×C×1

    def forward(
        self,
        f2d: torch.Tensor,
        f3d: torch.Tensor,
        valid: torch.Tensor,
        batch_index: torch.Tensor,
        num_frames: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, alpha = self.mix(f2d, f3d, valid)
        sums, counts = masked_segment_sums(mixed, valid, batch_index, num_frames)
        return mixed * self.excite(sums, counts)[batch_index], alpha


def masked_segment_sums(
    values: torch.Tensor, mask: torch.Tensor, batch_index: torch.Tensor, num_frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame, the sum of ``values`` rows where ``mask`` holds, and how many rows that was."""
    weight = mask.to(values.dtype)
    sums = values.new_zeros(num_frames, values.shape[-1]).index_add_(
        0, batch_index, values * weight.unsqueeze(-1)
    )
    return sums, weight.new_zeros(num_frames).index_add_(0, batch_index, weight)
