"""eca: the paper's equations in float64, the adaptive kernel size, and the per-stage k of the releases."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.vision.eca import ECA, OFFICIAL_RESNET_KERNEL_SIZES, adaptive_kernel_size

F64 = torch.float64


def eca_reference(
    x: torch.Tensor, kernel: torch.Tensor, circular: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """omega_c = sigmoid(sum_j w_j y_{c + j - k//2}) with y = GAP(x), zero outside [0, C)
    (``circular``: the index wraps modulo C instead)."""
    batch, channels = x.shape[:2]
    k = kernel.numel()
    y = x.reshape(batch, channels, -1).mean(-1)
    logits = torch.zeros(batch, channels, dtype=x.dtype)
    for c in range(channels):
        for j in range(k):
            neighbour = c + j - k // 2
            if circular:
                neighbour %= channels
            if 0 <= neighbour < channels:
                logits[:, c] += kernel[j] * y[:, neighbour]
    omega = torch.sigmoid(logits).reshape(batch, channels, *([1] * (x.dim() - 2)))
    return x * omega, omega


@pytest.mark.parametrize("shape", [(2, 12, 5, 7), (3, 9, 11), (2, 10, 3, 4, 5)])
def test_matches_equation_for_1d_2d_3d_inputs(shape):
    torch.manual_seed(0)
    module = ECA(shape[1], kernel_size=5, dtype=F64)
    x = torch.randn(shape, dtype=F64)
    expected, omega = eca_reference(x, module.conv.weight.flatten())
    out, attn = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn, omega, rtol=1e-10, atol=1e-10)
    assert ((attn > 0) & (attn < 1)).all()


@pytest.mark.parametrize(
    ("channels", "k"),
    # |log2(C)/2 + 1/2|_odd: 2.5 -> 3, 3 -> 3, 3.5 -> 3, 4 -> 5 (a tie goes up), 4.5 -> 5, ..., 6 -> 7
    [(16, 3), (32, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)],
)
def test_adaptive_kernel_size(channels, k):
    assert adaptive_kernel_size(channels) == k
    assert ECA(channels).kernel_size == k
    assert ECA(channels).conv.weight.shape == (1, 1, k)


def test_adaptive_rule_is_nearest_odd_of_the_paper_formula():
    for channels in range(1, 4097, 7):
        t = math.log2(channels) / 2 + 1 / 2
        k = adaptive_kernel_size(channels)
        assert k % 2 == 1
        # nearest odd number, ties (t even) rounded up as in the official code
        assert abs(k - t) <= 1 and (abs(k - t) < 1 or k > t)
    assert adaptive_kernel_size(256, gamma=1, b=0) == 9  # log2(256) = 8, even -> 9


def test_given_kernel_size_overrides_the_rule():
    assert ECA(2048, kernel_size=3).kernel_size == 3
    with pytest.raises(ValueError, match="kernel_size"):
        ECA(64, kernel_size=4)
    with pytest.raises(ValueError, match="channels"):
        ECA(0)


def test_no_reduction_no_bias_k_parameters():
    module = ECA(512)
    assert [n for n, _ in module.named_parameters()] == ["conv.weight"]
    assert sum(p.numel() for p in module.parameters()) == 5


def test_interaction_is_local_across_channels():
    # the gate of channel c depends on channels c - k//2 .. c + k//2 only (a reduction MLP would
    # couple every channel)
    torch.manual_seed(1)
    module = ECA(32, kernel_size=3, dtype=F64)
    x = torch.randn(1, 32, 4, 4, dtype=F64)
    bumped = x.clone()
    bumped[:, 10] += 5.0
    changed = (module(bumped, return_attn=True)[1] != module(x, return_attn=True)[1]).flatten()
    assert changed.nonzero().flatten().tolist() == [9, 10, 11]


def test_official_per_stage_kernel_sizes():
    # the released ImageNet models (README: eca_resnet50_k3557, eca_resnet101_k3357, ...)
    assert OFFICIAL_RESNET_KERNEL_SIZES[50] == (3, 5, 5, 7)
    assert OFFICIAL_RESNET_KERNEL_SIZES[101] == (3, 3, 5, 7)
    # ... which differ from the adaptive rule at ResNet-50's stage widths
    adaptive = tuple(adaptive_kernel_size(c) for c in (256, 512, 1024, 2048))
    assert adaptive == (5, 5, 5, 7) != OFFICIAL_RESNET_KERNEL_SIZES[50]


def test_registered_and_errors():
    assert isinstance(attnzoo.create("eca", 16), ECA)


def test_circular_padding_wraps_the_channel_axis():
    torch.manual_seed(1)
    module = ECA(12, kernel_size=5, padding="circular", dtype=F64)
    x = torch.randn(2, 12, 4, 3, dtype=F64)
    expected, omega = eca_reference(x, module.conv.weight.flatten(), circular=True)
    out, attn = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn, omega, rtol=1e-10, atol=1e-10)
    # the first channel's gate depends on the last channel (its left neighbour across the wrap)
    x2 = x.clone()
    x2[:, -1] += 1.0
    _, attn2 = module(x2, return_attn=True)
    assert (attn2[:, 0] - attn[:, 0]).abs().min() > 0
    zero_padded = ECA(12, kernel_size=5, dtype=F64)
    zero_padded.load_state_dict(module.state_dict())
    _, attn_zero = zero_padded(x, return_attn=True)
    _, attn_zero2 = zero_padded(x2, return_attn=True)
    torch.testing.assert_close(attn_zero2[:, 0], attn_zero[:, 0], rtol=0, atol=0)  # no wrap: untouched
    with pytest.raises(ValueError, match="padding"):
        ECA(12, padding="reflect")
