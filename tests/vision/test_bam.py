"""bam: the paper's equations in float64 (sum fusion, BN at the branch ends) and the official variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.vision.bam import BAM

F64 = torch.float64


def conv_ref(x, weight, bias=None, dilation=1):
    """'same' k x k convolution as a sum over kernel taps of shifted einsums (zero padding)."""
    k = weight.shape[-1]
    pad = dilation * (k // 2)
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    out = sum(
        torch.einsum(
            "bchw,oc->bohw",
            padded[:, :, p * dilation : p * dilation + h, q * dilation : q * dilation + w],
            weight[:, :, p, q],
        )
        for p in range(k)
        for q in range(k)
    )
    return out if bias is None else out + bias[None, :, None, None]


def bn_eval(x, bn, dim):
    shape = [1] * x.dim()
    shape[dim] = -1
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(shape)
    return (x - bn.running_mean.view(shape)) * scale + bn.bias.view(shape)


def randomise_norms(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen, dtype=F64) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen, dtype=F64) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=gen, dtype=F64))
            m.bias.data.copy_(torch.randn(n, generator=gen, dtype=F64))


def paper_reference(m: BAM, x):
    # M_c(F) = BN(W1 relu(W0 GAP(F) + b0))  (the bias b1 before BN is folded into BN's shift)
    y = x.mean(dim=(2, 3))
    hidden = torch.relu(y @ m.channel_fc1.weight.T + m.channel_fc1.bias)
    mc = bn_eval(hidden @ m.channel_fc2.weight.T, m.channel_norm, 1)[:, :, None, None]
    # M_s(F) = BN(f3_1x1(f2_3x3,d4(f1_3x3,d4(f0_1x1(F))))), ReLU between
    reduce0, conv1, conv2, final = (layer for layer in m.spatial if isinstance(layer, torch.nn.Conv2d))
    s = torch.relu(conv_ref(x, reduce0.weight, reduce0.bias))
    s = torch.relu(conv_ref(s, conv1.weight, conv1.bias, dilation=4))
    s = torch.relu(conv_ref(s, conv2.weight, conv2.bias, dilation=4))
    ms = bn_eval(conv_ref(s, final.weight), m.spatial[-1], 1)
    gate = torch.sigmoid(mc + ms)  # broadcast (B, C, 1, 1) + (B, 1, H, W)
    return x + x * gate, mc, ms, gate


def test_paper_variant_matches_equations():
    torch.manual_seed(0)
    module = BAM(64, dtype=F64).eval()
    randomise_norms(module)
    x = torch.randn(2, 64, 11, 9, dtype=F64)
    expected, mc, ms, gate = paper_reference(module, x)
    out, maps = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["channel"], mc, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["spatial"], ms, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["gate"], gate, rtol=1e-10, atol=1e-10)
    assert maps["channel"].shape == (2, 64, 1, 1) and maps["spatial"].shape == (2, 1, 11, 9)


def test_training_mode_uses_batch_statistics():
    torch.manual_seed(1)
    module = BAM(32, dtype=F64).train()
    x = torch.randn(4, 32, 6, 6, dtype=F64)
    _, maps = module(x, return_attn=True)
    # batch-normalised with weight 1, bias 0: zero mean over the batch per channel
    torch.testing.assert_close(maps["channel"].mean(0), torch.zeros(32, 1, 1, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(maps["spatial"].mean(), torch.tensor(0.0, dtype=F64), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="batch of more than 1"):
        module(x[:1])
    module.eval()(x[:1])  # one image is fine in eval mode


def test_residual_form_output_between_one_and_two_times_input():
    # F' = F + F * M(F) with M in (0, 1): the module amplifies, it never suppresses below F
    torch.manual_seed(2)
    module = BAM(32, dtype=F64).eval()
    x = torch.randn(2, 32, 8, 8, dtype=F64)
    ratio = module(x) / x
    assert (ratio > 1).all() and (ratio < 2).all()


def test_spatial_branch_uses_two_convs_of_dilation_four():
    torch.manual_seed(3)  # the weights too: with some draws a ReLU hides a corner from the bump
    module = BAM(32, dtype=F64).eval()
    dilated = [m for m in module.spatial if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(dilated) == 2 and all(m.dilation == (4, 4) and m.padding == (4, 4) for m in dilated)
    # a pixel reaches offsets in {-8, -4, 0, 4, 8}^2 of the spatial map, and nothing in between
    x = torch.randn(1, 32, 21, 21, dtype=F64)
    bumped = x.clone()
    bumped[:, :, 10, 10] += 3.0
    changed = module(bumped, return_attn=True)[1]["spatial"] != module(x, return_attn=True)[1]["spatial"]
    rows, cols = changed[0, 0].nonzero().T
    assert set((rows - 10).tolist()) <= {-8, -4, 0, 4, 8}
    assert set((cols - 10).tolist()) <= {-8, -4, 0, 4, 8}
    assert changed[0, 0, 2, 2] and changed[0, 0, 18, 18]


def test_reduction_sixteen_in_both_branches():
    module = BAM(256)
    assert module.channel_fc1.out_features == 16
    assert module.spatial[0].out_channels == 16
    assert BAM(8).channel_fc1.out_features == 1  # never a zero-width bottleneck


def test_official_variant_multiplies_and_normalises_hidden_layers():
    torch.manual_seed(4)
    official = BAM(32, variant="official", dtype=F64).eval()
    randomise_norms(official, seed=5)
    assert official.fusion == "product"
    assert isinstance(official.channel_norm1, torch.nn.BatchNorm2d)  # on (B, C', 1, 1)
    assert isinstance(official.channel_norm, torch.nn.Identity)
    assert official.channel_fc2.bias is not None and official.spatial[-2].bias is not None
    x = torch.randn(2, 32, 9, 9, dtype=F64)
    # the authors' code: att = 1 + sigmoid(channel * spatial); out = att * x
    y = x.mean(dim=(2, 3))
    h = torch.relu(
        bn_eval(y @ official.channel_fc1.weight.T + official.channel_fc1.bias, official.channel_norm1, 1)
    )
    mc = (h @ official.channel_fc2.weight.T + official.channel_fc2.bias)[:, :, None, None]
    convs = [m for m in official.spatial if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in official.spatial if isinstance(m, torch.nn.BatchNorm2d)]
    s = x
    for conv, norm in zip(convs[:3], norms):
        s = torch.relu(bn_eval(conv_ref(s, conv.weight, conv.bias, dilation=conv.dilation[0]), norm, 1))
    ms = conv_ref(s, convs[3].weight, convs[3].bias)
    expected = (1 + torch.sigmoid(mc * ms)) * x
    torch.testing.assert_close(official(x), expected, rtol=1e-10, atol=1e-10)
    # sum and product give different maps on the same weights
    summed = BAM(32, variant="official", fusion="sum", dtype=F64).eval()
    summed.load_state_dict(official.state_dict())
    torch.testing.assert_close(summed(x), (1 + torch.sigmoid(mc + ms)) * x, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(summed(x), official(x))


def test_paper_default_is_sum_and_product_is_an_option():
    torch.manual_seed(6)
    paper = BAM(32, dtype=F64).eval()
    product = BAM(32, fusion="product", dtype=F64).eval()
    product.load_state_dict(paper.state_dict())
    x = torch.randn(2, 32, 7, 7, dtype=F64)
    _, maps = paper(x, return_attn=True)
    torch.testing.assert_close(paper(x), x + x * torch.sigmoid(maps["channel"] + maps["spatial"]))
    torch.testing.assert_close(product(x), x + x * torch.sigmoid(maps["channel"] * maps["spatial"]))


def test_registered_and_errors():
    assert isinstance(attnzoo.create("bam", 16), BAM)
    with pytest.raises(ValueError, match="variant"):
        BAM(16, variant="mine")
    with pytest.raises(ValueError, match="fusion"):
        BAM(16, fusion="max")
