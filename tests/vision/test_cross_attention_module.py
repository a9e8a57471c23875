"""cross_attention_module: a float64 reference from CAN's equations with the m x m correlation R
formed explicitly, the meta-fusion widths, the temperature, the official BatchNorm variant, and
no hard-coded 6 x 6."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import attnzoo
from attnzoo.testing import randomize_
from attnzoo.vision.cross_attention_module import CrossAttentionModule

B, C = 2, 5


perturbed = partial(randomize_, scale=0.1, shift=True)


def build(size=(6, 6), **kwargs) -> CrossAttentionModule:
    torch.manual_seed(0)
    module = perturbed(CrossAttentionModule(C, size, dtype=torch.float64, **kwargs))
    if isinstance(module.norm, torch.nn.BatchNorm2d):
        with torch.no_grad():
            module.norm.running_mean.uniform_(-0.5, 0.5)
            module.norm.running_var.uniform_(0.5, 2.0)
    return module.eval()


def inputs(size=(6, 6), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, C, *size, generator=g, dtype=torch.float64) for _ in range(2))


def reference(module: CrossAttentionModule, p_map: torch.Tensor, q_map: torch.Tensor):
    """Section 4.2 per sample: R, GAP over rows, meta-fusion, A = softmax(mean_j(R_ij w_j) / tau)."""
    tau = module.temperature
    outs, attns = [], []
    with torch.no_grad():
        for own, other in ((p_map, q_map), (q_map, p_map)):
            out, attn = torch.empty_like(own), []
            for n in range(own.shape[0]):
                a, b = own[n].reshape(C, -1), other[n].reshape(C, -1)  # C x m
                m = a.shape[1]
                r = torch.empty(m, m, dtype=torch.float64)
                for i in range(m):
                    for j in range(m):
                        r[i, j] = (a[:, i] @ b[:, j]) / (a[:, i].norm() * b[:, j].norm())
                gap = r.mean(dim=0)  # average of the rows: one value per position j of `other`
                hidden = module.fc1.weight @ gap + module.fc1.bias
                if isinstance(module.norm, torch.nn.BatchNorm2d):
                    bn = module.norm
                    hidden = (hidden - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
                    hidden = hidden * bn.weight + bn.bias
                w = module.fc2.weight @ torch.relu(hidden) + module.fc2.bias
                logits = torch.stack([(r[i] * w).mean() for i in range(m)]) / tau
                a_i = torch.softmax(logits, dim=0)
                out[n] = own[n] * (1 + a_i.view(own.shape[2:]))
                attn.append(a_i.view(1, *own.shape[2:]))
            outs.append(out)
            attns.append(torch.stack(attn))
    return outs, attns


def test_registered_by_catalog_name_with_paper_defaults():
    spec = attnzoo.get_spec("cross_attention_module")
    assert spec.cls is CrossAttentionModule and spec.paper.venue == "NeurIPS 2019"
    module = CrossAttentionModule(64)
    assert module.temperature == 0.025 and module.spatial_size == (6, 6)
    assert (module.fc1.in_features, module.fc1.out_features, module.fc2.out_features) == (36, 6, 36)


@pytest.mark.parametrize("size", [(6, 6), (5, 7)])
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_matches_float64_reference(size, variant):
    module = build(size, variant=variant)
    x, y = inputs(size)
    (out_x, out_y), maps = module(x, y, return_both=True, return_attn=True)
    (ref_x, ref_y), (map_x, map_y) = reference(module, x, y)
    torch.testing.assert_close(out_x, ref_x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_y, ref_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["x"], map_x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(maps["y"], map_y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module(x, y), out_x, rtol=0, atol=0)


def test_meta_fusion_width_follows_the_spatial_size():
    module = CrossAttentionModule(C, (5, 7))
    assert module.positions == 35 and module.fc1.out_features == 35 // 6  # floor, as m // r
    assert CrossAttentionModule(C, 10).fc1.in_features == 100
    assert CrossAttentionModule(C, 2).fc1.out_features == 1  # never a zero-width bottleneck


def test_attention_is_a_distribution_and_the_reweighting_is_residual():
    module = build()
    x, y = inputs()
    out, attn = module(x, y, return_attn=True)
    assert attn.shape == (B, 1, 6, 6) and (attn >= 0).all()
    torch.testing.assert_close(attn.sum((-2, -1)), torch.ones(B, 1, dtype=attn.dtype))
    torch.testing.assert_close(out, x * (1 + attn))  # A + 1: no position is suppressed


def test_temperature_sharpens_the_attention():
    x, y = inputs()
    sharp = build()(x, y, return_attn=True)[1]
    soft = build(temperature=1.0)(x, y, return_attn=True)[1]
    assert sharp.amax() > soft.amax()


def test_correlation_is_cosine_per_position():
    """Rescaling each position's feature vector leaves the attention unchanged."""
    module = build()
    x, y = inputs()
    g = torch.Generator().manual_seed(9)
    scale_x = torch.rand(B, 1, 6, 6, generator=g, dtype=torch.float64) * 10 + 0.1
    scale_y = torch.rand(B, 1, 6, 6, generator=g, dtype=torch.float64) * 10 + 0.1
    attn = module(x, y, return_attn=True)[1]
    torch.testing.assert_close(module(x * scale_x, y * scale_y, return_attn=True)[1], attn)


