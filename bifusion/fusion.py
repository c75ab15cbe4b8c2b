"""Per-point heads, the LiteFusionGate and the masked squeeze-excitation."""

from __future__ import annotations

import torch
from torch import nn


class Head(nn.Module):
    """Linear → ReLU → Dropout → Linear → LayerNorm; ``head2d`` and ``head3d`` share it."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dim, dim)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.mlp(x))


class LiteFusionGate(nn.Module):
    """α = ½(1 + tanh(g/τ)) from both branches, forced to 0 where the projection is invalid,
    then a squeeze-excitation whose squeeze averages each frame's valid points only."""

    def __init__(self, dim: int, hidden: int, tau: float, se_hidden: int):
        super().__init__()
        self.tau = tau
        self.gate = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        self.se = nn.Sequential(
            nn.Conv1d(dim, se_hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv1d(se_hidden, dim, 1),
            nn.Sigmoid(),
        )

    def forward(
        self,
        f2d: torch.Tensor,
        f3d: torch.Tensor,
        valid: torch.Tensor,
        batch_index: torch.Tensor,
        num_frames: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.gate(torch.cat((f2d, f3d), dim=-1)).squeeze(-1)
        alpha = 0.5 * (1 + torch.tanh(g / self.tau))
        alpha = torch.where(valid, alpha, torch.zeros_like(alpha))
        # An invalid point's 2D features must not reach the output even as NaN/inf.
        f2d = torch.where(valid.unsqueeze(-1), f2d, torch.zeros_like(f2d))
        mixed = alpha.unsqueeze(-1) * f2d + (1 - alpha).unsqueeze(-1) * f3d

        weight = valid.to(mixed.dtype)
        sums = mixed.new_zeros(num_frames, mixed.shape[-1]).index_add_(
            0, batch_index, mixed * weight.unsqueeze(-1)
        )
        counts = weight.new_zeros(num_frames).index_add_(0, batch_index, weight).clamp_min(1)
        squeeze = (sums / counts.unsqueeze(-1)).unsqueeze(-1)  # B×C×1 for Conv1d
        excitation = self.se(squeeze).squeeze(-1)
        return mixed * excitation[batch_index], alpha
