"""luong and luong_local: global and local attention against float64 loops written from the paper."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import attnzoo
from attnzoo.sequence.luong import LuongAttention, LuongLocalAttention
from attnzoo.testing import randomize_

pytestmark = pytest.mark.usefixtures("float64_default")


perturbed = partial(randomize_, scale=0.5)


def score_fn(module):
    """score(h_t, h_s) of the paper's equation (8), written out."""
    d_q = module.query_dim
    if module.score == "dot":
        return lambda h, hs, s: h @ hs
    if module.score == "general":
        return lambda h, hs, s: h @ module.w_a @ hs
    if module.score == "concat":
        return lambda h, hs, s: module.v_a @ torch.tanh(module.w_a[:, :d_q] @ h + module.w_a[:, d_q:] @ hs)
    return lambda h, hs, s: (module.w_a @ h)[s]  # location: a_t = softmax(W_a h_t)


def attentional(module, c, h):
    """h~_t = tanh(W_c [c_t; h_t])."""
    bias = module.w_c.bias if module.w_c.bias is not None else 0.0
    return torch.tanh(module.w_c.weight @ torch.cat([c, h]) + bias)


def softmax(values):
    values = torch.stack(values)
    e = torch.exp(values - values.max())
    return e / e.sum()


@torch.no_grad()
def global_reference(module, h, source, key_mask=None):
    batch, n_q, n_k = h.shape[0], h.shape[1], source.shape[1]
    out = torch.zeros(batch, n_q, module.query_dim)
    weights = torch.zeros(batch, n_q, n_k)
    score = score_fn(module)
    for b in range(batch):
        for t in range(n_q):
            ss = [s for s in range(n_k) if key_mask is None or key_mask[b, s]]
            a = softmax([score(h[b, t], source[b, s], s) for s in ss])
            c = torch.zeros(source.shape[-1])
            for a_s, s in zip(a, ss):
                weights[b, t, s] = a_s
                c = c + a_s * source[b, s]
            out[b, t] = attentional(module, c, h[b, t])
    return out, weights


@torch.no_grad()
def local_reference(module, h, source, key_mask=None, step=0):
    """Luong section 3.2, one query and one source position at a time."""
    batch, n_q, n_k = h.shape[0], h.shape[1], source.shape[1]
    out = torch.zeros(batch, n_q, module.query_dim)
    weights = torch.zeros(batch, n_q, n_k)
    positions = torch.zeros(batch, n_q)
    score = score_fn(module)
    d = module.window
    for b in range(batch):
        length = int(key_mask[b].sum()) if key_mask is not None else n_k
        for t in range(n_q):
            if module.mode == "local-m":
                p = float(step + t)
                if module.variant == "official":
                    p = min(p, length - 1)
            else:
                p = length * torch.sigmoid(module.v_p @ torch.tanh(module.w_p @ h[b, t]))
            positions[b, t] = p
            centre = math.floor(p)
            ss = [s for s in range(centre - d, centre + d + 1) if 0 <= s < length]
            c = torch.zeros(source.shape[-1])
            if ss:
                a = softmax([score(h[b, t], source[b, s], s) for s in ss])
                for a_s, s in zip(a, ss):
                    if module.mode == "local-p":
                        sigma = d / 2
                        a_s = a_s * torch.exp(torch.as_tensor(-((s - p) ** 2) / (2 * sigma**2)))
                    weights[b, t, s] = a_s
                    c = c + a_s * source[b, s]
            out[b, t] = attentional(module, c, h[b, t])
    return out, weights, positions


KEY_MASK = torch.tensor([[True] * 7, [True, True, True, True, False, False, False]])


# ----------------------------------------------------------------------------------- global


@pytest.mark.parametrize("score", ["dot", "general", "concat", "location"])
def test_global_matches_float64_loop_reference(score):
    torch.manual_seed(0)
    key_dim = 6 if score == "dot" else 5
    module = perturbed(LuongAttention(6, key_dim, score=score, attn_dim=4, max_source_len=9))
    h, source = torch.randn(2, 3, 6), torch.randn(2, 7, key_dim)
    expected, expected_a = global_reference(module, h, source, KEY_MASK)
    out, weights = module(h, source, key_mask=KEY_MASK, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, expected_a, rtol=1e-10, atol=1e-10)
    # the fused path (no maps) computes the same
    torch.testing.assert_close(module(h, source, key_mask=KEY_MASK), expected, rtol=1e-10, atol=1e-10)


def test_global_query_is_the_current_state_and_single_steps_agree():
    module = perturbed(LuongAttention(6, score="general"))
    h, source = torch.randn(2, 4, 6), torch.randn(2, 7, 6)
    out, weights = module(h, source, key_mask=KEY_MASK, return_attn=True)
    for t in range(4):
        step_out, step_weights = module(h[:, t], source, key_mask=KEY_MASK, return_attn=True)
        torch.testing.assert_close(step_out, out[:, t])
        torch.testing.assert_close(step_weights, weights[:, t])


