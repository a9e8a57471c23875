"""synthesizer: float64 references from the paper's equations for every synthesizing function and
mixture, causal masking before the softmax, shorter inputs, fixed vs trainable random logits."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import attnzoo
from attnzoo.sequence.synthesizer import Synthesizer
from attnzoo.testing import randomize_

B, L, E, H = 2, 12, 16, 2
D = E // H


def perturbed(synthesizer: str = "dense", seed: int = 0, **kwargs) -> Synthesizer:
    torch.manual_seed(seed)
    module = Synthesizer(E, L, H, synthesizer=synthesizer, dtype=torch.float64, **kwargs)
    # equal mixture weights and zero biases would hide mistakes
    randomize_(module, seed=seed, scale=0.2, shift=True)
    return module.eval()


def sequence(length: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, length, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def synthetic_logits(module: Synthesizer, component: str, x: torch.Tensor) -> torch.Tensor:
    """The paper's S(X) per head as (B, h, n, n), by loops over tokens and heads."""
    n = x.shape[1]
    out = torch.zeros(x.shape[0], H, n, n, dtype=torch.float64)
    for b in range(x.shape[0]):
        for i in range(n):
            for h in range(H):
                if component == "dense":  # B_i = F2(relu(F1(X_i))) in R^l
                    hidden = torch.relu(module.dense_hidden.weight @ x[b, i] + module.dense_hidden.bias)
                    rows = slice(h * L, (h + 1) * L)
                    row = module.dense_out.weight[rows] @ hidden + module.dense_out.bias[rows]
                elif component == "factorized_dense":  # C = A (x) B, flattened
                    a, bb = module.factor_a, module.factor_b
                    hidden = torch.relu(module.fd_hidden.weight @ x[b, i] + module.fd_hidden.bias)
                    ra, rb = slice(h * a, (h + 1) * a), slice(h * bb, (h + 1) * bb)
                    va = module.fd_a.weight[ra] @ hidden + module.fd_a.bias[ra]
                    vb = module.fd_b.weight[rb] @ hidden + module.fd_b.bias[rb]
                    row = torch.stack([va[j // bb] * vb[j % bb] for j in range(a * bb)])
                elif component == "random":  # R in R^{l x l}
                    row = module.random_logits[h, i]
                elif component == "factorized_random":  # R = R_1 R_2^T
                    row = module.random_right[h] @ module.random_left[h, i]
                elif component == "dot":  # Q K^T / sqrt(d)
                    wq, bq = (
                        module.q_proj.weight[h * D : (h + 1) * D],
                        module.q_proj.bias[h * D : (h + 1) * D],
                    )
                    wk, bk = (
                        module.k_proj.weight[h * D : (h + 1) * D],
                        module.k_proj.bias[h * D : (h + 1) * D],
                    )
                    q = wq @ x[b, i] + bq
                    row = torch.stack([q @ (wk @ x[b, j] + bk) for j in range(n)]) / math.sqrt(D)
                out[b, h, i] = row[:n]  # the first n positions
    return out


def reference(module: Synthesizer, x, alphas=None, causal=False, keep=None):
    """Y = softmax(sum_c alpha_c S_c(X)) G(X) per head, then W^O."""
    n = x.shape[1]
    alphas = alphas or {c: 1.0 for c in module.components}
    logits = sum(alphas[c] * synthetic_logits(module, c, x) for c in module.components)
    allowed = torch.ones(x.shape[0], 1, n, n, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(n, n).tril().bool()
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)  # mask BEFORE softmax
    values = (x @ module.v_proj.weight.T + module.v_proj.bias).view(x.shape[0], n, H, D).transpose(1, 2)
    heads = (weights @ values).transpose(1, 2).reshape(x.shape[0], n, E)
    return heads @ module.out_proj.weight.T + module.out_proj.bias, weights


def test_registered_under_its_catalog_name():
    assert attnzoo.get_spec("synthesizer").cls is Synthesizer


@pytest.mark.parametrize("synthesizer", ["dense", "factorized_dense", "random", "factorized_random", "dot"])
@pytest.mark.parametrize("length", [L, 7])
def test_single_components_match_the_paper(synthesizer, length):
    module = perturbed(synthesizer)
    x = sequence(length)
    expected, weights = reference(module, x)
    out, maps = module(x, return_attn=True, average_heads=False)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, weights, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)  # fused path


@pytest.mark.parametrize("synthesizer", ["random+dot", "dense+dot", "dense+random", "factorized_random+dot"])
@pytest.mark.parametrize("mixture", ["learned", "sum"])
def test_mixtures_match_the_paper(synthesizer, mixture):
    module = perturbed(synthesizer, mixture=mixture)
    x = sequence()
    if mixture == "learned":
        alpha = torch.softmax(module.mix_logits, 0)
        alphas = dict(zip(module.components, alpha))
        torch.testing.assert_close(sum(alphas.values()), torch.tensor(1.0, dtype=torch.float64))
        assert not torch.allclose(alpha, alpha.mean().expand_as(alpha))  # perturbed: unequal
    else:
        alphas = None  # official: plain sum
        assert module.mix_logits is None
    torch.testing.assert_close(
        module(x, causal=True), reference(module, x, alphas, causal=True)[0], rtol=1e-10, atol=1e-10
    )


def test_learned_mixture_starts_equal_and_gets_gradients():
    module = Synthesizer(E, L, H, synthesizer="random+dot")
    weights = module.mixture_weights()
    assert set(weights) == {"random", "dot"}
    torch.testing.assert_close(torch.stack(list(weights.values())), torch.full((2,), 0.5))
    module(torch.randn(B, L, E)).square().sum().backward()
    assert module.mix_logits.grad is not None and module.mix_logits.grad.abs().sum() > 0
    assert Synthesizer(E, L, synthesizer="dense").mix_logits is None  # one component: no weight


@pytest.mark.parametrize("synthesizer", ["dense", "random", "factorized_dense+dot"])
def test_causal_mask_is_applied_before_the_softmax(synthesizer):
    module = perturbed(synthesizer)
    x = sequence()
    _, maps = module(x, causal=True, return_attn=True, average_heads=False)
    # rows are distributions over the visible positions only (masking after the softmax would
    # leave rows that sum to less than one)
    assert torch.equal(maps.triu(1), torch.zeros_like(maps))
    torch.testing.assert_close(maps.sum(-1), torch.ones(B, H, L, dtype=torch.float64))
    # and nothing of the future leaks into the past
    changed = x.clone()
    changed[:, 6:] += 5.0
    torch.testing.assert_close(module(changed, causal=True)[:, :6], module(x, causal=True)[:, :6])


def test_random_alignment_ignores_the_input_and_fixed_random_is_a_buffer():
    module = perturbed("random")
    _, maps_a = module(sequence(seed=1), return_attn=True)
    _, maps_b = module(sequence(seed=2), return_attn=True)
    torch.testing.assert_close(maps_a, maps_b)  # softmax(R): the same for every input
    fixed = Synthesizer(E, L, H, synthesizer="random", fixed_random=True)
    assert "random_logits" in dict(fixed.named_buffers())
    assert "random_logits" not in dict(fixed.named_parameters())
    assert "random_logits" in fixed.state_dict()
    trainable = Synthesizer(E, L, H, synthesizer="random")
    assert trainable.random_logits.requires_grad
    fixed_f = Synthesizer(E, L, H, synthesizer="factorized_random", fixed_random=True)
    assert {"random_left", "random_right"} <= set(dict(fixed_f.named_buffers()))
    assert fixed_f.random_left.shape == (H, L, 8)  # paper: k = 8


def test_factorized_dense_outer_product_vs_literal_tiling():
    """Outer: each row reshaped (a, b) has rank one. The literal 'tile both' reading repeats with
    period a when a == b (the pitfall): only a distinct values per row."""
    x = sequence()
    outer = perturbed("factorized_dense", factor_a=4, factor_b=4)
    logits = outer._factorized_dense_logits(x, L)  # (B, h, L, L), L = 12 of a * b = 16
    assert outer.factor_a * outer.factor_b >= L
    tiled = perturbed("factorized_dense", factor_a=4, factor_b=4, tiling="tile")
    rows = tiled._factorized_dense_logits(x, L)
    torch.testing.assert_close(rows[..., :4], rows[..., 4:8])  # degenerate: period 4
    assert not torch.allclose(logits[..., :4], logits[..., 4:8])
    full = perturbed("factorized_dense", factor_a=3, factor_b=4)
    row = full._factorized_dense_logits(x, L)[0, 0, 0].view(3, 4)
    assert torch.linalg.matrix_rank(row) == 1
    assert (Synthesizer(E, 12, synthesizer="factorized_dense").factor_a, Synthesizer(E, 12).factor_b) == (
        4,
        3,
    )


def test_key_mask_and_fully_masked_rows():
    module = perturbed("dense+dot")
    x = sequence().requires_grad_()
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, 9:] = False
    alphas = dict(zip(module.components, torch.softmax(module.mix_logits, 0)))
    expected, _ = reference(module, x.detach(), alphas, keep=keep)
    torch.testing.assert_close(module(x, key_mask=keep), expected, rtol=1e-10, atol=1e-10)
    keep[1] = False
    out, maps = module(x, key_mask=keep, return_attn=True)
    torch.testing.assert_close(out[1], module.out_proj.bias.expand(L, E))  # zero attention, not NaN
    assert torch.equal(maps[1], torch.zeros_like(maps[1]))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_longer_than_max_len_is_a_clear_error():
    with pytest.raises(ValueError, match=f"max_len={L}"):
        Synthesizer(E, L)(torch.randn(B, L + 1, E))


def test_large_logits_and_bfloat16_stay_finite():
    module = perturbed("dense+random")
    with torch.no_grad():
        module.random_logits.mul_(1e4)
    assert torch.isfinite(module(1e3 * sequence(), causal=True)).all()
    out = module.to(torch.bfloat16)(sequence().bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="synthesizer"):
        Synthesizer(E, L, synthesizer="dense+conv")
    with pytest.raises(ValueError, match="synthesizer"):
        Synthesizer(E, L, synthesizer="dense+dense")
    with pytest.raises(ValueError, match="mixture"):
        Synthesizer(E, L, mixture="max")
    with pytest.raises(ValueError, match="factor_a"):
        Synthesizer(E, L, synthesizer="factorized_dense", factor_a=2, factor_b=2)
    with pytest.raises(ValueError, match="num_heads"):
        Synthesizer(E, L, 3)


@pytest.mark.slow
def test_dense_dot_mixture_exports_to_onnx_with_a_dynamic_batch():
    """Regression: a batch-sized synthetic mask made export trace the fused kernel's strides, and
    the ONNX decomposition then failed on the heads' reshape."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    module = Synthesizer(E, L, H, synthesizer="dense+dot").eval()
    x = torch.randn(2, L, E)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x3 = torch.randn(3, L, E)
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x3.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(out, module(x3), rtol=1e-4, atol=1e-4)
