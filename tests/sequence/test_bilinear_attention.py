"""bilinear_attention: a float64 loop reference from BAN's equations (rank-k pooled logits, joint
softmax per glimpse, residual glimpses), the official variant, masks and numerics."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnzoo
from attnzoo.sequence.bilinear_attention import BilinearAttention, joint_softmax
from attnzoo.testing import randomize_

B, NX, NY, DX, DY, K, G = 2, 4, 5, 6, 7, 8, 3


perturbed = partial(randomize_, scale=0.1, shift=True)


def build(**kwargs) -> BilinearAttention:
    torch.manual_seed(0)
    kwargs = {"glimpses": G, **kwargs}
    return perturbed(BilinearAttention(DX, DY, K, dtype=torch.float64, **kwargs))


def inputs(seed: int = 1, ny: int = NY):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, NX, DX, generator=g, dtype=torch.float64),
        torch.randn(B, ny, DY, generator=g, dtype=torch.float64),
    )


def linear(layer: torch.nn.Linear, t: torch.Tensor) -> torch.Tensor:
    out = torch.einsum("oi,...i->...o", layer.weight, t)
    return out + layer.bias if layer.bias is not None else out


def reference(module: BilinearAttention, x: torch.Tensor, y: torch.Tensor, valid=None):
    """BAN from the paper, element by element for the maps, einsums for the projections."""
    relu = torch.relu
    rank, joint_rank, k_dim = module.rank, module.joint_rank, module.hidden_dim
    with torch.no_grad():
        ux, vy = relu(linear(module.att_x, x)), relu(linear(module.att_y, y))  # (B, N, K k)
        n_x, n_y = x.shape[1], y.shape[1]
        logits = torch.zeros(x.shape[0], module.glimpses, n_x, n_y, dtype=torch.float64)
        for b in range(x.shape[0]):
            for g in range(module.glimpses):
                p = module.glimpse_vectors[g]
                for i in range(n_x):
                    for j in range(n_y):
                        hadamard = ux[b, i] * vy[b, j]  # (K k,)
                        if module.variant == "paper":
                            pooled = hadamard.view(k_dim, rank).sum(-1)  # SumPool with stride k
                            logits[b, g, i, j] = p @ pooled
                        else:
                            logits[b, g, i, j] = p @ hadamard
        maps = torch.zeros_like(logits)
        for b in range(x.shape[0]):
            for g in range(module.glimpses):
                ok = torch.ones(n_x, n_y, dtype=torch.bool) if valid is None else valid[b]
                if ok.any():  # softmax over every (i, j) pair of the map at once
                    exp = torch.exp(logits[b, g] - logits[b, g][ok].max()) * ok
                    maps[b, g] = exp / exp.sum()
        f = x.clone()
        for g in range(module.glimpses):
            left = relu(linear(module.joint_x[g], f))  # (B, N_x, K k')
            right = relu(linear(module.joint_y, y)).view(*y.shape[:2], module.glimpses, -1)[:, :, g]
            # f'_c = sum_i sum_j A_ij left_ic right_jc
            joint = torch.einsum("bij,bic,bjc->bc", maps[:, g], left, right)
            joint = joint.view(x.shape[0], k_dim, joint_rank).sum(-1)
            f = f + linear(module.proj[g], joint)[:, None, :]  # (P^T f') 1^T + f
    return f, maps


def test_registered_by_catalog_name_with_paper_defaults():
    spec = attnzoo.get_spec("bilinear_attention")
    assert spec.cls is BilinearAttention and spec.family == "sequence"
    module = BilinearAttention(16)
    assert module.glimpses == 8 and module.rank == 3 and module.variant == "paper"
    assert module.glimpse_vectors.shape == (8, 16)  # p_g acts on the K pooled units
    assert module.att_x.out_features == 16 * 3


@pytest.mark.parametrize(
    "kwargs", [{}, {"variant": "official"}, {"joint_rank": 2}, {"rank": 1}, {"bias": False}]
)
def test_matches_float64_reference(kwargs):
    module = build(**kwargs)
    x, y = inputs()
    out, maps = module(x, y, return_attn=True)
    expected, expected_maps = reference(module, x, y)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x, y), out, rtol=0, atol=0)


def test_softmax_is_joint_over_both_inputs_per_glimpse():
    module = build()
    x, y = inputs()
    _, maps = module(x, y, return_attn=True)
    assert maps.shape == (B, G, NX, NY)
    assert (maps >= 0).all() and (maps <= 1).all()
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(B, G, dtype=torch.float64))
    # not a per-row (or per-column) softmax
    assert not torch.allclose(maps.sum(-1), torch.ones(B, G, NX, dtype=torch.float64))
    assert not torch.allclose(maps.sum(-2), torch.ones(B, G, NY, dtype=torch.float64))


def test_maps_come_from_x_not_from_the_updated_glimpses():
    module = build()
    x, y = inputs()
    _, maps = module(x, y, return_attn=True)
    torch.testing.assert_close(maps, module.attention_maps(x, y))
    with torch.no_grad():  # changing the residual path leaves every map as it is
        for proj in module.proj:
            proj.weight.mul_(10)
    torch.testing.assert_close(module(x, y, return_attn=True)[1], maps)


def test_paper_pooling_differs_from_the_official_unpooled_glimpse_vectors():
    paper = build()
    official = build(variant="official")
    assert official.glimpse_vectors.shape == (G, K * 3)
    # the paper's p_g on pooled units is the official p_g with each entry repeated k times
    state = paper.state_dict()
    state["glimpse_vectors"] = state["glimpse_vectors"].repeat_interleave(3, dim=1)  # (G, K) -> (G, K k)
    official.load_state_dict(state)
    x, y = inputs()
    torch.testing.assert_close(official(x, y), paper(x, y), rtol=1e-12, atol=1e-12)


def test_padded_objects_are_masked_out():
    module = build()
    x, y = inputs(ny=NY + 3)
    y_mask = torch.ones(B, NY + 3, dtype=torch.bool)
    y_mask[:, NY:] = False
    padded = y.clone()
    padded[:, NY:] = 1e3  # garbage in the padding must not matter
    out, maps = module(x, padded, key_mask=y_mask, return_attn=True)
    assert maps[..., NY:].abs().max() == 0
    torch.testing.assert_close(out, module(x, y[:, :NY]), rtol=1e-12, atol=1e-12)
    valid = y_mask[:, None, :].expand(B, NX, NY + 3)
    torch.testing.assert_close(out, reference(module, x, padded, valid)[0], rtol=1e-10, atol=1e-10)


def test_query_mask_and_official_zero_object_masking():
    module = build()
    x, y = inputs()
    x_mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    _, maps = module(x, y, query_mask=x_mask, return_attn=True)
    assert maps[0, :, 2].abs().max() == 0 and maps[1, :, 1:].abs().max() == 0
    # the official code masks objects whose features are all zero: a mask derived from y
    y = y.clone()
    y[0, 1] = 0
    _, maps = module(x, y, key_mask=y.abs().sum(-1) != 0, return_attn=True)
    assert maps[0, ..., 1].abs().max() == 0 and maps[1, ..., 1].abs().max() > 0


def test_joint_softmax_without_a_valid_pair_is_zero():
    # fully masked samples through the module: the conformance suite's key_mask sample
    torch.testing.assert_close(
        joint_softmax(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool)), torch.zeros(2, 3)
    )


def test_large_logits_are_finite():
    module = build()
    with torch.no_grad():
        module.glimpse_vectors.mul_(1e4)
    x, y = inputs()
    out, maps = module.float()(x.float(), y.float(), return_attn=True)
    assert torch.isfinite(out).all() and torch.isfinite(maps).all()
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(B, G))


def test_bad_arguments():
    module = build()
    x, y = inputs()
    with pytest.raises(TypeError, match="key_mask.*bool"):  # no additive key mask here
        module(x, y, key_mask=torch.ones(B, NY))
    with pytest.raises(ValueError, match="query_mask.*broadcast"):
        module(x, y, query_mask=torch.ones(B, NX + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="variant"):
        BilinearAttention(8, variant="ban")
    with pytest.raises(ValueError, match="glimpses"):
        BilinearAttention(8, glimpses=0)
