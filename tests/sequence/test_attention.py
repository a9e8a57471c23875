"""attention: the module form of the core, against loop references of each score."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.sequence.attention import Attention

pytestmark = pytest.mark.usefixtures("float64_default")


def loop_attention(q, k, v, score_fn, key_mask=None):
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1])
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            js = [j for j in range(k.shape[1]) if key_mask is None or key_mask[b, j]]
            s = torch.stack([score_fn(q[b, i], k[b, j]) for j in js])
            a = torch.softmax(s, 0)
            out[b, i] = sum(a_j * v[b, j] for a_j, j in zip(a, js))
    return out


def score_fn(module: Attention):
    d_q = module.query_dim
    return {
        "dot": lambda qi, kj: qi @ kj,
        "scaled_dot": lambda qi, kj: qi @ kj / math.sqrt(kj.shape[0]),
        "cosine": lambda qi, kj: torch.cosine_similarity(qi, kj, dim=0),
        "general": lambda qi, kj: qi @ module.w @ kj,
        "additive": lambda qi, kj: module.v_a @ torch.tanh(module.w_q @ qi + module.w_k @ kj),
        "concat": lambda qi, kj: module.v_a @ torch.tanh(module.w[:, :d_q] @ qi + module.w[:, d_q:] @ kj),
    }[module.score]


@pytest.mark.parametrize("score", ["dot", "scaled_dot", "cosine", "general", "additive", "concat"])
def test_module_matches_loop_reference(score):
    torch.manual_seed(0)
    module = attnzoo.create("attention", 6, score=score)
    q, k, v = torch.randn(2, 3, 6), torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    key_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    expected = loop_attention(q, k, v, score_fn(module), key_mask)
    out, weights = module(q, k, v, key_mask=key_mask, return_attn=True)
    torch.testing.assert_close(module(q, k, v, key_mask=key_mask), expected)
    torch.testing.assert_close(out, expected)
    assert torch.all(weights[1, :, 2:] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))


def test_parameters_exist_only_for_scores_that_need_them():
    counts = {
        s: sum(
            p.numel()
            for p in Attention(
                6, 4 if s in ("general", "additive", "concat") else 6, score=s, attn_dim=5
            ).parameters()
        )
        for s in ("dot", "scaled_dot", "cosine", "general", "additive", "concat")
    }
    assert counts == {"dot": 0, "scaled_dot": 0, "cosine": 0, "general": 24, "additive": 55, "concat": 55}


def test_single_decoder_step_query():
    module = Attention(6, score="general")
    q, k = torch.randn(2, 6), torch.randn(2, 5, 6)
    out, weights = module(q, k, return_attn=True)
    assert out.shape == (2, 6) and weights.shape == (2, 5)
    torch.testing.assert_close(out, module(q[:, None], k)[:, 0])


def test_constructor_errors():
    with pytest.raises(ValueError, match="score: expected one of"):
        Attention(4, score="bilinear")
    with pytest.raises(ValueError, match="key_dim: score 'dot' needs key_dim == query_dim"):
        Attention(4, 5, score="dot")
