"""dgmn: dynamic message passing in float64 with hand-written bilinear sampling (loops over
positions and taps), zero offsets = a dilated unfold, the official fourth-branch affinity slip,
gamma, and memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.dgmn import DynamicGraphMessagePassing

pytestmark = pytest.mark.usefixtures("float64_default")


def bilinear(img, y, x):
    """img (C, H, W) at the real point (y, x); corners outside the map count as zero."""
    h, w = img.shape[1:]
    y0, x0 = math.floor(y), math.floor(x)
    out = torch.zeros(img.shape[0])
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def dgmn_reference(m, x, official=False):
    """out = x + sum_d gamma_d m_d; m_d(p)_c = sum_k f_g(c),k(p) softmax_k(a(p)) x_c(p + d k + Delta_k(p))."""
    b, c, h, w = x.shape
    g = m.groups
    out = x.clone()
    maps = {}
    for index, rate in enumerate(m.rates):
        d = rate.dilation
        offsets = F.conv2d(x, rate.offset.weight, padding=d, dilation=d)
        aff = torch.empty(b, h, w, 9)
        for n in range(b):
            for py in range(h):
                for px in range(w):
                    samples = []
                    for k in range(9):
                        i, j = k // 3 - 1, k % 3 - 1
                        sy = py + d * i + offsets[n, 2 * k, py, px].item()
                        sx = px + d * j + offsets[n, 2 * k + 1, py, px].item()
                        samples.append(bilinear(x[n], sy, sx))
                    s = torch.stack(samples, 1)  # (C, 9)
                    kw = rate.kernel.weight.reshape(-1, c, 9)  # (G*9 + 9, C, 9)
                    logits = torch.einsum("ock,ck->o", kw, s)
                    filters = logits[: 9 * g].view(g, 9)
                    a = logits[9 * g - 9 : 9 * g] if (official and index == 3) else logits[9 * g :]
                    a = torch.exp(a - a.max())
                    a = a / a.sum()
                    aff[n, py, px] = a
                    for ch in range(c):
                        grp = ch // (c // g)
                        out[n, ch, py, px] += rate.gamma[0] * (filters[grp] * a * s[ch]).sum()
        maps[f"dilation_{d}"] = aff
    return out, maps


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_matches_paper(variant):
    torch.manual_seed(0)
    module = randomize_(DynamicGraphMessagePassing(8, groups=2, dilations=(1, 2, 3, 1), variant=variant))
    x = torch.randn(1, 8, 4, 5)
    expected, maps = dgmn_reference(module, x, official=variant == "official")
    out, got = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    for key, aff in maps.items():
        torch.testing.assert_close(got[key], aff, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[key].sum(-1), torch.ones(1, 4, 5))


def test_zero_offsets_sample_a_dilated_grid():
    # at init the offsets are zero: the samples are exactly a zero-padded dilated 3x3 unfold
    from attnzoo.functional.global_reasoning import deformed_tap

    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 7)
    offsets = torch.zeros(2, 18, 9, 7)
    for d in (1, 4):
        unfolded = F.unfold(x, 3, dilation=d, padding=d).view(2, 3, 9, 9, 7)
        for k in range(9):
            torch.testing.assert_close(deformed_tap(x, offsets, d, k), unfolded[:, :, k])
    # a half-pixel offset interpolates between neighbours
    offsets[:, 9] = 0.5  # tap 4 (the centre), dx
    torch.testing.assert_close(deformed_tap(x, offsets, 1, 4)[..., :-1], (x[..., :-1] + x[..., 1:]) / 2)


def test_forward_mode_sampling_is_grid_sample():
    """Under forward-mode AD (grid_sample has no forward derivative) the taps are sampled by
    gathering the four corners: the same samples as grid_sample at points inside, across the
    border and outside the map, with the same derivatives in the map and the coordinates."""
    from torch.autograd import forward_ad

    from attnzoo.functional.global_reasoning import _bilinear_samples

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5, 7, generator=generator, dtype=torch.float64)
    # pixel coordinates from two pixels outside the map to two beyond it
    y = torch.rand(2, 4, 6, generator=generator, dtype=torch.float64) * 9 - 2
    xx = torch.rand(2, 4, 6, generator=generator, dtype=torch.float64) * 11 - 2

    def grid_sampled(x, y, xx):
        grid = torch.stack([(2 * xx + 1) / 7 - 1, (2 * y + 1) / 5 - 1], dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    torch.testing.assert_close(_bilinear_samples(x, y, xx), grid_sampled(x, y, xx), rtol=1e-12, atol=1e-12)
    tangents = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (x, y, xx)]
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(t, u) for t, u in zip((x, y, xx), tangents)]
        derivative = forward_ad.unpack_dual(_bilinear_samples(*duals)).tangent
    leaves = [t.clone().requires_grad_() for t in (x, y, xx)]
    w = torch.randn(2, 3, 4, 6, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad((grid_sampled(*leaves) * w).sum(), leaves)
    # the dot-product test against grid_sample's reverse mode: w^T (J u) = (J^T w)^T u
    torch.testing.assert_close((derivative * w).sum(), sum((g * u).sum() for g, u in zip(grads, tangents)))


def test_fourth_branch_reads_its_own_affinity_channels():
    # the official code slices branch 4's affinity from its filter logits: its own 9 affinity
    # channels then change nothing. Here they must matter; in the official variant they must not.
    torch.manual_seed(2)
    paper = randomize_(DynamicGraphMessagePassing(8, groups=2))
    official = DynamicGraphMessagePassing(8, groups=2, variant="official")
    official.load_state_dict(paper.state_dict())
    x = torch.randn(1, 8, 6, 6)
    before_paper, before_official = paper(x), official(x)
    for module in (paper, official):
        with torch.no_grad():
            module.rates[3].kernel.weight[-9:] += torch.randn(9, 8, 3, 3)  # branch 4's affinity rows
    assert (paper(x) - before_paper).abs().max() > 1e-3
    torch.testing.assert_close(official(x), before_official)
    # the first three branches are the same in both variants
    _, maps_p = paper(x, return_attn=True)
    _, maps_o = official(x, return_attn=True)
    for d in (1, 4, 8):
        torch.testing.assert_close(maps_p[f"dilation_{d}"], maps_o[f"dilation_{d}"])
    assert not torch.allclose(maps_p["dilation_12"], maps_o["dilation_12"])


def test_pruning_a_deformable_kernel_takes_effect_on_every_call():
    """``prune.l1_unstructured`` on a rate's deformable kernel recomputes ``weight`` from
    ``weight_orig * mask`` in a forward pre-hook: an in-place change of ``weight_orig`` must change
    the output as a plain module with that masked weight would (bug: the kernel's weight was read
    straight into the tap convolutions, its pre-hook never ran, and the pruned module computed
    with the weight left from pruning time)."""
    from torch.nn.utils import prune

    torch.manual_seed(4)
    pruned = randomize_(DynamicGraphMessagePassing(8, groups=2))
    plain = DynamicGraphMessagePassing(8, groups=2)
    plain.load_state_dict(pruned.state_dict())
    prune.l1_unstructured(pruned.rates[1].kernel, "weight", amount=0.5)
    kernel = pruned.rates[1].kernel
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        before = pruned(x)
        kernel.weight_orig.mul_(-2.0)
        out = pruned(x)
        plain.rates[1].kernel.weight.copy_(kernel.weight_orig * kernel.weight_mask)
    torch.testing.assert_close(out, plain(x).detach())
    assert not torch.allclose(out, before)


def test_defaults_gamma_and_offsets():
    module = DynamicGraphMessagePassing(64)
    assert module.groups == 4 and module.dilations == (1, 4, 8, 12)
    assert all(rate.gamma.item() == 1.0 for rate in module.rates)  # official: not zero-init
    assert all((rate.offset.weight == 0).all() for rate in module.rates)
    assert module.rates[2].offset.dilation == (8, 8) and module.rates[2].kernel.out_channels == 4 * 9 + 9
    with torch.no_grad():
        for rate in module.rates:
            rate.gamma.zero_()
    x = torch.randn(1, 64, 5, 5)
    assert torch.equal(module(x), x)


def test_memory_linear_no_unfold():
    module = DynamicGraphMessagePassing(32).float().eval()
    x = torch.randn(1, 32, 24, 24, dtype=torch.float32)
    with torch.no_grad(), OpRecorder() as rec:
        module(x)
    # nothing 9x the input (an unfold of the neighbourhood), let alone N x N
    assert rec.largest_storage < 9 * x.numel()
    assert not rec.ran("im2col")


def test_registered_and_errors():
    spec = attnzoo.get_spec("dgmn")
    assert spec.family == "non_local" and spec.placement == "head" and spec.map_kind == "mixed"
    with pytest.raises(ValueError, match="groups"):
        DynamicGraphMessagePassing(10, groups=4)
    with pytest.raises(ValueError, match="dilations"):
        DynamicGraphMessagePassing(8, dilations=(0,))
    with pytest.raises(ValueError, match="variant"):
        DynamicGraphMessagePassing(8, variant="mine")
