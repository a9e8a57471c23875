"""SK convolution against a float64 reference written from the SKNet paper (eqs. 1-6), and its pitfalls."""

from __future__ import annotations

import inspect
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnzoo
from attnzoo.registry import Sizes
from attnzoo.testing import randomize_
from attnzoo.vision.selective_kernel import SelectiveKernel


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test draws the same inputs, run alone or in any order."""
    torch.manual_seed(0)


def ref_conv(x: Tensor, w: Tensor, stride: int = 1, dilation: int = 1, groups: int = 1) -> Tensor:
    """Grouped, dilated 'same' convolution as a sum over kernel taps of per-group einsums."""
    batch, _, height, width = x.shape
    out_ch, in_per_group, k, _ = w.shape
    pad = dilation * (k - 1) // 2
    xp = F.pad(x, (pad, pad, pad, pad))
    out_h = (height + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    out_w = (width + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    xg = xp.view(batch, groups, in_per_group, *xp.shape[-2:])
    wg = w.view(groups, out_ch // groups, in_per_group, k, k)
    out = x.new_zeros(batch, groups, out_ch // groups, out_h, out_w)
    for i in range(k):
        for j in range(k):
            rows = slice(i * dilation, i * dilation + (out_h - 1) * stride + 1, stride)
            cols = slice(j * dilation, j * dilation + (out_w - 1) * stride + 1, stride)
            out += torch.einsum("bgihw,goi->bgohw", xg[..., rows, cols], wg[..., i, j])
    return out.reshape(batch, out_ch, out_h, out_w)


def ref_bn(x: Tensor, bn: nn.BatchNorm1d | nn.BatchNorm2d, train: bool) -> Tensor:
    """Batch norm over every dim but 1: batch statistics (biased variance) in training."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if train:
        mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    normed = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    return normed * bn.weight.view(shape) + bn.bias.view(shape)


# random weights and BN statistics, so no term of the equation is trivially zero or one
randomize = partial(randomize_, scale=0.3, norm_statistics=True)


def ref_group_norm(x: Tensor, norm: nn.GroupNorm, train: bool) -> Tensor:
    """GroupNorm: each sample's group of channels normalised over its channels and positions."""
    batch = x.shape[0]
    grouped = x.reshape(batch, norm.num_groups, -1)
    mean, var = grouped.mean(dim=-1, keepdim=True), grouped.var(dim=-1, unbiased=False, keepdim=True)
    normed = ((grouped - mean) / torch.sqrt(var + norm.eps)).view(x.shape)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return normed * norm.weight.view(shape) + norm.bias.view(shape)


def no_norm(x: Tensor, norm: nn.Module, train: bool) -> Tensor:
    return x


def reference(module: SelectiveKernel, x: Tensor, train: bool = False, norm=ref_bn) -> tuple[Tensor, Tensor]:
    """SKNet eqs. 1-6 with the module's weights; returns (V, a) with a: (B, M, C)."""
    branches = []
    for branch in module.branches:
        conv, bn = branch[0], branch[1]
        u = ref_conv(x, conv.weight, conv.stride[0], conv.dilation[0], conv.groups)
        branches.append(torch.clamp(norm(u, bn, train), min=0))  # U_m = ReLU(BN(F_m(X)))
    fused = sum(branches)  # U = sum_m U_m (eq. 1)
    s = fused.mean(dim=(2, 3))  # s_c = (1/HW) sum_ij U_c(i, j) (eq. 2)
    z = torch.clamp(norm(torch.einsum("dc,bc->bd", module.fc.weight, s), module.norm, train), min=0)
    num_branches = len(branches)
    a_mats = module.select.weight.view(num_branches, -1, z.shape[1])  # A_m: (C, d)
    exps = torch.stack([torch.exp(torch.einsum("cd,bd->bc", a_mats[m], z)) for m in range(num_branches)], 1)
    weights = exps / exps.sum(dim=1, keepdim=True)  # eq. 5: softmax across branches, per channel
    out = sum(weights[:, m, :, None, None] * branches[m] for m in range(num_branches))  # eq. 6
    return out, weights


