"""sha: a float64 reference from the SHA-RNN paper's attention (Figure 2), the official variant's
over-parameterised value gate, masks, and what makes it not multi-head attention."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.sequence.sha import SingleHeadAttention
from attnzoo.testing import randomize_

B, NQ, NK, D = 2, 5, 9, 12


def perturbed(variant: str = "paper", seed: int = 0, **kwargs) -> SingleHeadAttention:
    torch.manual_seed(seed)
    module = SingleHeadAttention(D, variant=variant, dtype=torch.float64, **kwargs)
    # gates at 0 and LayerNorm at (1, 0) would hide mistakes
    randomize_(module, seed=seed, scale=0.3, shift=True)
    return module.eval()


def sequences(seed: int = 1, n_k: int = NK) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, NQ, D, generator=g, dtype=torch.float64)
    memory = torch.randn(B, n_k, D, generator=g, dtype=torch.float64)
    return x, memory


def reference(module: SingleHeadAttention, x, memory, value_gate=None, allowed=None):
    """Loops over positions, from the paper: q = sig(s_q) LN(W x + b); k = sig(s_k) m; v = sig(s_v) m."""
    w, b = module.q_proj.weight, module.q_proj.bias
    gain, shift, eps = module.q_norm.weight, module.q_norm.bias, module.q_norm.eps
    s_q, s_k = torch.sigmoid(module.query_gate), torch.sigmoid(module.key_gate)
    s_v = torch.sigmoid(module.value_gate) if value_gate is None else value_gate
    out = torch.zeros(x.shape[0], x.shape[1], D, dtype=torch.float64)
    for n in range(x.shape[0]):
        for i in range(x.shape[1]):
            h = w @ x[n, i] + b
            mu, var = h.mean(), ((h - h.mean()) ** 2).mean()
            q = s_q * ((h - mu) / torch.sqrt(var + eps) * gain + shift)
            scores = torch.stack([q @ (s_k * memory[n, j]) for j in range(memory.shape[1])]) / math.sqrt(D)
            if allowed is not None:
                scores = scores.masked_fill(~allowed[n, i], float("-inf"))
            a = torch.softmax(scores, dim=0)
            out[n, i] = sum(a[j] * (s_v * memory[n, j]) for j in range(memory.shape[1]))
    return out


def test_registered_under_its_catalog_name():
    assert attnzoo.get_spec("sha").cls is SingleHeadAttention
    assert attnzoo.get_spec("sha").paper.arxiv == "1911.11423"


def test_matches_the_paper_reference_for_cross_and_self_attention():
    module = perturbed()
    x, memory = sequences()
    torch.testing.assert_close(module(x, memory), reference(module, x, memory), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x), reference(module, x, x), rtol=1e-10, atol=1e-10)


def test_causal_with_memory_is_the_official_mask():
    """SHA-RNN attends over [memory; current]; the official mask lets query i see all the memory and
    the current positions up to i (zeros, then an upper triangle of -inf)."""
    module = perturbed()
    x, memory = sequences()
    keys = torch.cat([memory, x], dim=1)  # (B, NK + NQ, D)
    allowed = torch.ones(NQ, NK + NQ, dtype=torch.bool)
    allowed[:, NK:] = torch.ones(NQ, NQ).tril().bool()
    allowed = allowed.expand(B, NQ, NK + NQ)
    expected = reference(module, x, keys, allowed=allowed)
    torch.testing.assert_close(module(x, keys, causal=True), expected, rtol=1e-10, atol=1e-10)


def test_no_key_value_or_output_projections_and_gates_start_half_open():
    module = SingleHeadAttention(D)
    names = {name for name, _ in module.named_parameters()}
    assert names == {
        "q_proj.weight",
        "q_proj.bias",
        "q_norm.weight",
        "q_norm.bias",
        "query_gate",
        "key_gate",
        "value_gate",
    }
    for gate in module.gates():
        torch.testing.assert_close(gate, torch.full((D,), 0.5))


def test_output_is_a_convex_mix_of_the_gated_values_not_a_projection():
    """No W^V or W^O: each output lies in the convex hull of sigmoid(s_v) * value rows."""
    module = perturbed()
    x, memory = sequences()
    out, maps = module(x, memory, return_attn=True)
    assert maps.shape == (B, NQ, NK)  # one head: no head axis
    torch.testing.assert_close(maps.sum(-1), torch.ones(B, NQ, dtype=torch.float64))
    values = torch.sigmoid(module.value_gate) * memory
    torch.testing.assert_close(out, maps @ values, rtol=1e-10, atol=1e-10)


def test_scale_is_one_over_sqrt_of_the_full_width():
    module = perturbed()
    x, memory = sequences()
    _, maps = module(x, memory, return_attn=True)
    q = torch.sigmoid(module.query_gate) * module.q_norm(module.q_proj(x))
    k = torch.sigmoid(module.key_gate) * memory
    expected = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), dim=-1)
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-10)


def test_official_variant_over_parameterises_the_value_gate():
    module = perturbed("official")
    assert module.q_norm.eps == 1e-12
    x, memory = sequences()
    lin = module.value_overparam
    c, f = lin(torch.sigmoid(module.value_gate)).split(D)
    gate = torch.sigmoid(f) * torch.tanh(c)  # can be negative: flips a value feature
    expected = reference(module, x, memory, value_gate=gate)
    torch.testing.assert_close(module(x, memory), expected, rtol=1e-10, atol=1e-10)
    # the paper variant's reference differs: the variant matters
    assert not torch.allclose(module(x, memory), reference(module, x, memory))


def test_collapse_value_gate_keeps_outputs_and_drops_the_linear():
    module = perturbed("official")
    x, memory = sequences()
    before = module(x, memory)
    n_params = sum(p.numel() for p in module.parameters())
    module.collapse_value_gate()
    assert module.value_overparam is None
    assert sum(p.numel() for p in module.parameters()) == n_params - (2 * D * D + 2 * D)
    torch.testing.assert_close(module(x, memory), before, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="official"):
        perturbed().collapse_value_gate()


def test_key_mask_matches_reference():
    # a fully masked row (zero maps, no gradient to its keys): the conformance suite's key_mask samples
    module = perturbed()
    x, memory = sequences()
    key_mask = torch.ones(B, NK, dtype=torch.bool)
    key_mask[0, 3:] = False
    allowed = key_mask.unsqueeze(1).expand(B, NQ, NK)
    torch.testing.assert_close(
        module(x, memory, key_mask=key_mask),
        reference(module, x, memory, allowed=allowed),
        rtol=1e-10,
        atol=1e-10,
    )


def test_large_logits_and_half_precision_stay_finite():
    module = perturbed()
    x, memory = sequences()
    with torch.no_grad():
        module.query_gate.fill_(20.0)  # sigmoid -> 1
        module.key_gate.fill_(20.0)
    out = module(x, 1e4 * memory)  # logits around 1e4: the softmax must not overflow
    assert torch.isfinite(out).all()
    module = module.to(torch.bfloat16)
    out = module(x.bfloat16(), memory.bfloat16(), causal=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_arguments():
    module = SingleHeadAttention(D)
    x = torch.randn(B, NQ, D)
    with pytest.raises(ValueError, match="variant"):
        SingleHeadAttention(D, variant="mha")
    with pytest.raises(ValueError, match="embed_dim"):
        SingleHeadAttention(0)
    with pytest.raises(TypeError, match="key_mask"):
        module(x, key_mask=torch.ones(B, NQ))
