"""generalized_attention: E1..E4 written out per (query, key) pair in float64, every subset."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.generalized_attention import GeneralizedAttention, relative_position_embedding

F64 = torch.float64


def randomised(module: GeneralizedAttention, seed: int = 0, gamma: float = 0.7) -> GeneralizedAttention:
    randomize_(module, seed=seed, scale=0.4)
    with torch.no_grad():
        module.gamma.fill_(gamma)
    return module.eval()


def sinusoid(offset: torch.Tensor, dim: int, wave: float = 1000.0) -> torch.Tensor:
    """[sin(r / wave^(4i/dim)), cos(r / wave^(4i/dim))], i = 0 .. dim/4 - 1."""
    i = torch.arange(dim // 4, dtype=F64)
    angles = offset[..., None] / wave ** (4 * i / dim)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def reference(module: GeneralizedAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A_m(q, k) = softmax_k(sum of the selected E_j), y = x + gamma W sum_m sum_k A_m W'_m x_k."""
    e1, e2, e3, e4 = (flag == "1" for flag in module.attention_type)
    batch, channels, height, width = x.shape
    heads, d, s = module.num_heads, module.head_dim, module.kv_stride
    queries = [(a, b) for a in range(height) for b in range(width)]
    keys = [(a, b) for a in range(0, height, s) for b in range(0, width, s)]  # input coordinates
    z = x.flatten(2)  # (B, C, HW)
    xk = torch.stack([x[:, :, a, b] for a, b in keys], dim=-1)  # (B, C, N')

    def proj(conv, feats):  # per-head 1x1 conv: (B, M, N, d)
        return torch.einsum("mdc,bcn->bmnd", conv.weight[:, :, 0, 0].view(heads, d, channels), feats)

    energy = torch.zeros(batch, heads, len(queries), len(keys), dtype=F64)
    if e2 or e4:
        dy = torch.tensor([[qa - ka for ka, _ in keys] for qa, _ in queries], dtype=F64)
        dx = torch.tensor([[qb - kb for _, kb in keys] for _, qb in queries], dtype=F64)
        dim = module.position_embedding_dim
        mag = module.position_magnitude
        vx = module.appr_geom_fc_x.weight.view(heads, d, dim // 2)
        vy = module.appr_geom_fc_y.weight.view(heads, d, dim // 2)
        # V^R R_{q,k} per head: (M, HW, N', d)
        pos = (
            torch.einsum("qkp,mdp->mqkd", sinusoid(dx * mag, dim), vx)
            + torch.einsum("qkp,mdp->mqkd", sinusoid(dy * mag, dim), vy)
        ) / math.sqrt(2)
    if e1 or e2:
        q = proj(module.query_conv, z)
    if e1 or e3:
        k = proj(module.key_conv, xk)
    if e1:
        energy = energy + torch.einsum("bmqd,bmkd->bmqk", q, k)
    if e2:
        energy = energy + torch.einsum("bmqd,mqkd->bmqk", q, pos)
    if e3:
        energy = energy + torch.einsum("md,bmkd->bmk", module.appr_bias.view(heads, d), k)[:, :, None]
    if e4:
        energy = energy + torch.einsum("md,mqkd->mqk", module.geom_bias.view(heads, d), pos)[None]
    weights = torch.softmax(energy, dim=-1)
    context = torch.einsum("bmqk,bmkd->bmqd", weights, proj(module.value_conv, xk))
    merged = context.permute(0, 1, 3, 2).reshape(batch, heads * d, -1)  # channels head-major
    out = torch.einsum("oc,bcn->bon", module.proj_conv.weight[:, :, 0, 0], merged)
    out = out + module.proj_conv.bias[None, :, None]
    return x + module.gamma * out.view(batch, channels, height, width), weights


ALL_TYPES = [f"{i:04b}" for i in range(1, 16)]


@pytest.mark.parametrize("attention_type", ALL_TYPES)
def test_every_term_subset_matches_the_equations(attention_type):
    module = randomised(GeneralizedAttention(16, num_heads=2, attention_type=attention_type, dtype=F64))
    x = torch.randn(2, 16, 5, 7, dtype=F64)  # H != W, odd sides with kv_stride 2
    expected, expected_weights = reference(module, x)
    out, weights = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)  # fused path


@pytest.mark.parametrize("kv_stride", [1, 3])
def test_other_strides_and_magnitude(kv_stride):
    module = GeneralizedAttention(8, num_heads=2, kv_stride=kv_stride, position_magnitude=0.5, dtype=F64)
    module = randomised(module, seed=kv_stride)
    x = torch.randn(1, 8, 7, 4, dtype=F64)
    expected, expected_weights = reference(module, x)
    out, weights = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    assert weights.shape == (1, 2, 28, math.ceil(7 / kv_stride) * math.ceil(4 / kv_stride))


def test_defaults_identity_at_init_and_mmcv_names():
    module = attnzoo.create("generalized_attention", 64)
    assert (module.num_heads, module.kv_stride, module.attention_type) == (8, 2, "1111")
    assert module.head_dim == 8 and module.position_embedding_dim == 64
    assert module.gamma.item() == 0.0
    x = torch.randn(2, 64, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x), x, rtol=0, atol=0)
    assert set(module.state_dict()) == {
        "query_conv.weight", "key_conv.weight", "value_conv.weight", "appr_geom_fc_x.weight",
        "appr_geom_fc_y.weight", "appr_bias", "geom_bias", "proj_conv.weight", "proj_conv.bias", "gamma",
    }  # fmt: skip
    # only the parameters of the selected terms exist
    saliency = GeneralizedAttention(64, attention_type="0010")
    assert saliency.query_conv is None and saliency.appr_geom_fc_x is None and saliency.geom_bias is None
    assert saliency.key_conv is not None and saliency.appr_bias is not None


