"""asymmetric_non_local: APNB and AFNB against the paper's equations in float64."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.asymmetric_non_local import AsymmetricNonLocal

F64 = torch.float64


def randomised(module: AsymmetricNonLocal, seed: int = 0) -> AsymmetricNonLocal:
    """Random weights everywhere (W_o included) and non-trivial BatchNorm statistics; eval mode."""
    return randomize_(module, seed=seed, scale=0.5, norm_statistics=True).eval()


def conv1x1(conv, x):
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias[None, :, None, None]


def batch_norm(bn, x):
    shape = (1, -1, 1, 1)
    normed = (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    return normed * bn.weight.view(shape) + bn.bias.view(shape)


def adaptive_pool(x, size):
    """Adaptive average pooling written out: bin i covers [floor(i L / s), ceil((i + 1) L / s))."""
    batch, channels, height, width = x.shape
    out = torch.empty(batch, channels, size, size, dtype=x.dtype)
    for i in range(size):
        r0, r1 = (i * height) // size, math.ceil((i + 1) * height / size)
        for j in range(size):
            c0, c1 = (j * width) // size, math.ceil((j + 1) * width / size)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out.flatten(2)


def pyramid(x, sizes=(1, 3, 6, 8)):
    return torch.cat([adaptive_pool(x, s) for s in sizes], dim=-1)  # (B, C, 110)


def reference(module, x, low=None, scale=1.0):
    """O = softmax(theta^T P(phi)) P(gamma)^T; Y = fuse(cat[W_o O, X])."""
    seq = module.key  # conv, BN, ReLU
    source = x if low is None else low
    phi = torch.relu(batch_norm(seq[1], conv1x1(seq[0], source)))
    if module.query is None:  # APNB: theta IS phi (shared transform)
        theta = phi
    else:
        theta = torch.relu(batch_norm(module.query[1], conv1x1(module.query[0], x)))
    keys = pyramid(phi)  # (B, C_k, S)
    values = pyramid(conv1x1(module.value, source))  # (B, C_v, S)
    batch, _, height, width = x.shape
    logits = torch.einsum("bcn,bcs->bns", theta.flatten(2), keys) * scale
    weights = torch.softmax(logits, dim=-1)  # over the anchors
    context = torch.einsum("bns,bcs->bcn", weights, values).reshape(batch, -1, height, width)
    fused = conv1x1(module.fuse[0], torch.cat([conv1x1(module.out_proj, context), x], 1))
    fused = batch_norm(module.fuse[1], fused)
    if module.mode == "apnb":
        fused = torch.relu(fused)
    return fused, weights


def test_apnb_matches_paper_equations():
    module = randomised(AsymmetricNonLocal(16, dtype=F64))
    x = torch.randn(2, 16, 9, 7, dtype=F64)  # sides not divisible by 3, 6, 8: overlapping bins
    expected, expected_weights = reference(module, x)
    out, weights = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x), out, rtol=1e-10, atol=1e-10)  # fused path


def test_official_variant_scales_logits():
    module = randomised(AsymmetricNonLocal(16, variant="official", dtype=F64))
    x = torch.randn(2, 16, 6, 6, dtype=F64)
    expected, _ = reference(module, x, scale=module.key_channels**-0.5)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    paper = randomised(AsymmetricNonLocal(16, dtype=F64))
    assert not torch.allclose(paper(x), expected)


def test_afnb_fuses_two_levels_of_different_resolution():
    module = randomised(AsymmetricNonLocal(16, mode="afnb", low_channels=8, dtype=F64))
    high = torch.randn(2, 16, 5, 6, dtype=F64)
    low = torch.randn(2, 8, 11, 9, dtype=F64)  # another width and resolution
    expected, expected_weights = reference(module, high, low)
    out, weights = module(high, low, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(high, low), out, rtol=1e-10, atol=1e-10)
    assert out.shape == high.shape
    # AFNB's fusion has no ReLU (official code): negative outputs survive
    assert (out < 0).any()
    assert (randomised(AsymmetricNonLocal(16, dtype=F64))(high) >= 0).all()


def test_defaults_anchors_and_shared_query_key():
    module = attnzoo.create("asymmetric_non_local", 64)
    assert module.pool_sizes == (1, 3, 6, 8) and module.num_anchors == 110
    assert module.key_channels == module.value_channels == 32  # the paper's 256 of 512
    assert module.query is None  # APNB: theta and phi share one 1x1 conv + BN + ReLU
    assert isinstance(module.key[1], torch.nn.BatchNorm2d) and isinstance(module.key[2], torch.nn.ReLU)
    assert module.fuse[-1].p == 0.05
    afnb = AsymmetricNonLocal(64, mode="afnb", low_channels=32)
    assert afnb.query is not None and afnb.key[0].in_channels == 32 and afnb.value.in_channels == 32
    x = torch.randn(2, 64, 10, 10)
    _, weights = module.eval()(x, return_attn=True)
    assert weights.shape == (2, 100, 110)
    assert (weights >= 0).all() and (weights <= 1).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 100))


def test_zero_initialised_output_projection():
    module = AsymmetricNonLocal(16).eval()
    assert module.out_proj.weight.abs().sum() == 0 and module.out_proj.bias.abs().sum() == 0
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        expected = module.fuse(torch.cat([torch.zeros_like(x), x], 1))
        torch.testing.assert_close(module(x), expected)


def test_wrong_inputs_for_the_mode():
    apnb, afnb = AsymmetricNonLocal(8).eval(), AsymmetricNonLocal(8, mode="afnb", low_channels=4).eval()
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="afnb"):
        apnb(x, torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="low"):
        afnb(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "both"}, "mode"),
        ({"variant": "mmseg"}, "variant"),
        ({"low_channels": 4}, "low_channels"),
        ({"pool_sizes": (1, 0)}, "pool_sizes"),
        ({"dropout": 1.0}, "dropout"),
        ({"key_channels": 0}, "key_channels"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AsymmetricNonLocal(8, **kwargs)


def test_large_logits_stay_finite():
    module = randomised(AsymmetricNonLocal(16, dtype=F64))
    with torch.no_grad():
        module.key[0].weight.mul_(100)  # features of a few hundred: logits ~1e5, past fp16's 65504
    x = torch.randn(1, 16, 8, 8, dtype=F64)
    reference_out = module(x)
    assert torch.isfinite(reference_out).all()
    for dtype in (torch.bfloat16, torch.float16):
        module.to(dtype)
        fused = module(x.to(dtype))
        with_maps, weights = module(x.to(dtype), return_attn=True)
        module.to(F64)
        assert torch.isfinite(fused).all() and torch.isfinite(with_maps).all()
        assert weights.dtype == torch.float32 and torch.isfinite(weights).all()


def test_no_hw_by_hw_matrix():
    module = AsymmetricNonLocal(16).eval()
    side = 24
    with torch.no_grad(), OpRecorder() as probe:
        module(torch.randn(1, 16, side, side))
    # anchors keep the affinity at HW x 110; the fused kernel does not even form that
    assert probe.largest_storage < side * side * 110
