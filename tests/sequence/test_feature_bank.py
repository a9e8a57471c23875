"""feature_bank: FBO-NL (paper Fig. 3) written out in float64; FBO-Avg/Max; bank >> window."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.sequence.feature_bank import FeatureBankOperator
from attnzoo.testing import OpRecorder, randomize_

F64 = torch.float64


def randomised(module: FeatureBankOperator, seed: int = 0) -> FeatureBankOperator:
    return randomize_(module, seed=seed, scale=0.3).eval()


def linear(layer, x):
    return x @ layer.weight.T + layer.bias


def layer_norm(x, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def reference(module, x, bank):
    """S^(l) = S^(l-1) + W_out ReLU(LN(softmax(theta S phi(L)^T / sqrt(d)) g(L))) (eval: no dropout)."""
    d = module.inner_channels
    state = linear(module.in_proj, x)
    memory = linear(module.bank_proj, bank)
    maps = []
    for block in module.layers:
        logits = torch.einsum("bnd,bmd->bnm", linear(block.theta, state), linear(block.phi, memory)) / d**0.5
        weights = torch.softmax(logits, dim=-1)  # over the bank entries
        read = torch.einsum("bnm,bmd->bnd", weights, linear(block.g, memory))
        state = state + linear(block.out, torch.relu(layer_norm(read)))
        maps.append(weights)
    return state, torch.stack(maps, dim=1)


def test_fbo_nl_matches_paper_equations():
    module = randomised(FeatureBankOperator(12, bank_channels=20, inner_channels=16, dtype=F64))
    x = torch.randn(2, 3, 12, dtype=F64)
    bank = torch.randn(2, 40, 20, dtype=F64)  # a bank much longer than the window, another width
    expected, expected_maps = reference(module, x, bank)
    out, maps = module(x, bank, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x, bank), expected, rtol=1e-10, atol=1e-10)  # fused path
    assert maps.shape == (2, 2, 3, 40)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 3, dtype=F64))


def test_defaults_and_identity_at_init():
    module = FeatureBankOperator(2048)
    assert (module.inner_channels, module.num_layers, module.mode) == (512, 2, "nl")
    assert module.in_dropout.p == module.bank_dropout.p == module.layers[0].dropout.p == 0.2
    assert module.layers[0].norm.elementwise_affine is False
    # zero-initialised output layers: each block starts as the identity, FBO(S, L) = W_s S
    small = FeatureBankOperator(8, inner_channels=8).eval()
    x, bank = torch.randn(2, 4, 8), torch.randn(2, 30, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x, bank), small.in_proj(x))


def test_pooling_variants():
    x, bank = torch.randn(2, 3, 8), torch.randn(2, 50, 6)
    avg = attnzoo.create("feature_bank", 8, 6, mode="avg")
    mx = FeatureBankOperator(8, 6, mode="max")
    assert not list(avg.parameters()) and not list(mx.parameters())
    out, weights = avg(x, bank, return_attn=True)
    torch.testing.assert_close(out, bank.mean(1, keepdim=True).expand(2, 3, 6))
    torch.testing.assert_close(weights, torch.full((2, 1, 3, 50), 1 / 50))
    out, chosen = mx(x, bank, return_attn=True)
    torch.testing.assert_close(out, bank.amax(1, keepdim=True).expand(2, 3, 6))
    assert chosen.shape == (2, 50, 6)
    torch.testing.assert_close((chosen * bank).amax(1), bank.amax(1))


def test_dropout_only_in_training():
    module = FeatureBankOperator(8, inner_channels=8)
    randomised(module)
    x, bank = torch.randn(2, 4, 8), torch.randn(2, 30, 8)
    module.train()
    torch.manual_seed(0)
    first = module(x, bank)
    torch.manual_seed(1)
    assert not torch.allclose(first, module(x, bank))
    module.eval()
    torch.testing.assert_close(module(x, bank), module(x, bank), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "sum"}, "mode"),
        ({"num_layers": 0}, "num_layers"),
        ({"inner_channels": 0}, "inner_channels"),
        ({"dropout": -0.1}, "dropout"),
        ({"bank_channels": 0}, "bank_channels"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeatureBankOperator(8, **kwargs)


def test_large_logits_and_half_precision():
    module = randomised(FeatureBankOperator(16, inner_channels=16, dtype=F64))
    with torch.no_grad():
        for block in module.layers:
            block.theta.weight.mul_(60)
            block.phi.weight.mul_(60)
    x, bank = torch.randn(1, 4, 16, dtype=F64), torch.randn(1, 64, 16, dtype=F64)
    assert torch.isfinite(module(x, bank)).all()
    for dtype in (torch.bfloat16, torch.float16):
        module.to(dtype)
        fused = module(x.to(dtype), bank.to(dtype))
        with_maps, maps = module(x.to(dtype), bank.to(dtype), return_attn=True)
        module.to(F64)
        assert torch.isfinite(fused).all() and torch.isfinite(with_maps).all()
        assert torch.isfinite(maps).all()


def test_no_window_by_bank_matrix():
    module = FeatureBankOperator(16, inner_channels=16).eval()
    n, m = 64, 2048
    with torch.no_grad(), OpRecorder() as probe:
        module(torch.randn(1, n, 16), torch.randn(1, m, 16))
    assert probe.largest_storage < n * m // 2  # the bank itself is m * 16 = n * m / 4
