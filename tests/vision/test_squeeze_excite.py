"""se: against the paper's equation in float64; width rounding; injectable layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.layers import make_divisible, reduced_width
from attnzoo.vision.squeeze_excite import SqueezeExcite

pytestmark = pytest.mark.usefixtures("float64_default")


def test_matches_paper_equation():
    torch.manual_seed(0)
    se = attnzoo.create("se", 32)
    x = torch.randn(2, 32, 5, 7)
    # s = sigma(W2 delta(W1 z)), z_c = 1/(HW) sum_ij x_c(i, j); y_c = s_c x_c
    z = torch.einsum("bchw->bc", x) / 35
    hidden = torch.relu(z @ se.fc1.weight.T + se.fc1.bias)
    s = torch.sigmoid(hidden @ se.fc2.weight.T + se.fc2.bias)
    out, gate = se(x, return_attn=True)
    torch.testing.assert_close(out, x * s[:, :, None, None])
    torch.testing.assert_close(gate[:, :, 0, 0], s)


def test_paper_reduction_and_no_zero_width():
    assert SqueezeExcite(256).fc1.out_features == 16  # r = 16
    assert SqueezeExcite(8).fc1.out_features == 1  # 8 // 16 would be 0
    assert SqueezeExcite(64, rd_channels=5).fc1.out_features == 5
    assert SqueezeExcite(100, rd_divisor=8).fc1.out_features == 8
    assert reduced_width(4, 1 / 16) == 1
    assert make_divisible(6.25, 8) == 8 and make_divisible(40, 8) == 40


def test_params_match_paper_formula():
    # 2 C^2 / r weights plus biases C / r + C
    c, r = 256, 16
    assert sum(p.numel() for p in SqueezeExcite(c).parameters()) == 2 * c * c // r + c // r + c


def test_any_spatial_rank():
    se = SqueezeExcite(16)
    for shape in ((2, 16, 9), (2, 16, 4, 5), (2, 16, 2, 3, 4)):
        x = torch.randn(*shape)
        assert se(x).shape == x.shape


def test_injectable_layers():
    se = SqueezeExcite(16, act_layer="silu", gate_layer=nn.Hardsigmoid)
    assert isinstance(se.act, nn.SiLU) and isinstance(se.gate, nn.Hardsigmoid)
    with pytest.raises(ValueError, match="act_layer: unknown layer 'nope'"):
        SqueezeExcite(16, act_layer="nope")
    with pytest.raises(ValueError, match="rd_ratio"):
        SqueezeExcite(16, rd_ratio=0)


def _mlp(se, v):
    return torch.relu(v @ se.fc1.weight.T + se.fc1.bias) @ se.fc2.weight.T + se.fc2.bias


@pytest.mark.parametrize("pool", ["max", "avgmax", "avg_and_max"])
def test_pooling_options_match_their_equations(pool):
    torch.manual_seed(1)
    se = attnzoo.create("se", 32, pool=pool)
    x = torch.randn(2, 32, 5, 7)
    avg = torch.einsum("bchw->bc", x) / 35
    mx = x.reshape(2, 32, -1).max(dim=-1).values
    logits = {
        "max": _mlp(se, mx),
        "avgmax": _mlp(se, 0.5 * (avg + mx)),  # timm's add_maxpool: one descriptor
        "avg_and_max": _mlp(se, avg) + _mlp(se, mx),  # CBAM eq. 2: two MLP passes, logits summed
    }[pool]
    out, gate = se(x, return_attn=True)
    torch.testing.assert_close(gate[:, :, 0, 0], torch.sigmoid(logits))
    torch.testing.assert_close(out, x * torch.sigmoid(logits)[:, :, None, None])
    with pytest.raises(ValueError, match="pool"):
        SqueezeExcite(16, pool="min")


def test_max_pooling_gradients_agree_with_and_without_autograd_path():
    """max(dim) under autograd, amax without: the same values either way."""
    se = attnzoo.create("se", 16, pool="avg_and_max")
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        fast = se(x)
    torch.testing.assert_close(se(x.requires_grad_()), fast, rtol=0, atol=0)


def test_effective_se_is_one_full_width_fc():
    """eSE (CenterMask / VoVNetV2): s = hsigmoid(W GAP(x) + b), W: C -> C."""
    torch.manual_seed(2)
    se = attnzoo.create("se", 24, single_fc=True, gate_layer="hard_sigmoid")
    assert se.fc1.weight.shape == (24, 24) and isinstance(se.fc2, nn.Identity)
    assert sum(p.numel() for p in se.parameters()) == 24 * 24 + 24
    x = torch.randn(2, 24, 4, 5)
    z = torch.einsum("bchw->bc", x) / 20
    s = torch.clamp(z @ se.fc1.weight.T + se.fc1.bias + 3, 0, 6) / 6  # relu6(t + 3) / 6
    out, gate = se(x, return_attn=True)
    torch.testing.assert_close(gate[:, :, 0, 0], s)
    torch.testing.assert_close(out, x * s[:, :, None, None])