@pytest.mark.parametrize(
    ("channels", "out_channels", "stride", "groups", "extent"),
    [(64, None, 1, 32, 8), (64, 96, 2, 32, 9), (48, 48, 1, 16, 7)],
)
def test_matches_paper_reference_float64(channels, out_channels, stride, groups, extent) -> None:
    module = randomize(SelectiveKernel(channels, out_channels, stride, groups=groups, dtype=torch.float64))
    module.eval()
    x = torch.randn(
        3, channels, extent, extent, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    expected, expected_weights = reference(module, x)
    with torch.no_grad():
        out, weights = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights.squeeze(-1).squeeze(-1), expected_weights, rtol=1e-10, atol=1e-10)
    # many weights are far from 0 and 1, so the comparison exercises the softmax, not a hard choice
    assert ((expected_weights > 0.05) & (expected_weights < 0.95)).double().mean() > 0.3


def test_matches_reference_in_training_mode() -> None:
    """Training mode: every BN, including the one on z, uses the batch statistics."""
    module = randomize(SelectiveKernel(64, dtype=torch.float64)).train()
    x = torch.randn(4, 64, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected, _ = reference(module, x, train=True)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("channels", "kwargs", "expected"),
    [
        (256, {}, 32),  # SKNet-50 stage 1: C/16 = 16, floored up to L = 32
        (64, {}, 32),
        (1024, {}, 64),  # C/16 = 64 > L
        (256, {"min_rd_channels": 1}, 16),  # without the floor: plain C/r
        (256, {"rd_ratio": 1 / 4}, 64),
        (256, {"rd_channels": 8}, 8),  # explicit d overrides the floor
    ],
)
def test_bottleneck_width_has_the_L_floor(channels, kwargs, expected) -> None:
    """d = max(C/r, L), r = 16, L = 32 (paper eq. 4): the floor is easy to forget."""
    module = SelectiveKernel(channels, **kwargs, device="meta")
    assert module.rd_channels == expected
    assert module.fc.out_features == expected and module.norm.num_features == expected
    assert module.select.in_features == expected


def test_bottleneck_width_uses_the_output_width() -> None:
    """W reduces the fused features U, which have out_channels channels."""
    assert SelectiveKernel(64, 1024, device="meta").rd_channels == 64


def test_paper_defaults() -> None:
    params = inspect.signature(SelectiveKernel).parameters
    assert params["groups"].default == 32
    assert params["rd_ratio"].default == 1 / 16 and params["min_rd_channels"].default == 32
    module = SelectiveKernel(64, device="meta")
    convs = [branch[0] for branch in module.branches]
    # 3x3 and "5x5" realised as 3x3 with dilation 2, both grouped G = 32, no bias, "same" padding
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3)]
    assert [c.dilation for c in convs] == [(1, 1), (2, 2)]
    assert [c.padding for c in convs] == [(1, 1), (2, 2)]
    assert all(c.groups == 32 and c.bias is None for c in convs)
    assert all(isinstance(b[1], nn.BatchNorm2d) and isinstance(b[2], nn.ReLU) for b in module.branches)
    assert module.fc.bias is None and module.select.bias is None
    assert isinstance(module.norm, nn.BatchNorm2d) and isinstance(module.act, nn.ReLU)  # on z as (B, d, 1, 1)


def test_registered_kwargs_adapt_groups_but_class_keeps_32() -> None:
    spec = attnzoo.get_spec("sk")
    assert spec.family == "gating"
    assert spec.make_kwargs(Sizes(width=32))["groups"] == 32
    assert spec.make_kwargs(Sizes(width=48))["groups"] == 16
    assert spec.make_kwargs(Sizes(width=256))["groups"] == 32
    assert math.gcd(32, 40) == spec.make_kwargs(Sizes(width=40))["groups"]


def test_weights_are_a_softmax_over_branches_per_channel() -> None:
    module = randomize(SelectiveKernel(64, kernel_sizes=(3, 3, 3), dilations=(1, 2, 3))).eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        _, weights = module(x, return_attn=True)
    assert weights.shape == (2, 3, 64, 1, 1)
    assert (weights >= 0).all() and (weights <= 1).all()
    # a softmax over channels instead would not sum to one over the branches
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, 64, 1, 1))
    assert not torch.allclose(weights.sum(dim=2), torch.ones(2, 3, 1, 1))