def test_location_score_uses_only_the_first_s_rows():
    module = perturbed(LuongAttention(6, 5, score="location", max_source_len=10))
    h, source = torch.randn(2, 3, 6), torch.randn(2, 7, 5)
    module(h, source).sum().backward()
    assert module.w_a.grad[7:].abs().max() == 0 and module.w_a.grad[:7].abs().sum() > 0
    # the location weights do not depend on the source content
    _, w1 = module(h, source, return_attn=True)
    _, w2 = module(h, torch.randn(2, 7, 5), return_attn=True)
    torch.testing.assert_close(w1, w2)
    with pytest.raises(ValueError, match="max_source_len"):
        module(h, torch.randn(2, 11, 5))
    with pytest.raises(ValueError, match="max_source_len"):
        LuongAttention(6, score="location")


def test_global_fully_masked_row_and_large_logits():
    module = perturbed(LuongAttention(6, score="dot"), scale=0.3)
    h = torch.randn(2, 3, 6, requires_grad=True)
    source = 100 * torch.randn(2, 7, 6)
    key_mask = torch.tensor([[True] * 7, [False] * 7])
    out, weights = module(h, source, key_mask=key_mask, return_attn=True)
    assert torch.all(weights[1] == 0) and torch.isfinite(out).all()
    # an empty window of context gives h~ = tanh(W_c [0; h])
    torch.testing.assert_close(out[1], torch.tanh(module.w_c(torch.cat([torch.zeros(3, 6), h[1]], -1))))
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(3))
    out.sum().backward()
    assert torch.isfinite(h.grad).all()


def test_global_defaults_and_init():
    torch.manual_seed(0)
    module = attnzoo.get_spec("luong").build()
    assert module.score == "dot" and module.w_c.bias is None  # dot for global; no bias in W_c
    assert module.w_c.weight.shape == (32, 64)  # W_c [c_t; h_t]
    general = LuongAttention(64, score="general")
    for p in general.parameters():  # paper section 4.1: uniform in [-0.1, 0.1]
        assert p.abs().max() <= 0.1 and p.abs().max() > 0.09


# ------------------------------------------------------------------------------------ local


@pytest.mark.parametrize("mode", ["local-m", "local-p"])
@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_local_matches_float64_loop_reference(mode, score):
    torch.manual_seed(1)
    key_dim = 6 if score == "dot" else 5
    module = perturbed(LuongLocalAttention(6, key_dim, score=score, mode=mode, window=2, attn_dim=4))
    # a 12-long source and a 2-wide window: windows clip at both ends and at the padding
    h, source = torch.randn(3, 9, 6), torch.randn(3, 12, key_dim)
    key_mask = torch.ones(3, 12, dtype=torch.bool)
    key_mask[1, 8:] = False
    key_mask[2, 3:] = False
    expected, expected_a, expected_p = local_reference(module, h, source, key_mask, step=2)
    out, weights = module(h, source, key_mask=key_mask, step=2, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, expected_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(h, source, key_mask=key_mask, step=2), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module.positions(h, 12, key_mask=key_mask, step=2), expected_p)


def test_local_window_wider_than_the_source():
    module = perturbed(LuongLocalAttention(6, score="general"))  # D = 10 > S
    h, source = torch.randn(2, 5, 6), torch.randn(2, 7, 6)
    expected, expected_a, _ = local_reference(module, h, source, KEY_MASK)
    out, weights = module(h, source, key_mask=KEY_MASK, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, expected_a, rtol=1e-10, atol=1e-10)


def test_local_p_gaussian_multiplies_without_renormalising():
    # small weights keep p_t = S sigmoid(...) inside the source, away from the clipped ends
    module = perturbed(LuongLocalAttention(6, mode="local-p", window=3), scale=0.1)
    h, source = torch.randn(2, 4, 6), torch.randn(2, 30, 6)
    _, weights = module(h, source, return_attn=True)
    sums = weights.sum(-1)
    assert torch.all(sums < 1) and torch.all(sums > 0)  # a renormalised version would sum to 1
    positions = module.positions(h, 30)
    s = torch.arange(30)
    gauss = torch.exp(-((s - positions.unsqueeze(-1)) ** 2) / (2 * 1.5**2))
    inside = weights > 0
    plain = torch.where(inside, weights / gauss, torch.zeros(()))  # undo the Gaussian: the softmax
    torch.testing.assert_close(plain.sum(-1), torch.ones(2, 4))
    # exactly 2D + 1 positions around floor(p_t)
    assert torch.all(inside.sum(-1) == 7)
    centre = positions.floor().long().unsqueeze(-1)
    assert torch.all((s - centre).abs()[inside] <= 3)


