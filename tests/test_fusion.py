"""LiteFusionGate and the masked squeeze-excitation, against a direct per-frame reference."""

from __future__ import annotations

import torch

from bifusion.fusion import Head, LiteFusionGate


def reference(gate: LiteFusionGate, f2d, f3d, valid, frames):
    """Frame by frame, written the obvious way."""
    out, alphas = [], []
    for b in range(frames):
        m = frames_index == b
        g = gate.gate(torch.cat((f2d[m], f3d[m]), -1)).squeeze(-1)
        alpha = 0.5 * (1 + torch.tanh(g / gate.tau)) * valid[m]
        mixed = alpha[:, None] * f2d[m] + (1 - alpha[:, None]) * f3d[m]
        squeeze = mixed[valid[m]].mean(0) if valid[m].any() else torch.zeros(mixed.shape[1])
        out.append(mixed * gate.se(squeeze[None, :, None])[0, :, 0])
        alphas.append(alpha)
    return torch.cat(out), torch.cat(alphas)


frames_index = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)


def test_gate_and_masked_se_match_the_per_frame_reference():
    torch.manual_seed(0)
    gate = LiteFusionGate(256, 64, 5.0, 16).eval()
    f2d, f3d = torch.randn(100, 256), torch.randn(100, 256)
    valid = torch.rand(100) > 0.4
    valid[80:] = False  # a frame with no valid point: squeeze of zeros, count clamped to 1
    fused, alpha = gate(f2d, f3d, valid, frames_index, 3)
    expected_fused, expected_alpha = reference(gate, f2d, f3d, valid, 3)
    torch.testing.assert_close(fused, expected_fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alpha, expected_alpha, rtol=1e-5, atol=1e-7)
    assert torch.all(alpha[~valid] == 0)


def test_invalid_points_do_not_reach_the_squeeze():
    torch.manual_seed(1)
    gate = LiteFusionGate(256, 64, 5.0, 16).eval()
    f2d, f3d = torch.randn(100, 256), torch.randn(100, 256)
    valid = torch.rand(100) > 0.5
    fused, _ = gate(f2d, f3d, valid, frames_index, 3)
    f2d_changed = torch.where(valid[:, None], f2d, torch.full_like(f2d, float("nan")))
    fused_changed, _ = gate(f2d_changed, f3d, valid, frames_index, 3)
    torch.testing.assert_close(fused, fused_changed, rtol=0, atol=0)


def test_heads_share_one_structure():
    head = Head(256, 0.1)
    kinds = [type(m).__name__ for m in head.mlp] + [type(head.norm).__name__]
    assert kinds == ["OrderedLinear", "ReLU", "Dropout", "OrderedLinear", "LayerNorm"]


def test_few_rows_are_summed_in_index_order_and_agree_with_the_gemm():
    """A product of a few rows (a tiny frame, the squeeze-excitation's one row per frame)
    is summed in index order; it agrees with the BLAS product to float32 rounding, and the
    layers keep nn.Linear's and nn.Conv1d's parameters."""
    from torch import nn

    from bifusion.fusion import ORDERED_ROWS, OrderedLinear, PointwiseConv1d, ordered_linear

    torch.manual_seed(3)
    layer = OrderedLinear(64, 32)
    assert layer.state_dict().keys() == nn.Linear(64, 32).state_dict().keys()
    for rows in (1, 5, ORDERED_ROWS - 1, ORDERED_ROWS, 300):
        x = torch.randn(rows, 64)
        expected = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    few = torch.randn(3, 64)
    assert torch.equal(layer(few), ordered_linear(few, layer.weight, layer.bias))
    # The float32 products summed in float64 in index order, then rounded once.
    in_order = (few.unsqueeze(-2) * layer.weight).double().cumsum(-1)[..., -1]
    assert torch.equal(ordered_linear(few, layer.weight, None), in_order.float())
    conv = PointwiseConv1d(64, 8)
    assert conv.state_dict().keys() == nn.Conv1d(64, 8, 1).state_dict().keys()
    x = torch.randn(4, 64, 1)
    torch.testing.assert_close(conv(x), nn.functional.conv1d(x, conv.weight, conv.bias), rtol=1e-5, atol=1e-5)
