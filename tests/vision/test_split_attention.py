"""ResNeSt split attention against a float64 reference written from the paper (eqs. 1-3, Fig. 4) with the
official layout made explicit: radix-major splits, cardinality-major attention logits."""

from __future__ import annotations

import inspect
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnzoo
from attnzoo.testing import randomize_
from attnzoo.vision.split_attention import SplitAttention


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test draws the same inputs, run alone or in any order."""
    torch.manual_seed(0)


def ref_conv(x: Tensor, w: Tensor, stride: int = 1) -> Tensor:
    """Dense 3x3 'same' convolution (padding 1) as a sum over the taps of einsums."""
    batch, _, height, width = x.shape
    k = w.shape[-1]
    xp = F.pad(x, (1, 1, 1, 1))
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    out = x.new_zeros(batch, w.shape[0], out_h, out_w)
    for i in range(k):
        for j in range(k):
            patch = xp[
                ..., i : i + (out_h - 1) * stride + 1 : stride, j : j + (out_w - 1) * stride + 1 : stride
            ]
            out += torch.einsum("bihw,oi->bohw", patch, w[..., i, j])
    return out


def ref_bn(x: Tensor, bn: nn.BatchNorm2d, channels: slice, train: bool) -> Tensor:
    """BN of the given channels of ``bn`` applied to x (B, c, ...): batch statistics in training."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if train:
        mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
    else:
        mean, var = bn.running_mean[channels], bn.running_var[channels]
    normed = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    return normed * bn.weight[channels].view(shape) + bn.bias[channels].view(shape)


# random weights and BN statistics, so no term of the equation is trivially zero or one
randomize = partial(randomize_, scale=0.3, norm_statistics=True)


def ref_instance_norm(x: Tensor, norm: nn.Module, channels: slice, train: bool) -> Tensor:
    """GroupNorm with one group per channel: each sample's channel over its spatial positions."""
    dims = tuple(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, unbiased=False, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + norm.eps)
    return normed * norm.weight[channels].view(shape) + norm.bias[channels].view(shape)


def no_norm(x: Tensor, norm: nn.Module, channels: slice, train: bool) -> Tensor:
    return x


def reference(
    module: SplitAttention,
    x: Tensor,
    train: bool = False,
    logit_layout: str = "cardinality-major",
    norm=ref_bn,
) -> tuple[Tensor, Tensor]:
    """Paper eqs. 1-3 per cardinal group k and radix split r; returns (V, a) with a: (B, R, C).

    ``logit_layout="radix-major"`` is the misreading the tests guard against: taking fc2's R*C
    outputs as R blocks of C channels.
    """
    radix, card = module.radix, module.cardinality
    c_out, c_in, d = module.out_channels, module.channels, module.rd_channels
    ck, cin_g, dk = c_out // card, c_in // (card * radix), d // card
    stride = module.stride
    # Split: the conv's group g = r*K + k (radix-major, paper Fig. 4) is split r of cardinal group k
    splits = {}
    for r in range(radix):
        for k in range(card):
            g = r * card + k
            rows = slice(g * ck, (g + 1) * ck)
            u = ref_conv(x[:, g * cin_g : (g + 1) * cin_g], module.conv.weight[rows], stride)
            splits[r, k] = torch.clamp(norm(u, module.bn0, rows, train), min=0)
    # G: two FC layers per cardinal group (fc1 and fc2 grouped by cardinality), BN + ReLU between
    logits = []
    for k in range(card):
        s_k = sum(splits[r, k] for r in range(radix)).mean(dim=(2, 3))  # s^k = GAP(U^k), eq. 1
        hidden_rows = slice(k * dk, (k + 1) * dk)
        w1 = module.fc1.weight[hidden_rows, :, 0, 0]  # (d/K, C/K)
        h = torch.einsum("oi,bi->bo", w1, s_k) + module.fc1.bias[hidden_rows]
        h = torch.clamp(norm(h[:, :, None, None], module.bn1, hidden_rows, train)[:, :, 0, 0], min=0)
        out_rows = slice(k * radix * ck, (k + 1) * radix * ck)
        w2 = module.fc2.weight[out_rows, :, 0, 0]  # (R*C/K, d/K)
        logits.append(torch.einsum("oi,bi->bo", w2, h) + module.fc2.bias[out_rows])
    full = torch.cat(logits, dim=1)  # (B, R*C) in fc2's output order
    batch = x.shape[0]
    weights = x.new_zeros(batch, radix, c_out)
    parts = []
    for k in range(card):
        if logit_layout == "cardinality-major":  # output k*(R*C/K) + r*(C/K) + c
            g_k = [full[:, k * radix * ck + r * ck : k * radix * ck + (r + 1) * ck] for r in range(radix)]
        else:  # output r*C + k*(C/K) + c
            g_k = [full[:, r * c_out + k * ck : r * c_out + (k + 1) * ck] for r in range(radix)]
        if radix > 1:  # eq. 3: softmax over the splits of the cardinal group
            exps = [torch.exp(g) for g in g_k]
            a_k = [e / sum(exps) for e in exps]
        else:  # eq. 3: sigmoid for a single split
            a_k = [1 / (1 + torch.exp(-g_k[0]))]
        for r in range(radix):
            weights[:, r, k * ck : (k + 1) * ck] = a_k[r]
        parts.append(sum(a_k[r][:, :, None, None] * splits[r, k] for r in range(radix)))  # eq. 2
    return torch.cat(parts, dim=1), weights  # V = [V^1, ..., V^K]