def test_large_inputs_are_finite():
    module = build().float()
    x, y = (t.float() for t in inputs())
    out = module(1e4 * x, 1e4 * y, return_both=True)
    assert all(torch.isfinite(o).all() for o in out)


def test_wrong_spatial_size_and_bad_arguments():
    module = build()
    x, y = inputs((5, 5))
    with pytest.raises(ValueError, match=r"\(6, 6\)"):
        module(x, y)
    x, y = inputs()
    with pytest.raises(ValueError, match=r"\(6, 6\)"):
        module(x, y.transpose(-2, -1)[..., :5])
    with pytest.raises(ValueError, match=f"C={C}"):
        module(x, y[:, :-1])
    with pytest.raises(ValueError, match="spatial_size"):
        CrossAttentionModule(C, 0)
    with pytest.raises(ValueError, match="temperature"):
        CrossAttentionModule(C, 6, temperature=0.0)
    assert math.isclose(CrossAttentionModule(C).temperature, 0.025)


def test_norm_layer_replaces_the_official_batchnorm():
    # default: cam.py's BatchNorm, with the keys of earlier releases (their checkpoints load)
    assert list(build(variant="official").state_dict()) == [
        "fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
        "norm.num_batches_tracked", "fc2.weight", "fc2.bias",
    ]  # fmt: skip
    # GroupNorm(1) on the hidden vector (a (B, h, 1, 1) map): W2 receives relu(GN(W1 z)) and a
    # batch of one trains
    module = build(variant="official", norm_layer=partial(torch.nn.GroupNorm, 1)).train()
    seen = {}
    # (a hook returning a value would replace the layer's output: these return None)
    module.fc1.register_forward_hook(lambda m, args, out: seen.update(fc1=out))
    module.fc2.register_forward_hook(lambda m, args, out: seen.update(fc2=args[0]))
    x, y = inputs()
    module(x[:1], y[:1])
    gn, hidden = module.norm, seen["fc1"]
    mean, var = hidden.mean(-1, keepdim=True), hidden.var(-1, unbiased=False, keepdim=True)
    expected = torch.relu((hidden - mean) / torch.sqrt(var + gn.eps) * gn.weight + gn.bias)
    torch.testing.assert_close(seen["fc2"], expected, rtol=1e-12, atol=1e-12)
    # None: no norm at all, the paper's meta-fusion on the same weights
    official = build(variant="official", norm_layer=None)
    paper = build(variant="paper")
    paper.load_state_dict(official.state_dict())
    torch.testing.assert_close(official(x, y), paper(x, y), rtol=0, atol=0)
    assert not torch.allclose(build(variant="official")(x, y), paper(x, y))  # the default BN acts
    # the paper's variant has no norm to replace: an explicit one is an error, not ignored
    with pytest.raises(ValueError, match="norm_layer: the paper's meta-fusion has no normalisation"):
        CrossAttentionModule(C, 6, norm_layer=partial(torch.nn.GroupNorm, 1))
