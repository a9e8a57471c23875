"""co_attention: a float64 reference from COSNet's equations with the affinity S formed explicitly
(vanilla, symmetric and channel-wise W), the softmax axes, the official double-softmax variant,
the gate, and numerics."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import randomize_
from attnzoo.vision.co_attention import CoAttention

B, C, HA, WA, HB, WB = 2, 6, 3, 4, 5, 2


perturbed = partial(randomize_, scale=0.1, shift=True)


def build(**kwargs) -> CoAttention:
    torch.manual_seed(0)
    # non-trivial BatchNorm statistics, used in eval mode
    return perturbed(CoAttention(C, dtype=torch.float64, **kwargs), norm_statistics=True).eval()


def inputs(seed: int = 1, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(B, C, HA, WA, generator=g, dtype=torch.float64)
    y = scale * torch.randn(B, C, HB, WB, generator=g, dtype=torch.float64)
    return x, y


def matrix_w(module: CoAttention) -> torch.Tensor:
    """W of eq. 1 (vanilla), eq. 3 (P^T D P) or eq. 4 (D), as a C x C matrix."""
    if module.form == "vanilla":
        return module.weight.weight.detach()
    d = torch.diag(module.diagonal.detach())
    if module.form == "channel":
        return d
    p = module.projection.detach()
    return p.T @ d @ p


def fusion(seq: torch.nn.Sequential, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    conv = seq[0]
    out = F.conv2d(torch.cat([z, v], 1), conv.weight, conv.bias, padding=1)
    if isinstance(seq[1], torch.nn.BatchNorm2d):
        bn = seq[1]
        out = (out - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        out = out * bn.weight[:, None, None] + bn.bias[:, None, None]
    return torch.relu(out)


def reference(module: CoAttention, x: torch.Tensor, y: torch.Tensor):
    """Eqs. 1-8 per sample, with S = V_b^T W V_a formed explicitly (columns of V are positions)."""
    w = matrix_w(module)
    outs_a, outs_b, maps_a, maps_b = [], [], [], []
    with torch.no_grad():
        for n in range(x.shape[0]):
            va = x[n].reshape(C, -1)  # C x HW_a
            vb = y[n].reshape(C, -1)  # C x HW_b
            s = vb.T @ w @ va  # HW_b x HW_a
            if module.variant == "paper":
                s_c = torch.softmax(s, dim=0)  # each column normalised: over the positions of b
                s_r = torch.softmax(s.T, dim=0)  # softmax(S^T), columns: over the positions of a
            else:  # siamese_model_conf.py: A = S^T, softmax over dim of a, then softmax again over b
                s_r = torch.softmax(s.T, dim=0)
                s_c = torch.softmax(s_r.T, dim=0)
            z_a, z_b = vb @ s_c, va @ s_r  # C x HW_a, C x HW_b (eq. 6)
            gate_w = module.gate.weight[0]
            gate_b = module.gate.bias[0] if module.gate.bias is not None else 0.0
            z_a = z_a * torch.sigmoid(gate_w @ z_a + gate_b)  # eqs. 7-8, per position
            z_b = z_b * torch.sigmoid(gate_w @ z_b + gate_b)
            fuse_b = module.fuse_y if module.fuse_y is not None else module.fuse
            outs_a.append(fusion(module.fuse, z_a.reshape(1, C, HA, WA), x[n : n + 1])[0])
            outs_b.append(fusion(fuse_b, z_b.reshape(1, C, HB, WB), y[n : n + 1])[0])
            maps_a.append(s_c.T)  # (HW_a, HW_b): the weights of each position of a
            maps_b.append(s_r.T)
    return torch.stack(outs_a), torch.stack(outs_b), torch.stack(maps_a), torch.stack(maps_b)


def test_registered_by_catalog_name():
    spec = attnzoo.get_spec("co_attention")
    assert spec.cls is CoAttention and spec.family == "non_local" and spec.paper.venue == "CVPR 2019"
    module = CoAttention(8)
    assert module.form == "vanilla" and module.weight.bias is None  # W: a Linear without bias
    assert module.gate.bias is not None  # the paper's gate has b_f


@pytest.mark.parametrize("form", ["vanilla", "symmetric", "channel"])
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_matches_float64_reference(form, variant):
    module = build(form=form, variant=variant)
    x, y = inputs()
    (out_a, out_b), maps = module(x, y, return_both=True, return_attn=True)
    ref_a, ref_b, map_a, map_b = reference(module, x, y)
    torch.testing.assert_close(out_a, ref_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_b, ref_b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["x"].double(), map_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(maps["y"].double(), map_b, rtol=1e-10, atol=1e-12)
    # the fused path (no maps) and the single-output call agree
    torch.testing.assert_close(module(x, y), out_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module(x, y, return_both=True)[1], out_b, rtol=1e-12, atol=1e-12)


def test_each_position_of_x_reads_a_softmax_over_y():
    module = build()
    x, y = inputs()
    _, maps = module(x, y, return_attn=True)
    assert maps.shape == (B, HA * WA, HB * WB)
    assert (maps >= 0).all() and (maps <= 1).all()
    torch.testing.assert_close(maps.sum(-1), torch.ones(B, HA * WA, dtype=maps.dtype))


@pytest.mark.parametrize("form", ["symmetric", "channel"])
def test_symmetric_forms_are_symmetric_in_the_two_inputs(form):
    module = build(form=form)
    x, y = inputs()
    out_a, out_b = module(x, y, return_both=True)
    swapped_b, swapped_a = module(y, x, return_both=True)
    torch.testing.assert_close(out_a, swapped_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_b, swapped_b, rtol=1e-12, atol=1e-12)
    w = matrix_w(module)
    torch.testing.assert_close(w, w.T)


def test_vanilla_second_branch_uses_w_transposed():
    """With a non-symmetric W, branch b is not branch a with the inputs swapped."""
    module = build()
    x, y = inputs()
    _, out_b = module(x, y, return_both=True)
    assert not torch.allclose(out_b, module(y, x), atol=1e-6)
    torch.testing.assert_close(out_b, reference(module, x, y)[1], rtol=1e-10, atol=1e-10)


def test_official_double_softmax_flattens_the_weights():
    x, y = inputs(scale=3.0)
    paper, official = build(), build(variant="official")
    official.load_state_dict(paper.state_dict(), strict=False)  # the same W; gate bias and fuse_y extra
    paper_maps = paper(x, y, return_attn=True)[1]
    official_maps = official(x, y, return_attn=True)[1]
    uniform = 1.0 / (HB * WB)
    assert (official_maps - uniform).abs().max() < (paper_maps - uniform).abs().max() / 3
    assert official.gate.bias is None and official.fuse_y is not None


def test_gate_scales_the_attended_features():
    module = build()
    x, y = inputs()
    with torch.no_grad():
        module.gate.weight.zero_()
        module.gate.bias.fill_(-1e4)  # the gate closes: only V_a reaches the fusion
    expected = fusion(module.fuse, torch.zeros_like(x), x)
    torch.testing.assert_close(module(x, y), expected, rtol=1e-12, atol=1e-12)


def test_large_features_stay_finite():
    module = build(form="symmetric").float()
    x, y = (t.float() for t in inputs(scale=1e3))
    for kwargs in ({}, {"return_attn": True}):
        result = module(x, y, return_both=True, **kwargs)
        outs = result[0] if kwargs else result
        assert all(torch.isfinite(o).all() for o in outs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="form"):
        CoAttention(8, form="diagonal")
    with pytest.raises(ValueError, match="variant"):
        CoAttention(8, variant="cosnet")
