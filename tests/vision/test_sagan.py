"""sagan: the paper's equations in float64 (paper and official variants), gamma = 0 at init, the
fused path without the N x N matrix, and the spectral-norm option."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.sagan import SAGANAttention

F64 = torch.float64


perturbed = partial(randomize_, scale=0.3, shift=True)  # no normalisation or dropout: mode-free


def pool2x2(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Max over 2x2 blocks of (B, D, H*W) columns on an H x W grid (floor), back to columns."""
    b, d = t.shape[:2]
    grid = t.reshape(b, d, h, w)[:, :, : h // 2 * 2, : w // 2 * 2]
    blocks = grid.reshape(b, d, h // 2, 2, w // 2, 2)
    return blocks.amax(dim=(3, 5)).reshape(b, d, -1)


def reference(module: SAGANAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Section 3: s_ij = f(x_i)^T g(x_j), beta_{j,i} = softmax over i, o_j = v(sum_i beta h(x_i))."""
    b, c, h, w = x.shape
    cols = x.reshape(b, c, h * w)  # x_i as columns

    def w_of(layer: torch.nn.Linear, t: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bcn->bon", layer.weight, t)

    f, g, hh = w_of(module.f, cols), w_of(module.g, cols), w_of(module.h, cols)
    if module.subsample:
        f, hh = pool2x2(f, h, w), pool2x2(hh, h, w)
    n, n_keys = g.shape[-1], f.shape[-1]
    beta = torch.empty(b, n, n_keys, dtype=x.dtype)
    o_inner = torch.empty(b, hh.shape[1], n, dtype=x.dtype)
    for bi in range(b):
        for j in range(n):
            s = torch.stack([f[bi, :, i] @ g[bi, :, j] for i in range(n_keys)])  # no 1/sqrt(d)
            e = torch.exp(s)
            beta[bi, j] = e / e.sum()
            o_inner[bi, :, j] = (beta[bi, j][None, :] * hh[bi]).sum(-1)
    o = w_of(module.v, o_inner)
    return x + module.gamma * o.reshape(x.shape), beta


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_matches_paper_equations(variant: str) -> None:
    torch.manual_seed(0)
    module = perturbed(SAGANAttention(32, variant=variant, dtype=F64))
    x = torch.randn(2, 32, 6, 5, dtype=F64)
    expected, expected_beta = reference(module, x)
    with torch.no_grad():
        fused = module(x)
        explicit, beta = module(x, return_attn=True)
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(beta, expected_beta, rtol=1e-10, atol=1e-10)
    assert beta.min() >= 0
    torch.testing.assert_close(beta.sum(-1), torch.ones(2, 30, dtype=F64))  # normalised over i


def test_widths_and_variants() -> None:
    paper = attnzoo.create("sagan", 64)
    assert (paper.f.out_features, paper.g.out_features, paper.h.out_features) == (8, 8, 8)  # C/8
    assert paper.v.out_features == 64 and not paper.subsample
    assert all(layer.bias is None for layer in (paper.f, paper.g, paper.h, paper.v))
    official = SAGANAttention(64, variant="official")
    assert official.h.out_features == 32 and official.subsample  # h to C/2, pooled keys/values
    _, beta = official(torch.randn(1, 64, 8, 6), return_attn=True)
    assert beta.shape == (1, 48, 12)
    assert SAGANAttention(64, variant="official", subsample=False).subsample is False
    assert SAGANAttention(4).f.out_features == 1  # never a zero-width bottleneck


def test_gamma_is_a_zero_scalar_so_the_block_starts_as_identity() -> None:
    module = SAGANAttention(32)
    assert module.gamma.shape == () and module.gamma.item() == 0
    x = torch.randn(2, 32, 7, 7)
    torch.testing.assert_close(module(x), x, rtol=0, atol=0)
    with torch.no_grad():
        module.gamma.fill_(1.0)
    assert not torch.allclose(module(x), x)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_no_n_by_n_matrix_without_maps(variant: str) -> None:
    # official: queries/keys C/8 wide, values C/2: the fused kernel still runs (zero padding)
    module = perturbed(SAGANAttention(32, variant=variant))
    x = torch.randn(1, 32, 16, 16)
    n = 256
    with torch.no_grad(), OpRecorder() as recorder:
        module(x)
    names = [name for name, _ in recorder.sizes]
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in names
    big = [(name, sizes) for name, sizes in recorder.sizes if any(s >= n * n // 4 for s in sizes)]
    assert not big, f"an N x N'-sized tensor was formed: {big}"
    assert not any("softmax" in name or "bmm" in name for name in names)


def test_large_logits() -> None:
    # bfloat16 against float32: the conformance suite's test_dtypes_agree_with_float32
    torch.manual_seed(1)
    module = perturbed(SAGANAttention(32))
    x = 20 * torch.randn(2, 32, 8, 8)  # logits in the thousands
    with torch.no_grad():
        fused = module(x)
        explicit, beta = module(x, return_attn=True)
        expected = module.double()(x.double())
    assert torch.isfinite(fused).all() and torch.isfinite(beta).all()
    assert ((fused.double() - expected).norm() / expected.norm()) < 1e-5
    assert ((explicit.double() - expected).norm() / expected.norm()) < 1e-5


def test_spectral_norm_option() -> None:
    torch.manual_seed(2)
    module = SAGANAttention(32, spectral_norm=True)
    with torch.no_grad():
        module.gamma.fill_(0.5)
    module.train()
    x = torch.randn(2, 32, 6, 6)
    for _ in range(30):  # power iterations run in training mode
        module(x)
    module.eval()
    for layer in (module.f, module.g, module.h, module.v):
        top = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
        assert abs(top.item() - 1.0) < 1e-3  # W / sigma(W)
    expected = module(x)
    # survives torch.compile and torch.export (eval); state_dict round-trips
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    program = torch.export.export(module, (x,))
    torch.testing.assert_close(program.module()(x), expected)
    clone = SAGANAttention(32, spectral_norm=True)
    clone.load_state_dict(module.state_dict())
    torch.testing.assert_close(clone.eval()(x), expected)
    assert not hasattr(attnzoo.create("sagan", 32).f, "parametrizations")  # off by default


def test_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="variant"):
        SAGANAttention(32, variant="biggan")
    module = SAGANAttention(32, variant="official")
    with pytest.raises(ValueError, match="at least"):  # the official max-pool needs two rows
        module(torch.randn(1, 32, 1, 9))