def test_key_content_only_shares_one_map_across_queries():
    module = randomised(GeneralizedAttention(8, num_heads=2, attention_type="0010", dtype=F64))
    _, weights = module(torch.randn(2, 8, 4, 6, dtype=F64), return_attn=True)
    torch.testing.assert_close(weights, weights[:, :, :1].expand_as(weights), rtol=0, atol=0)


def test_relative_position_only_ignores_content():
    module = randomised(GeneralizedAttention(8, num_heads=2, attention_type="0001", dtype=F64))
    _, a = module(torch.randn(1, 8, 5, 6, dtype=F64), return_attn=True)
    _, b = module(torch.randn(1, 8, 5, 6, dtype=F64) * 3, return_attn=True)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and it does depend on the offset: not uniform
    assert a.std() > 1e-3


def test_query_position_term_on_non_square_maps():
    # mmcv's E2-without-E4 branch multiplies the y-offset features with the TRANSPOSED query and
    # fails on H != W; here it is the per-pair equation (checked against the reference above)
    module = randomised(GeneralizedAttention(8, num_heads=2, attention_type="0100", dtype=F64))
    x = torch.randn(1, 8, 3, 8, dtype=F64)
    torch.testing.assert_close(module(x), reference(module, x)[0], rtol=1e-10, atol=1e-10)


def test_relative_position_embedding_formula_and_sign():
    emb = relative_position_embedding(3, 2, 8, kv_stride=2, magnitude=1.0, dtype=F64)
    assert emb.shape == (3, 2, 4)
    offset = 2.0 - 1.0 * 2  # query 2 minus key 1 at stride 2: 0
    torch.testing.assert_close(emb[2, 1], sinusoid(torch.tensor(offset, dtype=F64), 8))
    offset = 0.0 - 1.0 * 2  # query minus key (mmcv's sign): -2
    expected = torch.tensor(
        [math.sin(-2.0), math.sin(-2.0 / 1000**0.5), math.cos(-2.0), math.cos(-2.0 / 1000**0.5)]
    )
    torch.testing.assert_close(emb[0, 1], expected.to(F64))
    with pytest.raises(ValueError, match="multiple of 4"):
        relative_position_embedding(2, 2, 6)


def test_softmax_over_keys_and_large_logits():
    module = randomised(GeneralizedAttention(16, num_heads=2, dtype=F64))
    with torch.no_grad():
        module.query_conv.weight.mul_(30)
        module.key_conv.weight.mul_(30)
    x = torch.randn(2, 16, 6, 6, dtype=F64)
    out, weights = module(x, return_attn=True)
    assert torch.isfinite(out).all()
    assert (weights >= 0).all() and (weights <= 1).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1], dtype=F64))
    for dtype in (torch.bfloat16, torch.float16):
        module.to(dtype)
        fused = module(x.to(dtype))
        with_maps, maps = module(x.to(dtype), return_attn=True)
        module.to(F64)
        assert torch.isfinite(fused).all() and torch.isfinite(with_maps).all()
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all()


@pytest.mark.parametrize("attention_type", ["1111", "0101", "1000"])
def test_no_query_by_key_matrix_without_maps(attention_type):
    module = GeneralizedAttention(8, num_heads=2, attention_type=attention_type, kv_stride=1).eval()
    side = 24
    x = torch.randn(1, 8, side, side)
    one_head = (side * side) ** 2  # the E2/E4 parts are O(HW (H' + W')): 2 * 576 * 52 < this / 4
    with torch.no_grad(), OpRecorder() as probe:
        module(x)
    assert probe.largest_storage < one_head // 4
    with torch.no_grad(), OpRecorder() as probe:
        module(x, return_attn=True)
    assert probe.largest_storage >= one_head  # the maps themselves: the probe does see such matrices


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"attention_type": "0000"}, "attention_type"),
        ({"attention_type": "111"}, "attention_type"),
        ({"attention_type": "1201"}, "attention_type"),
        ({"num_heads": 17}, "num_heads"),
        ({"kv_stride": 0}, "kv_stride"),
        ({"position_embedding_dim": 6}, "position_embedding_dim"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GeneralizedAttention(16, **kwargs)
