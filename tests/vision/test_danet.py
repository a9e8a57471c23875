"""danet: PAM and CAM in float64 from the paper's equations, the official CAM variant, zero gates,
branches alone and together, any H x W, and PAM's fused path (values wider than queries)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.danet import ChannelAttentionModule, DualAttention, PositionAttentionModule

F64 = torch.float64


perturbed = partial(randomize_, scale=0.3, shift=True)  # no normalisation or dropout: mode-free


def pam_reference(pam: PositionAttentionModule, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s_ji = exp(B_i . C_j) / sum_i exp(B_i . C_j); E_j = alpha sum_i s_ji D_i + A_j (eq. 1-2)."""
    b, c, h, w = a.shape
    cols = a.reshape(b, c, h * w)
    query = torch.einsum("oc,bcn->bno", pam.query.weight, cols) + pam.query.bias  # C_j
    key = torch.einsum("oc,bcn->bno", pam.key.weight, cols)  # B_i
    value = torch.einsum("oc,bcn->bno", pam.value.weight, cols) + pam.value.bias  # D_i
    n = h * w
    s = torch.empty(b, n, n, dtype=a.dtype)
    for j in range(n):
        e = torch.exp(torch.einsum("bd,bid->bi", query[:, j], key))  # no scaling
        s[:, j] = e / e.sum(-1, keepdim=True)
    e_out = torch.einsum("bji,bic->bcj", s, value)
    return pam.alpha * e_out.reshape(a.shape) + a, s


def cam_reference(cam: ChannelAttentionModule, a: torch.Tensor, official: bool = False):
    """x_ji = exp(A_i . A_j) / sum_i exp(A_i . A_j); E_j = beta sum_i x_ji A_i + A_j (eq. 3-4)."""
    b, c = a.shape[:2]
    cols = a.reshape(b, c, -1)
    energy = torch.einsum("bjn,bin->bji", cols, cols)
    if official:
        energy = energy.amax(-1, keepdim=True) - energy  # the official code's "max minus energy"
    e = torch.exp(energy - energy.amax(-1, keepdim=True))
    x = e / e.sum(-1, keepdim=True)
    e_out = torch.einsum("bji,bin->bjn", x, cols)
    return cam.beta * e_out.reshape(a.shape) + a, x


@pytest.mark.parametrize("cam_variant", ["paper", "official"])
def test_matches_paper_equations(cam_variant: str) -> None:
    torch.manual_seed(0)
    module = perturbed(DualAttention(32, cam_variant=cam_variant, dtype=F64))
    a = torch.randn(2, 32, 5, 7, dtype=F64) / 4
    pam_out, s = pam_reference(module.pam, a)
    cam_out, x = cam_reference(module.cam, a, official=cam_variant == "official")
    with torch.no_grad():
        fused = module(a)
        explicit, maps = module(a, return_attn=True)
    expected = pam_out + cam_out  # fused by element-wise sum
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit, expected, rtol=1e-10, atol=1e-10)
    assert set(maps) == {"position", "channel"}
    torch.testing.assert_close(maps["position"], s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["channel"], x, rtol=1e-10, atol=1e-10)
    assert maps["position"].shape == (2, 35, 35) and maps["channel"].shape == (2, 32, 32)
    for m in maps.values():
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1], dtype=F64))


def test_official_cam_attends_to_the_least_similar_channels() -> None:
    torch.manual_seed(1)
    a = torch.randn(1, 8, 6, 6, dtype=F64)
    paper = ChannelAttentionModule(8, dtype=F64)
    official = ChannelAttentionModule(8, variant="official", dtype=F64)
    _, paper_map = paper(a, return_attn=True)
    _, official_map = official(a, return_attn=True)
    energy = torch.einsum("bjn,bin->bji", a.flatten(2), a.flatten(2))
    # softmax(max - E) = softmax(-E): the official map peaks where the energy is lowest
    assert torch.equal(official_map.argmax(-1), energy.argmin(-1))
    assert torch.equal(paper_map.argmax(-1), energy.argmax(-1))
    torch.testing.assert_close(official_map, torch.softmax(-energy, -1), rtol=1e-10, atol=1e-10)


def test_gates_start_at_zero_and_branches_work_alone() -> None:
    x = torch.randn(2, 32, 6, 6)
    both = DualAttention(32)
    assert both.pam.alpha.item() == 0 and both.cam.beta.item() == 0
    torch.testing.assert_close(both(x), 2 * x, rtol=0, atol=0)  # PAM(x) + CAM(x) at init
    pam_only = DualAttention(32, branches=("position",))
    cam_only = DualAttention(32, branches="channel")
    assert pam_only.cam is None and cam_only.pam is None
    torch.testing.assert_close(pam_only(x), x, rtol=0, atol=0)
    torch.testing.assert_close(cam_only(x), x, rtol=0, atol=0)
    assert set(pam_only(x, return_attn=True)[1]) == {"position"}
    assert set(cam_only(x, return_attn=True)[1]) == {"channel"}
    assert sum(p.numel() for p in cam_only.parameters()) == 1  # CAM has only beta
    for bad in ((), ("position", "position"), ("spatial",)):
        with pytest.raises(ValueError, match="branches"):
            DualAttention(32, branches=bad)
    with pytest.raises(ValueError, match="cam_variant"):
        DualAttention(32, cam_variant="max")


def test_widths_and_no_fixed_size() -> None:
    module = attnzoo.create("danet", 64)
    assert module.pam.query.out_features == 8 and module.pam.key.out_features == 8  # C/8
    assert module.pam.value.out_features == 64
    assert module.pam.key.bias is None  # q_j . b_k is constant over keys: the softmax cancels it
    perturbed(module)
    for side in ((5, 9), (13, 7), (1, 1)):
        x = torch.randn(1, 64, *side)
        assert module(x).shape == x.shape


def test_no_n_by_n_matrix_without_maps() -> None:
    # PAM's values (C) are wider than its queries and keys (C/8): the fused kernel needs equal
    # widths and would otherwise fall back silently to the N x N math path
    module = perturbed(DualAttention(32))
    x = torch.randn(1, 32, 16, 16)
    n = 256
    with torch.no_grad(), OpRecorder() as recorder:
        module(x)
    names = [name for name, _ in recorder.sizes]
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in names
    big = [(name, sizes) for name, sizes in recorder.sizes if any(s >= n * n for s in sizes)]
    assert not big, f"an N x N-sized tensor was formed: {big}"


def test_large_energies() -> None:
    # bfloat16 against float32: the conformance suite's test_dtypes_agree_with_float32
    torch.manual_seed(2)
    module = perturbed(DualAttention(16))
    # CAM's energies are sums over all N positions: ~ N * var on the diagonal
    x = 4 * torch.randn(2, 16, 24, 24)
    with torch.no_grad():
        out = module(x)
        explicit = module(x, return_attn=True)[0]
        expected = module.double()(x.double())
    assert torch.isfinite(out).all()
    assert ((out.double() - expected).norm() / expected.norm()) < 1e-5
    assert ((explicit.double() - expected).norm() / expected.norm()) < 1e-5
