"""Self-calibrated convolution against a float64 reference written from the SCNet paper (eqs. 1-4)."""

from __future__ import annotations

import inspect
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnzoo
from attnzoo.testing import randomize_
from attnzoo.vision.scconv import SelfCalibratedConv


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test draws the same inputs, run alone or in any order."""
    torch.manual_seed(0)


def ref_conv(x: Tensor, w: Tensor, bias: Tensor | None, stride: int, groups: int) -> Tensor:
    """Grouped 3x3 'same' convolution (padding 1) as a sum over the taps of per-group einsums."""
    batch, _, height, width = x.shape
    out_ch, in_per_group, k, _ = w.shape
    xp = F.pad(x, (1, 1, 1, 1))
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    xg = xp.view(batch, groups, in_per_group, *xp.shape[-2:])
    wg = w.view(groups, out_ch // groups, in_per_group, k, k)
    out = x.new_zeros(batch, groups, out_ch // groups, out_h, out_w)
    for i in range(k):
        for j in range(k):
            patch = xg[
                ..., i : i + (out_h - 1) * stride + 1 : stride, j : j + (out_w - 1) * stride + 1 : stride
            ]
            out += torch.einsum("bgihw,goi->bgohw", patch, wg[..., i, j])
    out = out.reshape(batch, out_ch, out_h, out_w)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def ref_k(layer: nn.Sequential, x: Tensor, train: bool = False) -> Tensor:
    """K_i: the conv, then (when present) BN, with the running or the batch statistics."""
    conv, norm = layer[0], layer[1]
    y = ref_conv(x, conv.weight, conv.bias, conv.stride[0], conv.groups)
    if isinstance(norm, nn.Identity):
        return y
    if train:
        mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = norm.running_mean, norm.running_var
    shape = (1, -1, 1, 1)
    return (y - mean.view(shape)) / torch.sqrt(var.view(shape) + norm.eps) * norm.weight.view(
        shape
    ) + norm.bias.view(shape)


def ref_avg_pool(x: Tensor, r: int) -> Tensor:
    """AvgPool_r: mean over r x r windows with stride r (trailing rows and columns dropped); a
    side shorter than r is pooled whole."""
    rh, rw = min(r, x.shape[-2]), min(r, x.shape[-1])
    out_h, out_w = x.shape[-2] // rh, x.shape[-1] // rw
    out = x.new_zeros(*x.shape[:2], out_h, out_w)
    for i in range(out_h):
        for j in range(out_w):
            out[..., i, j] = x[..., i * rh : (i + 1) * rh, j * rw : (j + 1) * rw].mean(dim=(-2, -1))
    return out


def interp_matrix(n_out: int, n_in: int, mode: str) -> Tensor:
    """Rows: output positions; columns: input positions. Bilinear uses half-pixel centres."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        if mode == "bilinear":
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(math.floor(src), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            m[i, i0] += 1 - (src - i0)
            m[i, i1] += src - i0
        else:
            m[i, min(math.floor(i * n_in / n_out), n_in - 1)] = 1.0
    return m


def ref_up(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    rows, cols = interp_matrix(size[0], x.shape[-2], mode), interp_matrix(size[1], x.shape[-1], mode)
    return torch.einsum("hi,bcij,wj->bchw", rows, x, cols)


def reference(module: SelfCalibratedConv, x: Tensor, train: bool = False) -> tuple[Tensor, Tensor]:
    """SCNet eqs. 1-4 and Y = [Y1, Y2] (paper), or the official ordering and nearest upsampling."""
    official = module.variant == "official"
    half = x.shape[1] // 2
    first, second = x[:, :half], x[:, half:]
    x1, x2 = (second, first) if official else (first, second)
    t1 = ref_avg_pool(x1, module.pooling_r)  # eq. 1
    x1_prime = ref_up(
        ref_k(module.k2, t1, train), x.shape[-2:], "nearest" if official else "bilinear"
    )  # eq. 2
    gate = 1 / (1 + torch.exp(-(x1 + x1_prime)))
    y1 = ref_k(module.k4, ref_k(module.k3, x1, train) * gate, train)  # eqs. 3-4
    y2 = ref_k(module.k1, x2, train)
    out = torch.cat([y2, y1] if official else [y1, y2], dim=1)
    return torch.clamp(out, min=0), gate  # the bottleneck's ReLU


# random weights and BN statistics, so no term of the equation is trivially zero or one
randomize = partial(randomize_, scale=0.3, norm_statistics=True)


CASES = [
    # channels, stride, kwargs, (H, W)
    (32, 1, {}, (8, 8)),
    (32, 1, {}, (11, 11)),  # not divisible by r = 4: pooled to 2x2, upsampled back to 11x11
    (32, 2, {}, (9, 13)),
    (48, 1, {"groups": 4}, (10, 7)),
    (32, 1, {"pooling_r": 2}, (7, 7)),
    (32, 1, {"norm_layer": None}, (8, 8)),  # the bare equations, conv biases
    (32, 1, {}, (3, 6)),  # a side shorter than r
    (32, 1, {"variant": "official"}, (11, 11)),
    (32, 2, {"variant": "official", "groups": 2}, (9, 8)),
]


@pytest.mark.parametrize(("channels", "stride", "kwargs", "size"), CASES)
def test_matches_paper_reference_float64(channels, stride, kwargs, size) -> None:
    module = randomize(SelfCalibratedConv(channels, stride, **kwargs, dtype=torch.float64)).eval()
    x = torch.randn(2, channels, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected, expected_gate = reference(module, x)
    with torch.no_grad():
        out, gate = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gate, expected_gate, rtol=1e-10, atol=1e-10)
    assert gate.shape == (2, channels // 2, *size)


def test_matches_reference_in_training_mode() -> None:
    module = randomize(SelfCalibratedConv(32, dtype=torch.float64)).train()
    x = torch.randn(3, 32, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected, _ = reference(module, x, train=True)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_paper_upsamples_bilinearly_official_by_nearest_neighbour() -> None:
    """Same weights: the variants differ, and each matches only its own upsampling."""
    paper = randomize(SelfCalibratedConv(32, dtype=torch.float64)).eval()
    official = SelfCalibratedConv(32, variant="official", dtype=torch.float64).eval()
    official.load_state_dict(paper.state_dict())
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        _, gate_paper = paper(x, return_attn=True)
        _, gate_official = official(x, return_attn=True)
        x1 = x[:, :16]
        small = paper.k2(F.avg_pool2d(x1, 4))
    bilinear = torch.sigmoid(x1 + F.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False))
    torch.testing.assert_close(gate_paper, bilinear, rtol=1e-12, atol=1e-12)
    # the official variant calibrates the second half, with a blocky (nearest) reference
    nearest = torch.sigmoid(x[:, 16:] + F.interpolate(paper.k2(F.avg_pool2d(x[:, 16:], 4)), size=(8, 8)))
    torch.testing.assert_close(gate_official, nearest, rtol=1e-12, atol=1e-12)
    # nearest-neighbour reference maps are constant on 4x4 blocks; bilinear ones are not
    up = F.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    assert (up[..., 2, 2] - up[..., 3, 3]).abs().max() > 1e-3


def test_gate_is_a_sigmoid_of_input_plus_reference() -> None:
    module = randomize(SelfCalibratedConv(32)).eval()
    x = torch.randn(2, 32, 11, 11)
    with torch.no_grad():
        _, gate = module(x, return_attn=True)
    assert gate.shape == (2, 16, 11, 11)
    assert (gate > 0).all() and (gate < 1).all()
    # the gate depends on the calibrated half only: changing the plain half leaves it alone
    y = x.clone()
    y[:, 16:] = torch.randn(2, 16, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(module(y, return_attn=True)[1], gate, rtol=0, atol=0)


def test_pooling_ratio_default_is_4() -> None:
    params = inspect.signature(SelfCalibratedConv).parameters
    assert params["pooling_r"].default == 4 and params["variant"].default == "paper"
    assert params["groups"].default == 1 and params["norm_layer"].default is nn.BatchNorm2d
    module = randomize(SelfCalibratedConv(32, dtype=torch.float64)).eval()
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    other = SelfCalibratedConv(32, pooling_r=2, dtype=torch.float64).eval()
    other.load_state_dict(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(module, x)[0], rtol=1e-10, atol=1e-10)
        assert (module(x) - other(x)).abs().max() > 1e-3  # r matters, and the default is 4


def test_strides_only_k1_and_k4() -> None:
    module = SelfCalibratedConv(32, 2, device="meta")
    assert [k[0].stride for k in (module.k1, module.k2, module.k3, module.k4)] == [
        (2, 2),
        (1, 1),
        (1, 1),
        (2, 2),
    ]
    assert all(k[0].bias is None and isinstance(k[1], nn.BatchNorm2d) for k in (module.k1, module.k4))
    with torch.no_grad():
        out = SelfCalibratedConv(32, 2).eval()(torch.randn(2, 32, 11, 11))
    assert out.shape == (2, 32, 6, 6)


def test_no_activation_gives_the_bare_sc_conv() -> None:
    module = randomize(SelfCalibratedConv(32, act_layer=None)).eval()
    with torch.no_grad():
        out = module(torch.randn(2, 32, 8, 8))
    assert (out < 0).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_with_large_inputs(dtype) -> None:
    module = randomize(SelfCalibratedConv(32)).eval()
    x = 30 * torch.randn(2, 32, 11, 11)  # saturates the gate
    with torch.no_grad():
        expected = module.double()(x.double())
        out, gate = module.to(dtype)(x.to(dtype), return_attn=True)
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(gate).all()
    error = (out.double() - expected).norm() / expected.norm()
    assert error < 3e-2


def test_shape_preserving_and_registered() -> None:
    spec = attnzoo.get_spec("scconv")
    assert spec.family == "gating" and spec.paper.venue == "CVPR 2020"
    module = attnzoo.create("scconv", 64).eval()
    with torch.no_grad():
        assert module(torch.randn(2, 64, 13, 5)).shape == (2, 64, 13, 5)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((31,), {}, "channels"),
        ((0,), {}, "channels"),
        ((32,), {"groups": 3}, "groups"),
        ((32,), {"pooling_r": 0}, "pooling_r"),
        ((32, 0), {}, "stride"),
        ((32,), {"variant": "fast"}, "variant"),
        ((32,), {"act_layer": "nope"}, "act_layer"),
    ],
)
def test_bad_arguments(args, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SelfCalibratedConv(*args, **kwargs)
