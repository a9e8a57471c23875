"""dnl: the disentangled attention in float64 (whitened pairwise + unary), what whitening does
and does not change, temperature / official settings, identity at init and the fused path."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.dnl import DisentangledNonLocal

F64 = torch.float64


def perturbed(module: DisentangledNonLocal, seed: int = 0) -> DisentangledNonLocal:
    return randomize_(module, seed=seed, scale=0.3, shift=True, norm_statistics=True).eval()


def softmax_loop(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def reference(module: DisentangledNonLocal, x: torch.Tensor, whiten_keys: bool = True):
    """omega_ij = softmax_j(s (q_i - mu_q).(k_j - mu_k) / tau) + softmax_j(W_m x_j); y, BN, residual."""
    b, c = x.shape[:2]
    cols = x.reshape(b, c, -1)
    q = torch.einsum("oc,bcn->bno", module.theta.weight, cols)  # (B, N, C')
    k = torch.einsum("oc,bcn->bno", module.phi.weight, cols)
    g = torch.einsum("oc,bcn->bno", module.g.weight, cols) + module.g.bias
    mu_q = q.mean(dim=1, keepdim=True)
    mu_k = k.mean(dim=1, keepdim=True) if whiten_keys else torch.zeros_like(mu_q)
    s = q.shape[-1] ** -0.5 if module.use_scale else 1.0
    pairwise = softmax_loop(s * torch.einsum("bid,bjd->bij", q - mu_q, k - mu_k) / module.temperature)
    unary = softmax_loop(torch.einsum("c,bcn->bn", module.unary.weight[0], cols))  # (B, N)
    omega = pairwise + unary[:, None, :]
    y = torch.einsum("bij,bjd->bid", omega, g)
    z = torch.einsum("cd,bnd->bcn", module.w_z.weight, y)
    bn = module.norm
    z = (z - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
    z = z * bn.weight[:, None] + bn.bias[:, None]
    return x + z.reshape(x.shape), pairwise, unary


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("shape", [(2, 16, 6, 5), (2, 16, 9), (2, 16, 2, 3, 3)])
def test_matches_paper_equations(variant: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    module = perturbed(DisentangledNonLocal(16, variant=variant, dtype=F64))
    x = torch.randn(shape, dtype=F64)
    expected, pairwise, unary = reference(module, x)
    with torch.no_grad():
        fused = module(x)
        explicit, maps = module(x, return_attn=True)
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["pairwise"], pairwise, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["unary"], unary, rtol=1e-10, atol=1e-10)


def test_whitening_key_mean_cancels_but_query_mean_does_not() -> None:
    torch.manual_seed(1)
    module = perturbed(DisentangledNonLocal(16, dtype=F64))
    x = torch.randn(2, 16, 5, 5, dtype=F64) + 2.0  # a large common component: means matter
    _, maps = module(x, return_attn=True)
    _, without_key_mean, _ = reference(module, x, whiten_keys=False)
    # -q_i . mu_k is constant over j: the softmax over keys removes it
    torch.testing.assert_close(maps["pairwise"], without_key_mean, rtol=1e-10, atol=1e-10)
    # mu_q . k_j varies with j: subtracting mu_q is what separates the unary part
    cols = x.reshape(2, 16, -1)
    q = torch.einsum("oc,bcn->bno", module.theta.weight, cols)
    k = torch.einsum("oc,bcn->bno", module.phi.weight, cols)
    plain = softmax_loop(torch.einsum("bid,bjd->bij", q, k))
    assert (plain - maps["pairwise"]).abs().max() > 1e-3


def test_maps_are_distributions_and_unary_is_shared_by_all_queries() -> None:
    torch.manual_seed(2)
    module = perturbed(DisentangledNonLocal(16))
    _, maps = module(torch.randn(2, 16, 6, 6), return_attn=True)
    assert maps["pairwise"].shape == (2, 36, 36) and maps["unary"].shape == (2, 36)
    for m in maps.values():
        assert m.min() >= 0 and m.max() <= 1
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))


def test_defaults_official_settings_and_temperature() -> None:
    paper = attnzoo.create("dnl", 64)
    assert paper.inner == 32 and paper.temperature == 1.0 and not paper.use_scale
    # biases that whitening (theta, phi) or the softmax over positions (W_m) would cancel
    assert paper.theta.bias is None and paper.phi.bias is None and paper.unary.bias is None
    official = DisentangledNonLocal(64, variant="official")
    assert official.temperature == 0.05 and official.use_scale
    assert DisentangledNonLocal(64, variant="official", temperature=0.5).temperature == 0.5
    torch.manual_seed(3)
    sharp = perturbed(DisentangledNonLocal(16, temperature=0.1))
    soft = DisentangledNonLocal(16).eval()
    soft.load_state_dict(sharp.state_dict())
    x = torch.randn(1, 16, 5, 5)

    def entropy(m: DisentangledNonLocal) -> torch.Tensor:
        weights = m(x, return_attn=True)[1]["pairwise"]
        return -(weights * weights.clamp_min(1e-30).log()).sum(-1).mean()

    assert entropy(sharp) < entropy(soft)  # a lower temperature sharpens the pairwise weights
    with pytest.raises(ValueError, match="temperature"):
        DisentangledNonLocal(16, temperature=0.0)
    with pytest.raises(ValueError, match="variant"):
        DisentangledNonLocal(16, variant="mmseg")


def test_block_starts_as_identity() -> None:
    module = DisentangledNonLocal(16)
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(module.train()(x), x, rtol=0, atol=0)
    torch.testing.assert_close(module.eval()(x), x, rtol=0, atol=0)


def test_no_n_by_n_matrix_without_maps() -> None:
    module = perturbed(DisentangledNonLocal(16))
    x = torch.randn(1, 16, 16, 16)
    n = 256
    with torch.no_grad(), OpRecorder() as recorder:
        module(x)
    names = [name for name, _ in recorder.sizes]
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in names
    big = [(name, sizes) for name, sizes in recorder.sizes if any(s >= n * n for s in sizes)]
    assert not big, f"an N x N-sized tensor was formed: {big}"


def test_large_logits_low_temperature_and_bfloat16() -> None:
    torch.manual_seed(4)
    module = perturbed(DisentangledNonLocal(16, variant="official"))  # tau = 0.05
    x = 10 * torch.randn(2, 16, 8, 8)
    small = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        fused = module(x)
        explicit = module(x, return_attn=True)[0]
        expected = module.double()(x.double())
        expected_small = module(small.double())
        module.bfloat16()
        half = module(small.bfloat16())
    assert torch.isfinite(fused).all()
    assert ((fused.double() - expected).norm() / expected.norm()) < 1e-5
    assert ((explicit.double() - expected).norm() / expected.norm()) < 1e-5
    assert half.dtype == torch.bfloat16
    assert ((half.double() - expected_small).norm() / expected_small.norm()) < 3e-2
