"""bahdanau: the additive alignment model against a float64 loop written from the paper."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnzoo
from attnzoo.sequence.bahdanau import BahdanauAttention
from attnzoo.testing import randomize_

pytestmark = pytest.mark.usefixtures("float64_default")


# off the paper init: v_a = 0 gives uniform weights, which would hide a wrong score
perturbed = partial(randomize_, scale=1.0)


def loop_reference(module, s_prev, h, key_mask=None):
    """e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j); alpha_ij = softmax_j; c_i = sum_j alpha_ij h_j."""
    batch, n_q, n_k = s_prev.shape[0], s_prev.shape[1], h.shape[1]
    context = torch.zeros(batch, n_q, h.shape[-1])
    weights = torch.zeros(batch, n_q, n_k)
    for b in range(batch):
        for i in range(n_q):
            js = [j for j in range(n_k) if key_mask is None or key_mask[b, j]]
            bias = module.b_a if module.b_a is not None else 0.0
            e = torch.stack(
                [module.v_a @ torch.tanh(module.w_a @ s_prev[b, i] + module.u_a @ h[b, j] + bias) for j in js]
            )
            alpha = torch.exp(e - e.max()) / torch.exp(e - e.max()).sum()
            for a, j in zip(alpha, js):
                weights[b, i, j] = a
                context[b, i] += a * h[b, j]
    return context, weights


@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_loop_reference(bias):
    torch.manual_seed(0)
    module = perturbed(BahdanauAttention(5, 8, 7, bias=bias))
    s_prev, h = torch.randn(3, 4, 5), torch.randn(3, 6, 8)
    key_mask = torch.tensor([[True] * 6, [True, True, True, False, False, False], [True] + [False] * 5])
    expected_c, expected_a = loop_reference(module, s_prev, h, key_mask)
    context, weights = module(s_prev, h, key_mask=key_mask, return_attn=True)
    torch.testing.assert_close(context, expected_c, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, expected_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(s_prev, h, key_mask=key_mask), expected_c, rtol=1e-10, atol=1e-10)


def test_softmax_over_source_positions_and_padding_gets_zero():
    module = perturbed(BahdanauAttention(4, 6))
    key_mask = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    _, weights = module(torch.randn(2, 3, 4), torch.randn(2, 5, 6), key_mask=key_mask, return_attn=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    assert (weights >= 0).all()
    assert weights[0, :, 4].abs().max() == 0 and weights[1, :, 2:].abs().max() == 0


def test_paper_init_starts_uniform():
    """Appendix B.1: W_a, U_a ~ N(0, 0.001^2) and v_a = 0, so every source word starts equal."""
    torch.manual_seed(0)
    module = BahdanauAttention(64, 128, 256)
    assert torch.all(module.v_a == 0)
    assert module.w_a.std().item() == pytest.approx(0.001, rel=0.05)
    assert module.u_a.std().item() == pytest.approx(0.001, rel=0.05)
    h = torch.randn(2, 5, 128)
    context, weights = module(torch.randn(2, 3, 64), h, return_attn=True)
    torch.testing.assert_close(weights, torch.full((2, 3, 5), 0.2))
    torch.testing.assert_close(context, h.mean(1, keepdim=True).expand(2, 3, 128))
    xavier = BahdanauAttention(64, 128, 256, init="xavier")
    assert xavier.v_a.abs().sum() > 0


def test_single_decoder_step_equals_the_batched_queries():
    module = perturbed(BahdanauAttention(4, 6))
    s_prev, h = torch.randn(2, 3, 4), torch.randn(2, 5, 6)
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out, weights = module(s_prev, h, key_mask=key_mask, return_attn=True)
    for i in range(3):
        step_out, step_weights = module(s_prev[:, i], h, key_mask=key_mask, return_attn=True)
        assert step_out.shape == (2, 6) and step_weights.shape == (2, 5)
        torch.testing.assert_close(step_out, out[:, i])
        torch.testing.assert_close(step_weights, weights[:, i])


def test_separate_values():
    module = perturbed(BahdanauAttention(4, 6))
    s_prev, h, v = torch.randn(2, 3, 4), torch.randn(2, 5, 6), torch.randn(2, 5, 9)
    out, weights = module(s_prev, h, v, return_attn=True)
    torch.testing.assert_close(out, weights @ v)


def test_large_logits_stay_finite():
    module = perturbed(BahdanauAttention(4, 6))
    with torch.no_grad():
        module.v_a.mul_(1e4)
    out, weights = module(torch.randn(2, 3, 4) * 100, torch.randn(2, 5, 6) * 100, return_attn=True)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))


def test_registered_defaults():
    spec = attnzoo.get_spec("bahdanau")
    module = spec.build()
    assert (module.query_dim, module.key_dim, module.attn_dim) == (32, 64, 32)
    assert module.b_a is None  # the paper's alignment model has no bias
    assert spec.paper.arxiv == "1409.0473"


def test_bad_arguments():
    with pytest.raises(ValueError, match="attn_dim"):
        BahdanauAttention(4, 6, -1)
    with pytest.raises(ValueError, match="init"):
        BahdanauAttention(4, init="glorot")
