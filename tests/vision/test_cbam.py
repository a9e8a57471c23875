"""cbam, cbam_channel, cbam_spatial: the paper's equations in float64 and the official variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.vision.cbam import CBAM, ChannelAttention, SpatialAttention

pytestmark = pytest.mark.usefixtures("float64_default")


def mlp(module, v):
    return torch.relu(v @ module.fc1.weight.T + module.fc1.bias) @ module.fc2.weight.T + module.fc2.bias


def channel_reference(module, x):
    # M_c(F) = sigma(MLP(AvgPool(F)) + MLP(MaxPool(F))), the SAME MLP for both descriptors
    avg = x.mean(dim=(2, 3))
    mx = x.amax(dim=(2, 3))
    return torch.sigmoid(mlp(module, avg) + mlp(module, mx))[:, :, None, None]


def spatial_reference(module, x, order=("avg", "max")):
    maps = {"avg": x.mean(1, keepdim=True), "max": x.amax(1, keepdim=True)}
    stacked = torch.cat([maps[o] for o in order], 1)
    k = module.conv.kernel_size[0]
    logits = F.conv2d(stacked, module.conv.weight, module.conv.bias, padding=k // 2)
    return torch.sigmoid(logits)


def test_channel_attention_matches_equation_and_returns_gated_features():
    torch.manual_seed(0)
    module = attnzoo.create("cbam_channel", 32)
    x = torch.randn(2, 32, 6, 5)
    weights = channel_reference(module, x)
    out, attn = module(x, return_attn=True)
    # the module returns the gated features M_c * F (a known bug returns the bare weights)
    torch.testing.assert_close(out, x * weights)
    torch.testing.assert_close(attn, weights)


def test_spatial_attention_matches_equation():
    torch.manual_seed(1)
    module = attnzoo.create("cbam_spatial", 8)
    x = torch.randn(2, 8, 6, 5)
    weights = spatial_reference(module, x)
    out, attn = module(x, return_attn=True)
    torch.testing.assert_close(out, x * weights)
    assert attn.shape == (2, 1, 6, 5)
    assert module.conv.kernel_size == (7, 7)


def test_cbam_is_channel_then_spatial():
    torch.manual_seed(2)
    module = CBAM(32)
    x = torch.randn(2, 32, 6, 6)
    refined = x * channel_reference(module.channel, x)
    expected = refined * spatial_reference(module.spatial, refined)
    out, maps = module(x, return_attn=True)
    torch.testing.assert_close(out, expected)
    assert set(maps) == {"channel", "spatial"}


def test_official_variant_uses_batchnorm_and_max_mean_order():
    torch.manual_seed(3)
    official = SpatialAttention(8, variant="official").eval()
    assert official.conv.bias is None
    with torch.no_grad():
        official.norm.running_mean.fill_(0.3)
        official.norm.running_var.fill_(2.0)
    x = torch.randn(2, 8, 5, 5)
    raw = F.conv2d(
        torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1), official.conv.weight, padding=3
    )
    bn = official.norm
    expected = torch.sigmoid((raw - 0.3) / torch.sqrt(torch.tensor(2.0) + bn.eps) * bn.weight + bn.bias)
    torch.testing.assert_close(official(x, return_attn=True)[1], expected)
    paper = SpatialAttention(8)
    assert paper.conv.bias is not None


def test_parameter_count_of_channel_mlp():
    # shared MLP: C*C/r + C/r + C/r*C + C
    assert sum(p.numel() for p in ChannelAttention(256).parameters()) == 2 * 256 * 16 + 16 + 256


def test_errors():
    with pytest.raises(ValueError, match="kernel_size: expected an odd"):
        SpatialAttention(kernel_size=4)
    with pytest.raises(ValueError, match="variant"):
        CBAM(16, variant="mine")


def test_channel_branch_is_se_with_avg_and_max_pooling():
    """One implementation: cbam_channel is SqueezeExcite(pool="avg_and_max"), weights interchangeable."""
    from attnzoo.vision.squeeze_excite import SqueezeExcite

    channel = ChannelAttention(32)
    assert isinstance(channel, SqueezeExcite) and channel.pool == "avg_and_max"
    se = SqueezeExcite(32, pool="avg_and_max")
    se.load_state_dict(channel.state_dict())
    x = torch.randn(2, 32, 5, 6)
    torch.testing.assert_close(se(x), channel(x), rtol=0, atol=0)


def test_mlp_bias_switch():
    """mlp_bias=False (timm's CbamModule default): M_c = sigma(W1 relu(W0 avg) + W1 relu(W0 max))."""
    torch.manual_seed(3)
    module = CBAM(32, mlp_bias=False)
    assert module.channel.fc1.bias is None and module.channel.fc2.bias is None
    assert CBAM(32).channel.fc1.bias is not None  # the paper's official nn.Linear has biases
    x = torch.randn(2, 32, 6, 5)
    w0, w1 = module.channel.fc1.weight, module.channel.fc2.weight
    gate_c = torch.sigmoid(
        torch.relu(x.mean(dim=(2, 3)) @ w0.T) @ w1.T + torch.relu(x.amax(dim=(2, 3)) @ w0.T) @ w1.T
    )[:, :, None, None]
    refined = x * gate_c
    expected = refined * spatial_reference(module.spatial, refined)
    out, maps = module(x, return_attn=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(maps["channel"], gate_c)


def test_inference_fast_path_equals_training_path():
    """amax where no gradient is needed, max(dim) where one is: the same outputs."""
    module = CBAM(32, variant="official").eval()
    x = torch.randn(2, 32, 7, 7)
    with torch.no_grad():
        fast = module(x)
    torch.testing.assert_close(module(x.requires_grad_()), fast, rtol=0, atol=0)


def test_norm_layer_replaces_the_official_batchnorm():
    from functools import partial

    default = SpatialAttention(8, variant="official")
    assert default.norm.momentum == 0.01 and list(default.state_dict()) == [
        "conv.weight", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
        "norm.num_batches_tracked",
    ]  # fmt: skip
    torch.manual_seed(4)
    x = torch.randn(1, 8, 5, 5)
    stacked = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)  # official [max; mean]
    # GroupNorm(1, 1): per-image statistics of the logit map, so a batch of one trains
    grouped = SpatialAttention(8, variant="official", norm_layer=partial(torch.nn.GroupNorm, 1)).train()
    with torch.no_grad():
        grouped.norm.weight.fill_(1.7), grouped.norm.bias.fill_(-0.2)
    raw = F.conv2d(stacked, grouped.conv.weight, padding=3)
    normed = (raw - raw.mean()) / torch.sqrt(raw.var(unbiased=False) + grouped.norm.eps) * 1.7 - 0.2
    torch.testing.assert_close(grouped(x, return_attn=True)[1], torch.sigmoid(normed))
    assert grouped.conv.bias is None
    # None: no norm, the conv keeps its bias
    bare = SpatialAttention(8, variant="official", norm_layer=None)
    assert isinstance(bare.norm, torch.nn.Identity) and bare.conv.bias is not None
    expected = torch.sigmoid(F.conv2d(stacked, bare.conv.weight, bare.conv.bias, padding=3))
    torch.testing.assert_close(bare(x, return_attn=True)[1], expected)
    # CBAM passes it to its spatial branch; the paper's branch has no norm to replace
    assert isinstance(CBAM(16, variant="official", norm_layer=None).spatial.norm, torch.nn.Identity)
    assert CBAM(16, variant="official").spatial.norm.momentum == 0.01
    assert isinstance(SpatialAttention(8, norm_layer=None).norm, torch.nn.Identity)
    assert SpatialAttention(8, norm_layer=torch.nn.BatchNorm2d).conv.bias is not None
    with pytest.raises(ValueError, match="norm_layer: the paper's spatial branch has no normalisation"):
        CBAM(16, norm_layer=partial(torch.nn.GroupNorm, 1))
