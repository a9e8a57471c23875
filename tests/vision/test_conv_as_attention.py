"""conv_as_attention: quadratic-encoding self-attention that reproduces a convolution (arXiv:1911.03584)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.testing import OpRecorder
from attnzoo.vision.conv_as_attention import ConvAsAttention

pytestmark = pytest.mark.usefixtures("float64_default")


def reference(layer: ConvAsAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's eq. 6 and 9 on the dense (query, key) grid: per head, the logits are
    v_h . r_delta with r_delta = (||delta||^2, delta_y, delta_x) and v_h = -alpha (1, -2 Delta_h),
    softmaxed over every key pixel of the zero-padded map; the heads' averages are mixed by W_h."""
    batch, _, height, width = x.shape
    top, bottom, left, right = layer.padding
    padded = torch.nn.functional.pad(x, (left, right, top, bottom))
    out_h, out_w = layer.output_size(height, width)
    keys = torch.stack(
        torch.meshgrid(
            torch.arange(-top, height + bottom, dtype=torch.float64),
            torch.arange(-left, width + right, dtype=torch.float64),
            indexing="ij",
        ),
        dim=-1,
    ).reshape(-1, 2)  # (N_k, 2)
    queries = torch.stack(
        torch.meshgrid(
            torch.arange(out_h, dtype=torch.float64) * layer.stride[0],
            torch.arange(out_w, dtype=torch.float64) * layer.stride[1],
            indexing="ij",
        ),
        dim=-1,
    ).reshape(-1, 2)  # (N_q, 2)
    delta = keys[None, :, :] - queries[:, None, :]  # (N_q, N_k, 2)
    r = torch.cat([delta.square().sum(-1, keepdim=True), delta], dim=-1)  # (N_q, N_k, 3)
    alpha = layer.log_alpha.exp()
    v = -alpha[:, None] * torch.cat([torch.ones_like(alpha)[:, None], -2 * layer.centers], dim=-1)  # (h, 3)
    weights = torch.softmax(torch.einsum("qkr,hr->hqk", r, v), dim=-1)  # (h, N_q, N_k)
    values = padded.flatten(2).transpose(1, 2)  # (B, N_k, C)
    per_head = torch.einsum("hqk,bkc->bqhc", weights, values).reshape(batch, out_h * out_w, -1)
    out = per_head @ layer.value.weight.T
    if layer.value.bias is not None:
        out = out + layer.value.bias
    return out.transpose(1, 2).reshape(batch, -1, out_h, out_w), weights


CONVS = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "padding": 1, "stride": 2},
    {"kernel_size": (3, 5), "padding": (1, 2)},  # non-square
    {"kernel_size": 3, "padding": 2, "dilation": 2},
    {"kernel_size": 4, "padding": 1},  # even
    {"kernel_size": 3, "padding": 1, "groups": 2},
    {"kernel_size": 3, "padding": "same", "dilation": (1, 2)},
    {"kernel_size": 2, "padding": "same"},  # the odd padding pixel at the bottom/right
    {"kernel_size": 3, "padding": 0, "stride": (2, 3)},
    {"kernel_size": 5, "padding": "valid", "bias": False},
    {"kernel_size": 1},
]


@pytest.mark.parametrize("conv_kwargs", CONVS, ids=[str(c) for c in CONVS])
def test_from_conv_reproduces_the_convolution(conv_kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **conv_kwargs)
    layer = ConvAsAttention.from_conv(conv)
    assert layer.num_heads == conv.kernel_size[0] * conv.kernel_size[1]
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        expected = conv(x)
        out, maps = layer(x, return_attn=True)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() < 1e-10
    torch.testing.assert_close(layer(x), out, rtol=0, atol=0)
    # alpha -> infinity: each head's attention is one-hot on its shifted pixel
    assert ((maps == 0) | (maps == 1)).all() and (maps.sum(-1) == 1).all()


