"""adaptive_context: APCNet's adaptive context modules in float64 (regions pooled by hand, sigmoid
affinities, the weighted sum per pixel), scales, no HW x HW buffer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.adaptive_context import AdaptiveContext

pytestmark = pytest.mark.usefixtures("float64_default")


def cbr(block, x):
    """conv (no bias) -> BatchNorm (eval statistics) -> ReLU, written out."""
    conv, bn = block[0], block[1]
    y = F.conv2d(x, conv.weight, padding=conv.padding)
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    return torch.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


def regions(x, s):
    """Average over the s x s bins [floor(i H / s), ceil((i + 1) H / s)) (adaptive pooling), by hand."""
    b, c, h, w = x.shape
    out = torch.empty(b, c, s * s)
    for i in range(s):
        for j in range(s):
            r0, r1 = (i * h) // s, math.ceil((i + 1) * h / s)
            c0, c1 = (j * w) // s, math.ceil((j + 1) * w / s)
            out[:, :, i * s + j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


def acm_reference(m, x):
    s = m.pool_scale
    reduced = cbr(m.reduce, x)
    pooled = regions(x, s)[..., None]  # (B, C, s^2, 1): a 1x1 conv per region
    y = cbr(m.reduce_pooled, pooled)[..., 0]  # (B, C', s^2)
    g = cbr(m.global_info, reduced.mean(dim=(2, 3), keepdim=True))
    logits = F.conv2d(reduced + g, m.gla.weight, m.gla.bias)
    affinity = 1 / (1 + torch.exp(-logits))  # sigmoid, not a softmax over regions
    b, c, h, w = reduced.shape
    z = torch.zeros(b, c, h, w)
    for p in range(h):
        for q in range(w):
            for r in range(s * s):
                z[:, :, p, q] += affinity[:, r, p, q, None] * y[:, :, r]
    out = torch.relu(cbr(m.residual, z) + reduced)
    return (cbr(m.fusion, out) if isinstance(m.fusion, torch.nn.Sequential) else out), affinity


@pytest.mark.parametrize("fusion", [True, False])
def test_matches_paper(fusion):
    torch.manual_seed(0)
    module = randomize_(AdaptiveContext(16, fusion=fusion), norm_statistics=True).eval()
    x = torch.randn(2, 16, 7, 9)
    contexts, affinities = [x], {}
    for scale, acm in zip(module.pool_scales, module.modules_per_scale):
        z, a = acm_reference(acm, x)
        contexts.append(z)
        affinities[f"scale_{scale}"] = a
    expected = cbr(module.bottleneck, torch.cat(contexts, dim=1))
    out, maps = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    for key, a in affinities.items():
        torch.testing.assert_close(maps[key], a, rtol=1e-10, atol=1e-10)


def test_defaults_and_sigmoid_affinities():
    module = randomize_(AdaptiveContext(64)).eval()
    assert module.pool_scales == (1, 2, 3, 6) and module.inner_channels == 16 and module.out_channels == 64
    x = torch.randn(2, 64, 12, 12)
    _, maps = module(x, return_attn=True)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "scale_1": (2, 1, 12, 12),
        "scale_2": (2, 4, 12, 12),
        "scale_3": (2, 9, 12, 12),
        "scale_6": (2, 36, 12, 12),
    }
    a = maps["scale_6"]
    assert ((a >= 0) & (a <= 1)).all()
    assert not torch.allclose(a.sum(dim=1), torch.ones(2, 12, 12))  # not a softmax over regions
    assert not torch.equal(maps["scale_1"], torch.ones_like(maps["scale_1"]))  # one region, still gated


def test_no_hw_by_hw_buffer():
    module = AdaptiveContext(32).float().eval()
    x = torch.randn(1, 32, 24, 24, dtype=torch.float32)
    n = 24 * 24
    with torch.no_grad(), OpRecorder() as rec:
        module(x, return_attn=True)
    assert rec.largest_storage < n * n // 4


def test_registered_and_errors():
    spec = attnzoo.get_spec("adaptive_context")
    assert spec.family == "non_local" and spec.placement == "head" and spec.map_kind == "mixed"
    with pytest.raises(ValueError, match="pool_scales"):
        AdaptiveContext(16, pool_scales=(0, 2))
    assert AdaptiveContext(16, out_channels=4)(torch.randn(2, 16, 5, 5)).shape == (2, 4, 5, 5)


def test_norm_layer_replaces_every_batchnorm():
    from functools import partial

    default = AdaptiveContext(8, pool_scales=(1, 2))
    assert "modules_per_scale.0.global_info.1.running_mean" in default.state_dict()  # keys unchanged
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in default.modules()) == 2 * 5 + 1
    grouped = AdaptiveContext(8, pool_scales=(1, 2), norm_layer=partial(torch.nn.GroupNorm, 1)).train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in grouped.modules())
    x = torch.randn(1, 8, 5, 5)
    # a batch of one trains: the global-context block normalises a (1, C', 1, 1) map, which
    # BatchNorm cannot in training mode
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        AdaptiveContext(8, pool_scales=(1, 2)).train()(x)
    assert grouped(x).shape == x.shape
    block = grouped.modules_per_scale[0].reduce
    expected = torch.relu(F.group_norm(F.conv2d(x, block[0].weight), 1, block[1].weight, block[1].bias))
    torch.testing.assert_close(block(x), expected)
    bare = AdaptiveContext(8, pool_scales=(1, 2), norm_layer=None)
    assert bare.bottleneck[0].bias is not None and isinstance(bare.bottleneck[1], torch.nn.Identity)