CASES = [
    # channels, out_channels, stride, radix, cardinality, extent
    (32, None, 1, 2, 1, 8),  # the paper default (ResNeSt-50 2s1x64d)
    (32, None, 1, 2, 2, 7),  # cardinality > 1: the layout matters
    (48, 24, 2, 3, 2, 9),
    (32, 64, 1, 1, 4, 6),  # radix 1: sigmoid
    (32, None, 1, 4, 1, 5),
]


@pytest.mark.parametrize(("channels", "out_channels", "stride", "radix", "cardinality", "extent"), CASES)
def test_matches_paper_reference_float64(channels, out_channels, stride, radix, cardinality, extent) -> None:
    module = SplitAttention(
        channels, out_channels, stride, radix=radix, cardinality=cardinality, dtype=torch.float64
    )
    module = randomize(module).eval()
    x = torch.randn(
        3, channels, extent, extent, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    expected, expected_weights = reference(module, x)
    with torch.no_grad():
        out, weights = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights[..., 0, 0], expected_weights, rtol=1e-10, atol=1e-10)


def test_matches_reference_in_training_mode() -> None:
    module = randomize(SplitAttention(32, radix=2, cardinality=2, dtype=torch.float64)).train()
    x = torch.randn(4, 32, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected, _ = reference(module, x, train=True)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_attention_logits_are_cardinality_major() -> None:
    """fc2 is grouped by cardinality, so its outputs are (K, R, C/K), not (R, K, C/K) (official rSoftMax)."""
    module = randomize(SplitAttention(32, radix=2, cardinality=2, dtype=torch.float64)).eval()
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = module(x)
    right, _ = reference(module, x, logit_layout="cardinality-major")
    wrong, _ = reference(module, x, logit_layout="radix-major")
    torch.testing.assert_close(out, right, rtol=1e-10, atol=1e-10)
    assert (out - wrong).abs().max() > 1e-2  # the misreading is detectable at these weights


def test_layouts_coincide_for_one_cardinal_group() -> None:
    module = randomize(SplitAttention(32, radix=2, cardinality=1, dtype=torch.float64)).eval()
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    right, _ = reference(module, x, logit_layout="cardinality-major")
    wrong, _ = reference(module, x, logit_layout="radix-major")
    torch.testing.assert_close(right, wrong, rtol=0, atol=0)


def test_softmax_over_radix_sums_to_one() -> None:
    module = randomize(SplitAttention(48, radix=3, cardinality=2)).eval()
    with torch.no_grad():
        _, weights = module(torch.randn(2, 48, 8, 8), return_attn=True)
    assert weights.shape == (2, 3, 48, 1, 1)
    assert (weights >= 0).all() and (weights <= 1).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, 48, 1, 1))


