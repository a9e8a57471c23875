"""linformer: a float64 reference from eq. 7 for every sharing mode, shorter inputs, key padding,
the official (fairseq) order, and linear cost."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.bench import count_flops
from attnzoo.sequence.linformer import Linformer, LinformerProjection
from attnzoo.sequence.mha import MultiheadAttention
from attnzoo.testing import randomize_

B, N, E, H, K = 2, 12, 16, 4, 5
SHARINGS = ["none", "headwise", "kv", "layerwise"]


def perturbed(seed: int = 0, **kwargs) -> Linformer:
    torch.manual_seed(seed)
    kwargs = {"proj_dim": K, **kwargs}
    module = Linformer(E, H, N, dtype=torch.float64, **kwargs)
    randomize_(module, seed=seed, scale=0.1, shift=True)  # zero biases would hide where the bias enters
    return module.eval()


def sequence(length: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, length, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def projections(module: Linformer) -> tuple[torch.Tensor, torch.Tensor]:
    """E_i and F_i as (h, k, n) for every sharing mode."""
    e = module.proj_k.weight
    f = (module.proj_v if module.proj_v is not None else module.proj_k).weight
    return e.expand(H, K, N), f.expand(H, K, N)


def reference(module: Linformer, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """head_i = softmax(Q W_i^Q (E_i K W_i^K)^T / sqrt(d)) F_i V W_i^V, with E_i[:, :m] for length m."""
    m, d = x.shape[1], E // H
    e, f = projections(module)
    e, f = e[..., :m], f[..., :m]
    wq, wk, wv = (p.weight.view(H, d, E) for p in (module.q_proj, module.k_proj, module.v_proj))
    bq, bk, bv = (p.bias.view(H, d) for p in (module.q_proj, module.k_proj, module.v_proj))
    q = torch.einsum("bnc,hdc->bhnd", x, wq) + bq[:, None]
    k = torch.einsum("bnc,hdc->bhnd", x, wk) + bk[:, None]
    v = torch.einsum("bnc,hdc->bhnd", x, wv) + bv[:, None]
    if keep is not None:  # padded rows of K W^K and V W^V are zero
        k, v = k * keep[:, None, :, None], v * keep[:, None, :, None]
    k_bar = torch.einsum("hkn,bhnd->bhkd", e, k)
    v_bar = torch.einsum("hkn,bhnd->bhkd", f, v)
    p_bar = torch.softmax(torch.einsum("bhnd,bhkd->bhnk", q, k_bar) / math.sqrt(d), dim=-1)
    heads = torch.einsum("bhnk,bhkd->bnhd", p_bar, v_bar).reshape(x.shape[0], m, E)
    return heads @ module.out_proj.weight.T + module.out_proj.bias


def test_registered_under_its_catalog_name():
    assert attnzoo.get_spec("linformer").cls is Linformer


@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("length", [N, 7])  # full length, and shorter: the first columns
def test_matches_equation_7_in_every_sharing_mode(sharing, length):
    module = perturbed(sharing=sharing)
    x = sequence(length)
    torch.testing.assert_close(module(x), reference(module, x), rtol=1e-10, atol=1e-10)


def test_sharing_modes_own_the_right_projections():
    sizes = {
        s: sorted(p.numel() for n, p in perturbed(sharing=s).named_parameters() if "proj_" in n[:6])
        for s in SHARINGS
    }
    assert sizes["none"] == [H * K * N, H * K * N]  # E_i and F_i per head
    assert sizes["headwise"] == [K * N, K * N]  # one E, one F
    assert sizes["kv"] == [K * N]  # E = F
    assert sizes["layerwise"] == [K * N]
    # the default k is n / 4
    assert Linformer(E, H, 64).proj_dim == 16 and Linformer(E, H, 3).proj_dim == 1


def test_layerwise_sharing_uses_one_projection_across_layers():
    first = Linformer(E, H, N, K, sharing="layerwise")
    second = Linformer(E, H, N, K, sharing="layerwise", shared_projection=first.shared_projection)
    assert second.proj_k is first.proj_k
    stack = nn.Sequential(first, second)
    projection_params = [p for p in stack.parameters() if p is first.proj_k.weight]
    assert len(projection_params) == 1  # counted once
    x = torch.randn(B, N, E)
    stack(x).square().sum().backward()
    # the gradient of the shared E collects both layers' contributions
    grad_both = first.proj_k.weight.grad.clone()
    first.proj_k.weight.grad = None
    with torch.no_grad():
        y = first(x)
    second(y).square().sum().backward()
    assert not torch.allclose(grad_both, first.proj_k.weight.grad)
    state = stack.state_dict()
    assert torch.equal(state["0.proj_k.weight"], state["1.proj_k.weight"])
    with pytest.raises(ValueError, match="shared_projection"):
        Linformer(E, H, N, K, sharing="layerwise", shared_projection=LinformerProjection(N + 1, K))
    with pytest.raises(ValueError, match="layerwise"):
        Linformer(E, H, N, K, sharing="kv", shared_projection=first.shared_projection)


@pytest.mark.parametrize("sharing", ["none", "kv"])
def test_key_padding_at_the_end_equals_the_unpadded_sequence(sharing):
    module = perturbed(sharing=sharing)
    x = sequence()
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, 8:] = False
    keep[1, 4:] = False
    padded = module(x, key_mask=keep)
    torch.testing.assert_close(padded, reference(module, x, keep.double()), rtol=1e-10, atol=1e-10)
    for b, length in ((0, 8), (1, 4)):
        alone = module(x[b : b + 1, :length])
        torch.testing.assert_close(padded[b : b + 1, :length], alone, rtol=1e-10, atol=1e-10)
    # the padded positions' contents do not matter
    noisy = x.clone()
    noisy[~keep] = 1e3
    torch.testing.assert_close(module(noisy, key_mask=keep)[keep], padded[keep], rtol=1e-10, atol=1e-10)


def test_fully_padded_sample_gives_the_output_bias_not_nan():
    module = perturbed()
    x = sequence().requires_grad_()
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1] = False
    out = module(x, key_mask=keep)
    torch.testing.assert_close(out[1], module.out_proj.bias.expand(N, E), rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_longer_than_max_seq_len_is_a_clear_error():
    module = Linformer(E, H, N)
    with pytest.raises(ValueError, match=f"max_seq_len={N}"):
        module(torch.randn(B, N + 1, E))
    with pytest.raises(ValueError, match="max_seq_len"):
        module(torch.randn(B, 3, E), torch.randn(B, N + 2, E))


def test_maps_are_over_the_k_projected_keys():
    module = perturbed()
    x = sequence()
    out, maps = module(x, return_attn=True, average_heads=False)
    assert maps.shape == (B, H, N, K)  # n x k, never n x n
    torch.testing.assert_close(maps.sum(-1), torch.ones(B, H, N, dtype=torch.float64))
    assert (maps >= 0).all()
    torch.testing.assert_close(out, module(x), rtol=1e-12, atol=1e-12)
    assert module(x, return_attn=True)[1].shape == (B, N, K)


def test_official_order_compresses_the_inputs_first():
    module = perturbed(sharing="headwise", variant="official")
    x = sequence(9)
    e, f = module.proj_k.weight[0, :, :9], module.proj_v.weight[0, :, :9]
    k = (e @ x) @ module.k_proj.weight.T + module.k_proj.bias  # (B, k, E): bias after E
    v = (f @ x) @ module.v_proj.weight.T + module.v_proj.bias
    q = module.q_proj(x)
    d = E // H
    split = lambda t: t.view(B, -1, H, d).transpose(1, 2)  # noqa: E731
    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    expected = module.out_proj((a @ split(v)).transpose(1, 2).reshape(B, 9, E))
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    # with bias the two orders differ (E 1 b vs b); without bias they agree
    paper = perturbed(sharing="headwise")
    paper.load_state_dict(module.state_dict())
    assert not torch.allclose(paper(x), module(x))
    torch.manual_seed(0)
    official_nb = Linformer(E, H, N, K, sharing="kv", variant="official", bias=False, dtype=torch.float64)
    paper_nb = Linformer(E, H, N, K, sharing="kv", bias=False, dtype=torch.float64)
    paper_nb.load_state_dict(official_nb.state_dict())
    torch.testing.assert_close(official_nb(x), paper_nb(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="shared by the heads"):
        Linformer(E, H, N, variant="official")


def test_cost_is_linear_in_the_sequence_length():
    """FLOPs double with n at fixed k, where mha's quadruple (counted on the explicit path, whose
    matmuls the counter sees; the fused kernel does the same work)."""
    k, d, heads = 8, 16, 2

    def flops(module, n):
        x = torch.randn(1, n, d)
        with torch.no_grad():
            return count_flops(lambda: module(x, return_attn=True))

    linformer, mha = Linformer(d, heads, 1024, k), MultiheadAttention(d, heads)
    assert 1.9 < flops(linformer, 1024) / flops(linformer, 512) < 2.1
    assert flops(mha, 1024) / flops(mha, 512) > 3.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="sharing"):
        Linformer(E, H, N, sharing="all")
    with pytest.raises(ValueError, match="proj_dim"):
        Linformer(E, H, N, 0)
    with pytest.raises(ValueError, match="num_heads"):
        Linformer(E, 5, N)
    module = Linformer(E, H, N)
    with pytest.raises(TypeError, match="key_mask"):  # no additive key mask here
        module(torch.randn(B, N, E), key_mask=torch.ones(B, N))