def test_local_p_position_uses_the_unpadded_length_and_padding_changes_nothing():
    module = perturbed(LuongLocalAttention(6, mode="local-p", window=2))
    h, source = torch.randn(1, 3, 6), torch.randn(1, 5, 6)
    alone = module(h, source, return_attn=True)
    padded_source = torch.cat([source, torch.randn(1, 4, 6)], 1)
    key_mask = torch.tensor([[True] * 5 + [False] * 4])
    padded = module(h, padded_source, key_mask=key_mask, return_attn=True)
    torch.testing.assert_close(padded[0], alone[0])
    torch.testing.assert_close(padded[1][..., :5], alone[1])
    assert torch.all(padded[1][..., 5:] == 0)
    p = module.positions(h, 9, key_mask=key_mask)
    assert torch.all(p <= 5)  # p_t = S sigmoid(...) with S = 5 real words, not 9


def test_local_m_is_monotonic_and_masks_positions_outside_the_source():
    module = perturbed(LuongLocalAttention(6, mode="local-m", window=1))
    h = torch.randn(2, 8, 6, requires_grad=True)
    source = torch.randn(2, 4, 6)
    out, weights = module(h, source, return_attn=True)
    for t in range(8):
        nonzero = set(weights[0, t].nonzero().flatten().tolist())
        assert nonzero == {s for s in (t - 1, t, t + 1) if 0 <= s < 4}
        if nonzero:
            torch.testing.assert_close(weights[0, t].sum(), torch.tensor(1.0))  # local-m: softmax only
    # steps t >= S + D have an empty window: zero context, finite output and gradients
    assert torch.all(weights[:, 5:] == 0) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(h.grad).all()


def test_local_m_official_variant_clamps_to_the_last_word():
    paper = perturbed(LuongLocalAttention(6, mode="local-m", window=1))
    official = perturbed(LuongLocalAttention(6, mode="local-m", window=1, variant="official"))
    h, source = torch.randn(1, 6, 6), torch.randn(1, 3, 6)
    _, w_paper = paper(h, source, return_attn=True)
    _, w_official = official(h, source, return_attn=True)
    assert torch.all(w_paper[0, 4:] == 0)
    torch.testing.assert_close(w_official[0, 4:].sum(-1), torch.ones(2))
    assert torch.all(w_official[0, 4:, 0] == 0)  # centred on the last word: window {1, 2}


def test_local_single_step_needs_its_step_and_agrees_with_the_sequence():
    for mode in ("local-m", "local-p"):
        module = perturbed(LuongLocalAttention(6, mode=mode, window=2))
        h, source = torch.randn(2, 5, 6), torch.randn(2, 9, 6)
        out, weights = module(h, source, return_attn=True)
        for t in range(5):
            step_out, step_weights = module(h[:, t], source, step=t, return_attn=True)
            torch.testing.assert_close(step_out, out[:, t])
            torch.testing.assert_close(step_weights, weights[:, t])
    with pytest.raises(ValueError, match="step"):
        LuongLocalAttention(6, mode="local-m")(torch.randn(2, 6), torch.randn(2, 9, 6))


def test_local_p_gradient_reaches_the_position_predictor_through_the_gaussian():
    module = perturbed(LuongLocalAttention(6, mode="local-p", window=2))
    out = module(torch.randn(2, 3, 6), torch.randn(2, 15, 6))
    (out * torch.randn(out.shape)).sum().backward()
    assert module.w_p.grad.abs().sum() > 0 and module.v_p.grad.abs().sum() > 0


def test_local_defaults():
    module = attnzoo.get_spec("luong_local").build()
    assert (module.mode, module.score, module.window, module.sigma) == ("local-p", "general", 10, 5.0)
    assert module.variant == "paper"


def test_bad_inputs():
    with pytest.raises(ValueError, match="score"):
        LuongAttention(6, score="additive")
    with pytest.raises(ValueError, match="score"):
        LuongLocalAttention(6, score="location")
    with pytest.raises(ValueError, match="key_dim"):
        LuongAttention(6, 5, score="dot")
    with pytest.raises(ValueError, match="mode"):
        LuongLocalAttention(6, mode="local-x")
    with pytest.raises(ValueError, match="window"):
        LuongLocalAttention(6, window=-1)
    with pytest.raises(ValueError, match="variant"):
        LuongLocalAttention(6, variant="tf")
    for module in (LuongAttention(6), LuongLocalAttention(6)):
        with pytest.raises(TypeError, match="key_mask"):  # no additive key mask here
            module(torch.randn(2, 3, 6), torch.randn(2, 7, 6), key_mask=torch.ones(2, 7))