def test_selects_a_branch_when_its_logit_dominates() -> None:
    module = randomize(SelectiveKernel(32, groups=8)).eval()
    with torch.no_grad():
        module.select.weight.zero_()
        module.norm.running_mean.fill_(-1.0)  # z > 0 after the ReLU
        module.norm.bias.fill_(0.0)
        module.select.weight[32:].fill_(1.0)  # A_2 = all ones: branch 2 gets exp(large)
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        out, weights = module(x, return_attn=True)
        second = module.branches[1](x)
    assert (weights[:, 1] > 0.999).all()
    torch.testing.assert_close(out, second, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_with_saturated_logits(dtype) -> None:
    """Logits far beyond exp's half-precision range: a naive exp / sum(exp) would give inf / inf."""
    module = randomize(SelectiveKernel(32, groups=8)).eval()
    with torch.no_grad():
        module.select.weight.mul_(1e3)
    module = module.to(dtype)
    x = torch.randn(2, 32, 8, 8, dtype=dtype)
    with torch.no_grad():
        out, weights = module(x, return_attn=True)
        branches = torch.stack([branch(x) for branch in module.branches], dim=1).double()
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(weights).all()
    # each weight is rounded to the half type on its own: the sum is one to within its resolution
    ones = torch.ones(2, 32, 1, 1, dtype=torch.float64)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(weights.double().sum(dim=1), ones, rtol=0, atol=tolerance)
    assert (weights.amax(dim=1) > 0.99).double().mean() > 0.9  # (nearly) hard selection
    # near-ties may flip in half precision, so the check is V = sum_m a_m U_m with the module's own a
    expected = (branches * weights.double()).sum(dim=1)
    assert (out.double() - expected).norm() / expected.norm() < tolerance


def test_stride_and_width_change_like_a_conv() -> None:
    module = SelectiveKernel(32, 64, 2, groups=32).eval()
    with torch.no_grad():
        assert module(torch.randn(2, 32, 9, 9)).shape == (2, 64, 5, 5)
        assert module(torch.randn(2, 32, 8, 8)).shape == (2, 64, 4, 4)
    assert attnzoo.create("sk", 64)(torch.randn(2, 64, 5, 5)).shape == (2, 64, 5, 5)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((48,), {}, "groups"),  # 32 does not divide 48
        ((64, 48), {}, "groups"),
        ((64,), {"groups": 0}, "groups"),
        ((64,), {"kernel_sizes": (3, 3, 3)}, "dilations"),
        ((64,), {"kernel_sizes": (3,), "dilations": (1,)}, "kernel_sizes"),
        ((64,), {"kernel_sizes": (3, 4)}, "kernel_sizes"),
        ((64,), {"dilations": (1, 0)}, "dilations"),
        ((64, None, 0), {}, "stride"),
        ((0,), {}, "channels"),
        ((64,), {"act_layer": "nope"}, "act_layer"),
    ],
)
def test_bad_arguments(args, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SelectiveKernel(*args, **kwargs)


@pytest.mark.parametrize(
    ("norm_layer", "ref_norm"),
    [(None, no_norm), (partial(nn.GroupNorm, 4), ref_group_norm)],
    ids=["none", "group_norm"],
)
@pytest.mark.parametrize("train", [False, True])
def test_norm_layer_matches_reference_float64(norm_layer, ref_norm, train) -> None:
    module = SelectiveKernel(32, groups=8, norm_layer=norm_layer, dtype=torch.float64)
    module = randomize(module).train(train)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    expected, expected_weights = reference(module, x, train=train, norm=ref_norm)
    out, weights = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights[..., 0, 0], expected_weights, rtol=1e-10, atol=1e-10)


def test_batchnorm_of_z_loads_the_official_batchnorm1d_weights() -> None:
    module = SelectiveKernel(32, groups=8)
    bn1d = nn.BatchNorm1d(module.rd_channels)
    module.norm.load_state_dict(bn1d.state_dict())  # same keys: weight, bias, running stats


def test_batch_of_one_in_training_is_a_clear_error() -> None:
    module = SelectiveKernel(32, groups=8).train()
    with pytest.raises(ValueError, match=r"x: .*z.*batch of more than 1 in training mode.*\(1, 32, 8, 8\)"):
        module(torch.randn(1, 32, 8, 8))
    module.eval()(torch.randn(1, 32, 8, 8))  # eval uses the running statistics
    grouped = SelectiveKernel(32, groups=8, norm_layer=partial(nn.GroupNorm, 4)).train()
    assert grouped(torch.randn(1, 32, 8, 8)).shape == (1, 32, 8, 8)