def test_from_conv_refuses_what_attention_cannot_express():
    with pytest.raises(ValueError, match="padding_mode='zeros', got 'reflect'"):
        ConvAsAttention.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match="expected an nn.Conv2d, got Conv1d"):
        ConvAsAttention.from_conv(nn.Conv1d(4, 4, 3))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs", [{}, {"padding": 1, "window": 3}, {"stride": 2}, {"num_heads": 4, "padding": (0, 1, 2, 0)}]
)
def test_learned_layer_matches_the_quadratic_encoding(kwargs):
    torch.manual_seed(0)
    layer = ConvAsAttention(3, 5, **kwargs)
    with torch.no_grad():
        layer.log_alpha.normal_(0, 0.5)
    x = torch.randn(2, 3, 6, 7)
    expected, expected_maps = reference(layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    out, maps = layer(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, expected_maps.expand_as(maps), rtol=1e-10, atol=1e-10)


def test_gradients_match_the_reference():
    torch.manual_seed(0)
    layer = ConvAsAttention(3, 4, num_heads=4, padding=1)
    x = torch.randn(1, 3, 5, 4, requires_grad=True)
    grad = torch.randn(1, 4, 5, 4)
    ours = torch.autograd.grad((layer(x) * grad).sum(), [x, *layer.parameters()])
    theirs = torch.autograd.grad((reference(layer, x)[0] * grad).sum(), [x, *layer.parameters()])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_learned_variant_trains_to_a_convolution():
    # the Gaussian centres move: a few hundred Adam steps fit a 3x3 conv's output far better
    # than the initial layer (float32, as one would train it)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    target = nn.Conv2d(2, 2, 3, padding=1)
    layer = ConvAsAttention(2, 2, padding=1, window=3)
    centres = layer.centers.detach().clone()
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(8, 2, 8, 8)
    with torch.no_grad():
        y = target(x)
        start = (layer(x) - y).square().mean()
    for _ in range(300):
        optimiser.zero_grad()
        loss = (layer(x) - y).square().mean()
        loss.backward()
        optimiser.step()
    assert loss < start / 10, (loss.item(), start.item())
    assert (layer.centers - centres).abs().max() > 0.1


def test_paper_defaults():
    layer = ConvAsAttention(16)
    assert layer.num_heads == 9 and layer.padding == (0, 0, 0, 0)
    # the same parameter count as a 3x3 conv with bias, plus 3 per head
    conv = nn.Conv2d(16, 16, 3)
    assert sum(p.numel() for p in layer.parameters()) == sum(p.numel() for p in conv.parameters()) + 27
    torch.manual_seed(0)
    assert abs(ConvAsAttention(4, num_heads=4000).centers.std().item() - 2.0) < 0.1  # N(0, 2^2)
    spec = attnzoo.get_spec("conv_as_attention")
    assert (spec.family, spec.placement, spec.map_kind) == ("conv_attention", "conv", "pairwise")


def test_no_pairwise_matrix_without_maps():
    layer = ConvAsAttention(8).float()
    x = torch.randn(1, 8, 32, 32, dtype=torch.float32)
    with torch.no_grad(), OpRecorder() as recorder:
        layer(x)
    # the heads' outputs (B, h, C, H, W) are the largest buffer, far below N_h (HW)^2
    assert recorder.largest_storage <= 9 * x.numel()


def test_bad_arguments_and_maps_smaller_than_the_window():
    with pytest.raises(ValueError, match="padding: expected p"):
        ConvAsAttention(4, padding=(1, 2, 3))
    with pytest.raises(ValueError, match="stride"):
        ConvAsAttention(4, stride=0)
    layer = ConvAsAttention.from_conv(nn.Conv2d(4, 4, 5))
    with pytest.raises(ValueError, match=r"at least the window \(5, 5\).*got 3 x 6"):
        layer(torch.randn(1, 4, 3, 6))
