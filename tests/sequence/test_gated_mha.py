"""gated_mha: a float64 reference with the hard-concrete gates (train samples and eval gates), the
gate distribution against its closed form, the L0 penalty, pruning for real, gradients at init."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.sequence.gated_mha import GatedMultiheadAttention
from attnzoo.sequence.mha import MultiheadAttention
from attnzoo.testing import randomize_

B, NQ, NK, E, H = 2, 5, 7, 16, 4
D = E // H
LOW, HIGH, BETA = -0.1, 1.1, 0.33


def perturbed(seed: int = 0, **kwargs) -> GatedMultiheadAttention:
    torch.manual_seed(seed)
    module = GatedMultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    randomize_(module, seed=seed, scale=0.1, shift=True)
    with torch.no_grad():
        module.log_alpha.copy_(torch.tensor([-4.0, 0.0, 1.0, 4.0]))  # closed, mid, mid, open
    return module.eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, NQ, E, generator=g, dtype=torch.float64),
        torch.randn(B, NK, E, generator=g, dtype=torch.float64),
    )


def reference(module: GatedMultiheadAttention, q_in, kv_in, gates) -> torch.Tensor:
    """Concat_i(g_i head_i) W^O, head_i = softmax(Q W_i^Q (K W_i^K)^T / sqrt(d)) V W_i^V; gates
    broadcastable to (B, h, N_q)."""
    h = module.num_heads
    wq, wk, wv = (p.weight.view(h, D, E) for p in (module.q_proj, module.k_proj, module.v_proj))
    bq, bk, bv = (p.bias.view(h, D) for p in (module.q_proj, module.k_proj, module.v_proj))
    q = torch.einsum("bnc,hdc->bhnd", q_in, wq) + bq[:, None]
    k = torch.einsum("bnc,hdc->bhnd", kv_in, wk) + bk[:, None]
    v = torch.einsum("bnc,hdc->bhnd", kv_in, wv) + bv[:, None]
    a = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D), dim=-1)
    heads = torch.einsum("bhij,bhjd->bhid", a, v) * gates[..., None]
    merged = heads.transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], h * D)
    return merged @ module.out_proj.weight.T + module.out_proj.bias


def eval_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(log_alpha) * (HIGH - LOW) + LOW).clamp(0, 1)


def test_registered_under_its_catalog_name():
    assert attnzoo.get_spec("gated_mha").cls is GatedMultiheadAttention


def test_eval_uses_the_deterministic_gate():
    module = perturbed()
    x, mem = inputs()
    gates = eval_gates(module.log_alpha.detach())
    assert gates[0] == 0 and gates[3] == 1 and 0 < gates[1] < 1  # the stretch reaches 0 and 1
    expected = reference(module, x, mem, gates.view(1, H, 1))
    torch.testing.assert_close(module(x, mem), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module.gates().double(), gates)


@pytest.mark.parametrize("noise", ["token", "sample", "batch"])
def test_training_gates_are_stretched_hard_concrete_samples(noise):
    module = perturbed(noise=noise).train()
    x, mem = inputs()
    shape = {"token": (B, H, NQ, 1), "sample": (B, H, 1, 1), "batch": (1, H, 1, 1)}[noise]
    torch.manual_seed(7)
    u = torch.rand(shape, dtype=torch.float64)
    u = 1e-6 + (1 - 2e-6) * u
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + module.log_alpha.detach().view(1, H, 1, 1)) / BETA)
    gates = (s * (HIGH - LOW) + LOW).clamp(0, 1)[..., 0]  # (B|1, h, N_q|1)
    torch.manual_seed(7)
    out = module(x, mem)
    torch.testing.assert_close(out, reference(module, x, mem, gates), rtol=1e-10, atol=1e-10)


def test_gate_distribution_and_l0_penalty_match_the_closed_form():
    module = GatedMultiheadAttention(E, H, noise="token")
    with torch.no_grad():
        module.log_alpha.copy_(torch.tensor([-2.0, 0.0, 1.0, log11 := math.log(11)]))
    torch.manual_seed(0)
    g = module.sample_gates(1, 100_000)[0, :, :, 0]  # (h, draws)
    la = module.log_alpha.detach()
    p_open = torch.sigmoid(la - BETA * math.log(-LOW / HIGH))  # P(g != 0)
    p_one = torch.sigmoid(la - BETA * math.log((1 - LOW) / (HIGH - 1)))  # P(g == 1)
    torch.testing.assert_close((g != 0).float().mean(1), p_open, atol=5e-3, rtol=0)
    torch.testing.assert_close((g == 1).float().mean(1), p_one, atol=5e-3, rtol=0)
    torch.testing.assert_close(module.gate_open_probability(), p_open)
    torch.testing.assert_close(module.l0_penalty(), p_open.sum())
    module.l0_penalty().backward()
    assert (module.log_alpha.grad > 0).all()  # the penalty pushes every gate towards closed
    assert math.isclose(log11, GatedMultiheadAttention(E, H).log_alpha[0].item(), rel_tol=1e-6)


def test_starts_open_so_it_wraps_a_trained_mha_exactly():
    torch.manual_seed(0)
    mha = randomize_(MultiheadAttention(E, H, dtype=torch.float64), scale=0.1, shift=True)
    gated = GatedMultiheadAttention.from_mha(mha).eval()
    torch.testing.assert_close(gated.gates(), torch.ones(H, dtype=torch.float64))
    x, mem = inputs()
    torch.testing.assert_close(gated(x, mem), mha(x, mem), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gated(x, causal=True), mha(x, causal=True), rtol=1e-12, atol=1e-12)


def test_gradients_reach_every_parameter_in_training_at_the_default_init():
    """At log a = log 11 a draw is 0 with p = 0.04 and inside (0, 1) with p = 0.13: with one draw
    per head and token, no seed silences a head for a batch, and log_alpha always gets gradient."""
    p_zero = 1 - torch.sigmoid(torch.tensor(math.log(11) - BETA * math.log(-LOW / HIGH)))
    assert 0.03 < p_zero < 0.05
    for seed in range(20):
        torch.manual_seed(seed)
        module = GatedMultiheadAttention(E, H).train()
        x = torch.randn(2, 8, E)
        gates = module.sample_gates(2, 8)
        assert (gates.amax(dim=(0, 2, 3)) > 0).all(), seed  # no head is closed for the whole batch
        out = module(x)
        (out * torch.randn_like(out)).sum().backward()
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (seed, name)


def test_prune_removes_closed_heads_for_real_and_keeps_eval_outputs():
    module = perturbed()  # head 0 closed
    x, mem = inputs()
    key_mask = torch.ones(B, NK, dtype=torch.bool)
    key_mask[0, -2:] = False
    before = module(x, mem, key_mask=key_mask)
    n_before = sum(p.numel() for p in module.parameters())
    assert module.prune() == [0]
    assert (
        module.num_heads == 3 and module.q_proj.out_features == 3 * D and module.out_proj.in_features == 3 * D
    )
    assert sum(p.numel() for p in module.parameters()) == n_before - (3 * (E * D + D) + E * D + 1)
    torch.testing.assert_close(module(x, mem, key_mask=key_mask), before, rtol=1e-12, atol=1e-12)
    assert module.prune() == []  # nothing else is closed
    _, maps = module(x, mem, return_attn=True, average_heads=False)
    assert maps.shape == (B, 3, NQ, NK)
    # pruning an open head changes the output; pruning everything leaves the bias
    assert module.prune([1]) == [1]
    assert not torch.allclose(module(x, mem), before)
    module.prune(range(module.num_heads))
    torch.testing.assert_close(module(x, mem), module.out_proj.bias.expand(B, NQ, E))
    with pytest.raises(ValueError, match="heads"):
        perturbed().prune([H])


def test_bad_arguments():
    with pytest.raises(ValueError, match="stretch"):
        GatedMultiheadAttention(E, H, stretch=(0.0, 1.0))
    with pytest.raises(ValueError, match="noise"):
        GatedMultiheadAttention(E, H, noise="head")
    with pytest.raises(ValueError, match="temperature"):
        GatedMultiheadAttention(E, H, temperature=0.0)
    with pytest.raises(ValueError, match="num_heads"):
        GatedMultiheadAttention(E, 3)


# -- gated_mha extends mha: every mha option, one computation with a hook ----------------------


def test_extends_mha_and_differs_only_by_the_head_scaling_hook():
    assert issubclass(GatedMultiheadAttention, MultiheadAttention)
    # one forward: the gates enter through scale_heads, nothing else is overridden but the
    # zero-head case
    assert GatedMultiheadAttention.forward is MultiheadAttention.forward
    assert GatedMultiheadAttention.scale_heads is not MultiheadAttention.scale_heads


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_options_hold_with_gates(batch_first):
    """add_bias_kv, add_zero_attn, sequence-first and unbatched inputs, torch's mask layout."""
    torch.manual_seed(3)
    plain = MultiheadAttention(
        E, H, add_bias_kv=True, add_zero_attn=True, batch_first=batch_first, dtype=torch.float64
    )
    randomize_(plain, seed=3, scale=0.1, shift=True)
    gated = GatedMultiheadAttention.from_mha(plain).eval()
    assert gated.batch_first == batch_first and gated.bias_k is not None and gated.add_zero_attn
    q, kv = inputs()
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)  # (N, B, D)
    per_head = torch.rand(B * H, NQ, NK, generator=torch.Generator().manual_seed(2)) > 0.3
    # gates open: exactly plain mha
    torch.testing.assert_close(gated(q, kv, attn_mask=per_head), plain(q, kv, attn_mask=per_head))
    # one gate scales one head: the same as scaling that head's columns of W^O
    with torch.no_grad():
        gated.log_alpha[1] = 0.0
        plain.out_proj.weight[:, D : 2 * D] *= eval_gates(torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(gated(q, kv, attn_mask=per_head), plain(q, kv, attn_mask=per_head))
    single = q[:, 0] if not batch_first else q[0]
    torch.testing.assert_close(
        gated(single),
        gated(single[None] if batch_first else single[:, None]).squeeze(0 if batch_first else 1),
    )


def test_prune_keeps_bias_kv_rows_of_the_kept_heads():
    module = perturbed(add_bias_kv=True)
    q, kv = inputs()
    before = module(q, kv)
    bias_k_kept = module.bias_k.view(H, D)[1:].clone()
    assert module.prune() == [0]
    assert module.bias_k.shape == (3 * D,)
    torch.testing.assert_close(module.bias_k.view(3, D), bias_k_kept, rtol=0, atol=0)
    torch.testing.assert_close(module(q, kv), before, rtol=1e-10, atol=1e-10)


def test_from_torch_builds_gated_layers_with_open_gates():
    theirs = torch.nn.MultiheadAttention(E, H, add_bias_kv=True, dtype=torch.float64).eval()
    gated = GatedMultiheadAttention.from_torch(theirs, noise="batch")
    assert isinstance(gated, GatedMultiheadAttention) and gated.noise == "batch"
    x = torch.randn(NQ, B, E, dtype=torch.float64)
    torch.testing.assert_close(gated(x), theirs(x, x, x)[0], rtol=1e-10, atol=1e-10)