def test_radix_one_uses_a_sigmoid_gate() -> None:
    """With one split a softmax would be identically 1; the paper uses a sigmoid instead."""
    module = randomize(SplitAttention(32, radix=1)).eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        out, weights = module(x, return_attn=True)
        feats = module.act0(module.bn0(module.conv(x)))
        hidden = module.act1(module.bn1(module.fc1(feats.mean(dim=(2, 3), keepdim=True))))
        gate = torch.sigmoid(module.fc2(hidden))  # (B, C, 1, 1)
    assert weights.shape == (2, 1, 32, 1, 1)
    assert weights.std() > 0.05 and not torch.allclose(weights, torch.ones_like(weights))
    torch.testing.assert_close(weights[:, 0], gate)
    torch.testing.assert_close(out, feats * gate)


@pytest.mark.parametrize(
    ("channels", "kwargs", "expected"),
    [
        (64, {}, 32),  # 64 * 2 / 4
        (32, {}, 32),  # 16, floored up to 32
        (256, {}, 128),
        (256, {"radix": 1}, 64),
        (256, {"radix": 4}, 256),
        (16, {"radix": 2, "min_rd_channels": 1}, 8),
        (64, {"rd_channels": 12}, 12),
        (96, {"radix": 1, "cardinality": 3}, 33),  # 32 rounded up to a multiple of K (fc1 is grouped)
    ],
)
def test_attention_width_is_max_of_cin_radix_over_4_and_32(channels, kwargs, expected) -> None:
    module = SplitAttention(channels, **kwargs, device="meta")
    assert module.rd_channels == expected == module.fc1.out_channels == module.fc2.in_channels


def test_attention_width_uses_the_input_width() -> None:
    """The official SplAtConv2d computes it from in_channels, not the output width."""
    assert SplitAttention(64, 256, device="meta").rd_channels == 32


def test_defaults_and_official_parameter_layout() -> None:
    params = inspect.signature(SplitAttention).parameters
    assert params["radix"].default == 2 and params["cardinality"].default == 1
    assert params["rd_ratio"].default == 1 / 4 and params["min_rd_channels"].default == 32
    module = SplitAttention(64, radix=2, cardinality=2, device="meta")
    assert module.conv.groups == 4 and module.conv.bias is None and module.conv.kernel_size == (3, 3)
    assert module.conv.out_channels == 128
    assert module.fc1.groups == 2 and module.fc2.groups == 2 and module.fc2.out_channels == 128
    # the state-dict keys of the official SplAtConv2d (with a norm layer)
    assert set(module.state_dict()) >= {
        "conv.weight",
        "bn0.weight",
        "bn0.running_mean",
        "fc1.weight",
        "fc1.bias",
        "bn1.weight",
        "fc2.weight",
        "fc2.bias",
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_with_saturated_logits(dtype) -> None:
    """Logits far beyond exp's half-precision range: a naive exp / sum(exp) would give inf / inf."""
    module = randomize(SplitAttention(32, radix=2, cardinality=2)).eval()
    with torch.no_grad():
        module.fc2.weight.mul_(1e3)
    module = module.to(dtype)
    x = torch.randn(2, 32, 8, 8, dtype=dtype)
    with torch.no_grad():
        out, weights = module(x, return_attn=True)
        splits = module.act0(module.bn0(module.conv(x))).view(2, 2, 32, 8, 8).double()
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(weights).all()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    ones = torch.ones(2, 32, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(weights.double().sum(dim=1), ones, rtol=0, atol=tolerance)
    assert (weights.amax(dim=1) > 0.99).double().mean() > 0.9  # (nearly) hard selection
    # near-ties may flip in half precision, so the check is V = sum_r a_r U_r with the module's own a
    expected = (splits * weights.double()).sum(dim=1)
    assert (out.double() - expected).norm() / expected.norm() < tolerance


def test_stride_and_width_change_like_a_conv() -> None:
    module = SplitAttention(32, 64, 2).eval()
    with torch.no_grad():
        assert module(torch.randn(2, 32, 9, 9)).shape == (2, 64, 5, 5)
    assert attnzoo.create("split_attention", 64)(torch.randn(2, 64, 5, 5)).shape == (2, 64, 5, 5)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((31,), {}, "channels"),  # cardinality * radix = 2 does not divide 31
        ((32,), {"cardinality": 3}, "channels"),
        ((36, 32), {"cardinality": 3, "radix": 1}, "out_channels"),
        ((32,), {"radix": 0}, "radix"),
        ((32,), {"cardinality": 0}, "cardinality"),
        ((32, None, 0), {}, "stride"),
        ((32,), {"rd_channels": 9, "cardinality": 2}, "rd_channels"),
        ((32,), {"rd_ratio": 2.0}, "rd_ratio"),
        ((32,), {"act_layer": "nope"}, "act_layer"),
    ],
)
def test_bad_arguments(args, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SplitAttention(*args, **kwargs)


@pytest.mark.parametrize(
    ("norm_layer", "ref_norm"),
    [
        (None, no_norm),
        (lambda c, **factory: nn.GroupNorm(c, c, **factory), ref_instance_norm),
    ],
    ids=["none", "group_norm_per_channel"],
)
@pytest.mark.parametrize("train", [False, True])
def test_norm_layer_matches_reference_float64(norm_layer, ref_norm, train) -> None:
    module = SplitAttention(32, radix=2, cardinality=2, norm_layer=norm_layer, dtype=torch.float64)
    module = randomize(module).train(train)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    expected, expected_weights = reference(module, x, train=train, norm=ref_norm)
    out, weights = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights[..., 0, 0], expected_weights, rtol=1e-10, atol=1e-10)


def test_norm_layer_default_is_batchnorm_and_factory_gets_device_and_dtype() -> None:
    module = SplitAttention(32, dtype=torch.float64)
    assert isinstance(module.bn0, nn.BatchNorm2d) and isinstance(module.bn1, nn.BatchNorm2d)
    grouped = SplitAttention(32, norm_layer=partial(nn.GroupNorm, 4), dtype=torch.float64)
    assert isinstance(grouped.bn0, nn.GroupNorm) and grouped.bn0.num_groups == 4
    assert grouped.bn0.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="norm_layer"):
        SplitAttention(32, norm_layer="batchnorm")


def test_batch_of_one_in_training_is_a_clear_error() -> None:
    module = SplitAttention(32).train()
    with pytest.raises(ValueError, match=r"x: .*bn1.*batch of more than 1 in training mode.*\(1, 32, 8, 8\)"):
        module(torch.randn(1, 32, 8, 8))
    module.eval()(torch.randn(1, 32, 8, 8))  # eval uses the running statistics
    grouped = SplitAttention(32, norm_layer=partial(nn.GroupNorm, 2)).train()
    assert grouped(torch.randn(1, 32, 8, 8)).shape == (1, 32, 8, 8)


def test_relu_after_the_conv_runs_in_place_and_gradients_match_out_of_place() -> None:
    module = randomize(SplitAttention(32, dtype=torch.float64)).train()
    assert module.act0.inplace
    reference_module = randomize(SplitAttention(32, act_layer=lambda: nn.ReLU(), dtype=torch.float64)).train()
    reference_module.load_state_dict(module.state_dict())
    reference_module.act0.inplace = False
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(module(x).square().sum(), [x, *module.parameters()])
    expected = torch.autograd.grad(reference_module(x).square().sum(), [x, *reference_module.parameters()])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
