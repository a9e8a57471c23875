"""The attention core against float64 references written from the scores' equations."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.functional import attend, attention_logits, attention_weights, causal_mask
from attnzoo.functional.attend import Attended, attend_with_weights, key_padding_to_mask
from attnzoo.testing import OpRecorder

pytestmark = pytest.mark.usefixtures("float64_default")


def reference(q, k, v, score_fn, mask=None):
    """Loop form of out_i = sum_j softmax_j(score(q_i, k_j)) v_j, with masked rows = 0."""
    b, n_q, _ = q.shape
    n_k = k.shape[1]
    out = torch.zeros(b, n_q, v.shape[-1])
    weights = torch.zeros(b, n_q, n_k)
    for bi in range(b):
        for i in range(n_q):
            allowed = [j for j in range(n_k) if mask is None or bool(mask[bi, i, j])]
            if not allowed:
                continue
            scores = torch.stack([score_fn(q[bi, i], k[bi, j]) for j in allowed])
            a = torch.exp(scores - scores.max())
            a = a / a.sum()
            for a_j, j in zip(a, allowed):
                weights[bi, i, j] = a_j
                out[bi, i] += a_j * v[bi, j]
    return out, weights


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 8, generator=g)
    k = torch.randn(2, 7, 8, generator=g)
    v = torch.randn(2, 7, 6, generator=g)
    return q, k, v


def score_cases(d_q: int, d_k: int):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d_q, d_k, generator=g)
    w_q, w_k, v_a, b_a = (torch.randn(s, generator=g) for s in ((4, d_q), (4, d_k), (4,), (4,)))
    w_cat = torch.randn(4, d_q + d_k, generator=g)
    return {
        "dot": ({}, lambda qi, kj: qi @ kj),
        "scaled_dot": ({}, lambda qi, kj: qi @ kj / math.sqrt(d_k)),
        "cosine": ({}, lambda qi, kj: qi @ kj / (qi.norm() * kj.norm())),
        "general": ({"w": w}, lambda qi, kj: qi @ w @ kj),
        "additive": (
            {"w_q": w_q, "w_k": w_k, "v_a": v_a, "b_a": b_a},
            lambda qi, kj: v_a @ torch.tanh(w_q @ qi + w_k @ kj + b_a),
        ),
        "concat": ({"w": w_cat, "v_a": v_a}, lambda qi, kj: v_a @ torch.tanh(w_cat @ torch.cat([qi, kj]))),
    }


@pytest.mark.parametrize("score", ["dot", "scaled_dot", "cosine", "general", "additive", "concat"])
@pytest.mark.parametrize("return_weights", [False, True])
def test_every_score_matches_loop_reference(qkv, score, return_weights):
    q, k, v = qkv
    params, score_fn = score_cases(8, 8)[score]
    expected_out, expected_w = reference(q, k, v, score_fn)
    result = attend(q, k, v, score=score, return_weights=return_weights, **params)
    out = result[0] if return_weights else result
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10)
    if return_weights:
        torch.testing.assert_close(result[1], expected_w, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(result[1].sum(-1), torch.ones(2, 5))


def test_general_and_additive_compare_different_widths():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 3, 5, generator=g), torch.randn(1, 4, 9, generator=g), torch.randn(1, 4, 2)
    for score in ("general", "additive", "concat"):
        params, score_fn = score_cases(5, 9)[score]
        torch.testing.assert_close(attend(q, k, v, score=score, **params), reference(q, k, v, score_fn)[0])
    with pytest.raises(ValueError, match="equal query and key widths"):
        attend(q, k, v, score="dot")


def test_masks_bool_and_additive_match_reference(qkv):
    q, k, v = qkv
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 5, 7, generator=g) > 0.4
    mask[:, :, 0] = True
    expected, _ = reference(q, k, v, lambda a, b: a @ b / math.sqrt(8), mask)
    additive = torch.zeros(2, 5, 7).masked_fill(~mask, float("-inf"))
    for m in (mask, additive):
        torch.testing.assert_close(attend(q, k, v, mask=m), expected)
        torch.testing.assert_close(attend(q, k, v, mask=m, return_weights=True)[0], expected)


@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_give_zero_output_and_zero_gradients(qkv, return_weights, kind):
    q, k, v = (t.clone().requires_grad_() for t in qkv)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[2] = False
    if kind == "additive":
        mask = torch.zeros(5, 7).masked_fill(~mask, float("-inf"))
    result = attend(q, k, v, mask=mask, return_weights=return_weights)
    out = result[0] if return_weights else result
    assert torch.equal(out[:, 2], torch.zeros(2, 6))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, 2], torch.zeros(2, 8))
    if return_weights:
        assert torch.equal(result[1][:, 2], torch.zeros(2, 7))


def test_causal_is_bottom_right_aligned(qkv):
    q, k, v = qkv
    full = causal_mask(7, 7)
    assert torch.equal(full, torch.ones(7, 7, dtype=torch.bool).tril())
    last_two = causal_mask(2, 7)  # the last two of seven positions
    assert torch.equal(last_two, full[-2:])
    expected, _ = reference(q, k, v, lambda a, b: a @ b / math.sqrt(8), causal_mask(5, 7).expand(2, 5, 7))
    for rw in (False, True):
        out = attend(q, k, v, causal=True, return_weights=rw)
        torch.testing.assert_close(out[0] if rw else out, expected)


def test_large_logits_stay_finite():
    q = torch.randn(1, 4, 8) * 1e4
    k = torch.randn(1, 4, 8) * 1e4
    v = torch.randn(1, 4, 8)
    for rw in (False, True):
        out = attend(q.float(), k.float(), v.float(), return_weights=rw)
        out = out[0] if rw else out
        assert torch.isfinite(out).all()


def test_half_precision_weights_are_computed_in_float32():
    q, k = torch.randn(1, 3, 8).bfloat16(), torch.randn(1, 4, 8).bfloat16()
    w = attention_weights(q, k)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 3, dtype=torch.float32))


def test_logits_and_weights_are_consistent(qkv):
    q, k, _ = qkv
    logits = attention_logits(q, k)
    torch.testing.assert_close(logits, q @ k.transpose(1, 2) / math.sqrt(8))
    torch.testing.assert_close(attention_weights(q, k), torch.softmax(logits, -1))


def test_leading_dims_of_any_rank(qkv):
    q, k, v = qkv
    expected = attend(q, k, v)
    # (2, 5, 8) viewed as (2, 1, 1, 5, 8): five dims fold back to the same result
    out = attend(q[:, None, None], k[:, None, None], v[:, None, None])
    torch.testing.assert_close(out[:, 0, 0], expected)
    # unbatched keys broadcast against batched queries
    out = attend(q, k[0], v[0])
    torch.testing.assert_close(out[0], expected[0])
    # leading dims that differ on both sides: (2, 1) queries against (1, 3) keys and values
    q2, k3, v3 = q[:, None], torch.stack([k[0]] * 3)[None], torch.stack([v[0]] * 3)[None]
    out = attend(q2, k3, v3, mask=torch.ones(5, 7, dtype=torch.bool))
    assert out.shape == (2, 3, 5, 6)
    torch.testing.assert_close(out[0, 2], expected[0])


def test_fused_path_is_taken_and_no_square_matrix_is_formed():
    n = 256
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float32) for _ in range(3))
    # NCHW-style views: the feature dim is strided, which would send SDPA to its math path
    q_view, k_view, v_view = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
    assert q_view.stride(-1) != 1
    for args in ((q, k, v), (q_view, k_view, v_view)):
        with OpRecorder() as rec:
            attend(*args)
        assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in rec.names()
        square = [name for name, shapes in rec.calls if any(s[-2:] == (n, n) for s in shapes)]
        assert not square, f"an N x N tensor was formed by {square}"


def test_bool_mask_and_causal_still_fused():
    q = torch.randn(1, 2, 64, 16, dtype=torch.float32)
    mask = torch.rand(1, 1, 64, 64) > 0.2
    for kwargs in ({"mask": mask}, {"causal": True}, {"mask": mask, "causal": True}):
        with OpRecorder() as rec:
            attend(q, q, q, **kwargs)
        assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in rec.names(), kwargs


def test_bad_arguments_name_what_was_expected(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="score: expected one of"):
        attend(q, k, v, score="nope")
    with pytest.raises(TypeError, match="floating-point"):
        attend(q.long(), k, v)
    with pytest.raises(ValueError, match="does not broadcast"):
        attend(q, k, v, mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool mask"):
        attend(q, k, v, mask=torch.ones(5, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="same number of keys and values"):
        attend(q, k, v[:, :3])
    with pytest.raises(ValueError, match=r"w: score 'general' needs a w of shape \(8, 8\)"):
        attend(q, k, v, score="general")
    with pytest.raises(TypeError, match="one dtype"):
        attend(q, k.float(), v)
    with pytest.raises(ValueError, match="dropout_p"):
        attend(q, k, v, dropout_p=1.5)


def test_dropout_applies_only_when_asked(qkv):
    q, k, v = qkv
    torch.manual_seed(0)
    dropped = attend(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, attend(q, k, v))
    torch.manual_seed(0)
    _, weights = attend(q, k, v, dropout_p=0.5, return_weights=True)
    # the returned weights are the pre-dropout probabilities
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))


def test_different_value_width_stays_on_the_fused_path():
    n = 256
    for d_qk, d_v in ((16, 8), (8, 24)):
        q, k = (
            torch.randn(1, 2, n, d_qk, dtype=torch.float32),
            torch.randn(1, 2, n, d_qk, dtype=torch.float32),
        )
        v = torch.randn(1, 2, n, d_v, dtype=torch.float32)
        with OpRecorder() as rec:
            out = attend(q, k, v)
        assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in rec.names()
        assert not [name for name, shapes in rec.calls if any(s[-2:] == (n, n) for s in shapes)]
        assert out.shape == (1, 2, n, d_v)
        torch.testing.assert_close(out, attend(q, k, v, return_weights=True)[0], rtol=1e-4, atol=1e-5)


def test_float16_logits_beyond_65504_stay_finite_with_maps():
    q = torch.full((1, 2, 64), 40.0, dtype=torch.float16)  # q . k = 102400 > float16's max
    k = torch.full((1, 3, 64), 40.0, dtype=torch.float16)
    v = torch.randn(1, 3, 5).half()
    out, weights = attend(q, k, v, score="dot", return_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, dtype=torch.float32))


@pytest.mark.parametrize("return_weights", [False, True])
def test_one_return_type_for_callers_passing_the_flag_through(qkv, return_weights):
    q, k, v = qkv
    result = attend_with_weights(q, k, v, return_weights=return_weights)
    assert isinstance(result, Attended)
    torch.testing.assert_close(result.out, attend(q, k, v))
    assert (result.weights is not None) == return_weights


@pytest.mark.parametrize("return_weights", [False, True])
def test_a_nan_query_reaches_its_output_on_both_paths(qkv, return_weights):
    """Bug: the fused kernel turned a NaN score row into a zero (finite) output."""
    q, k, v = (t.float() for t in qkv)  # float32: the fused kernel lost it (5 keys, N_k % 8 != 0)
    q[0, 1, 0] = float("nan")
    out = attend_with_weights(q, k, v, return_weights=return_weights).out
    assert out[0, 1].isnan().all()
    assert torch.isfinite(out[0, [0, 2, 3, 4]]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_padded_keys_never_reach_real_outputs(qkv, return_weights, value, kind):
    """Bug: 0 x NaN = NaN, so NaN/Inf stored in a padded key or value poisoned every output."""
    q, k, v = qkv
    keep = torch.ones(2, 1, 7, dtype=torch.bool)
    keep[0, :, 5:] = False  # the last two keys of item 0 are padding
    mask = keep if kind == "bool" else torch.zeros(2, 1, 7).masked_fill(~keep, float("-inf"))
    clean = attend(q, k, v, mask=mask, return_weights=return_weights)
    k2, v2 = k.clone(), v.clone()
    k2[0, 5:], v2[0, 5:] = value, value
    dirty = attend(q, k2, v2, mask=mask, return_weights=return_weights)
    for a, b in zip(*(((c,) if not return_weights else c) for c in (clean, dirty))):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_key_padding_and_causal_stay_on_the_fused_kernel():
    """A (B, 1, N_k) key mask (3-D) sent SDPA to its math path, and causal=True alone formed an
    N x N bool mask: both are quadratic buffers nobody asked for."""
    q = torch.randn(1, 2, 64, 8, dtype=torch.float32)
    key_mask = torch.ones(1, 1, 64, dtype=torch.bool)
    key_mask[..., 60:] = False
    for kwargs in ({"mask": key_mask}, {"causal": True}):
        with OpRecorder() as recorder:
            attend(q, q, q, **kwargs)
        assert recorder.ran("flash_attention"), kwargs
        assert not recorder.formed(lambda n: n >= 64 * 64), kwargs


def test_mask_on_another_device_is_a_clear_error(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"mask: expected a tensor on cpu .* got one on meta"):
        attend(q, k, v, mask=torch.ones(5, 7, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="key_mask.*meta"):
        key_padding_to_mask(torch.ones(2, 7, dtype=torch.bool, device="meta"), 2, 7, device=q.device)


def test_operands_of_two_precisions_under_autocast():
    q = torch.randn(2, 5, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q.bfloat16(), q, q)  # a bfloat16 query against float32 keys and values
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="expected one dtype"):
        attend(q.double(), q, q)  # outside autocast: a clear error


def test_fx_records_attend_as_one_call():
    class Attend(torch.nn.Module):
        def forward(self, x, mask=None):
            return attend(x, x, x, mask=mask)

    traced = torch.fx.symbolic_trace(Attend())
    calls = [n for n in traced.graph.nodes if n.op == "call_function" and "attend" in str(n.target)]
    assert len(calls) == 1
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(traced(x), attend(x, x, x))


@pytest.mark.parametrize("return_weights", [False, True])
def test_large_finite_query_whose_sum_overflows_gives_a_finite_output(return_weights: bool) -> None:
    """The NaN carry must not turn a finite query into NaN: 64 entries of 60000 sum past float16's max."""
    q = torch.full((1, 4, 64), 6e4, dtype=torch.float16)
    k = torch.randn(1, 5, 64, dtype=torch.float16) * 1e-3
    v = torch.randn(1, 5, 64, dtype=torch.float16)
    result = attend(q, k, v, return_weights=return_weights)
    out = result[0] if return_weights else result
    assert torch.isfinite(out).all()
    # and a NaN query still reaches its row, and only its row
    q[0, 1, 3] = float("nan")
    result = attend(q, k, v, return_weights=return_weights)
    out = result[0] if return_weights else result
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, [0, 2, 3]]).all()


def test_three_dim_operands_make_no_copies_on_the_fused_path():
    """(B, N, D) operands run as B batches of one head: the fused kernels' (B, N, h, D) output and
    gradient layout is then their own, and nothing is copied back (as B heads of one batch, the
    output and every input gradient came back token-major and were copied: 3 copies a step)."""
    from attnzoo.testing import OpRecorder

    q, k, v = (torch.randn(8, 64, 32, requires_grad=True) for _ in range(3))
    with OpRecorder() as recorder:
        out = attend(q, k, v)
        out.backward(torch.randn_like(out))
    assert recorder.ran("scaled_dot_product")
    copies = [name for name, sizes in recorder.sizes if "copy" in name or "clone" in name]
    assert not copies, copies
    # masks of every accepted rank keep their meaning in that layout
    mask = torch.rand(8, 64, 64) > 0.3
    mask[..., 0] = True
    for m in (mask, mask[:1], mask[0], mask[:, :1]):  # (B, N, N), (1, N, N), (N, N), (B, 1, N)
        got = attend(q, k, v, mask=m)
        expected = attend(q, k, v, mask=m, return_weights=True)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --- training steps that keep the weights (wide heads, short sequences) -------------------------


def _einsum_attention(q, k, v, scale):
    """softmax_j(q_i . k_j * scale) v_j from the equation, in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("bhij,bhjd->bhid", weights, v)


def _wide_operands(n_q=24, n_k=40, width=256, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return tuple(
        torch.randn(2, 2, n, width, generator=g, dtype=dtype).requires_grad_() for n in (n_q, n_k, n_k)
    )


@pytest.mark.parametrize("layout", ["4d", "3d"])
def test_a_wide_short_training_step_keeps_the_weights_and_matches_the_equation(layout):
    """Heads >= 256 wide over <= 512 positions: the step keeps P for the backward (four
    products, no recompute of q k^T) instead of the fused kernel. Output and every gradient match
    the float64 einsum reference; the backward forms exactly one (N_q, N_k) product, dO V^T."""
    q, k, v = _wide_operands()
    if layout == "3d":  # (B, N, D): one head per batch item
        q, k, v = (t.detach()[:, 0].requires_grad_() for t in (q, k, v))
    with OpRecorder() as forward:
        out = attend(q, k, v)
    assert not forward.ran("flash_attention") and "KeptWeights" in _autograd_nodes(out)
    grad_out = torch.randn_like(out)
    with OpRecorder() as backward:
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    products = [name for name, shapes in backward.calls if "mm" in name and shapes[0][-2:] == (24, 40)]
    assert len(products) == 1, backward.names()

    as4 = (lambda t: t) if layout == "4d" else (lambda t: t.unsqueeze(1))
    q64, k64, v64 = (as4(t.detach()).double().requires_grad_() for t in (q, k, v))
    expected = _einsum_attention(q64, k64, v64, 256**-0.5)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), as4(grad_out).double())
    torch.testing.assert_close(as4(out).double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(as4(got).double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["no grad", "width 128", "more than 512 keys", "mask", "causal", "dropout", "bfloat16"],
)
def test_every_other_step_keeps_the_fused_kernel(case):
    """The weights are kept only where that is measured to pay (benchmarks/bench_kept_weights.py):
    inference, narrower heads, longer sequences, masks, dropout and half precision stay fused."""
    width = 128 if case == "width 128" else 256
    n_k = 513 if case == "more than 512 keys" else 40
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    q, k, v = _wide_operands(n_q=40, n_k=n_k, width=width, dtype=dtype)
    kwargs = {
        "mask": {"mask": torch.ones(40, n_k, dtype=torch.bool).tril()},
        "causal": {"causal": True},
        "dropout": {"dropout_p": 0.1},
    }.get(case, {})
    with torch.set_grad_enabled(case != "no grad"), OpRecorder() as recorder:
        out = attend(q, k, v, **kwargs)
    assert "KeptWeights" not in _autograd_nodes(out)
    # SDPA itself leaves the flash kernel for its math path with dropout on CPU
    assert recorder.ran("flash_attention") or (case == "dropout" and q.device.type == "cpu")


def _autograd_nodes(out):
    """The names of every node of ``out``'s autograd graph, joined."""
    names, stack = [], [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.append(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return " ".join(names)


def test_kept_weights_gradcheck_and_double_backward():
    """float64 gradcheck of the hand-written backward, and of its own gradient (create_graph: the
    weights are formed again from q and k; the fused kernels have no double backward at all)."""
    q, k, v = (t.detach()[:1, :1, :5].double().requires_grad_() for t in _wide_operands())
    assert torch.autograd.gradcheck(lambda *t: attend(*t), (q, k, v), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda *t: attend(*t), (q, k, v), fast_mode=True)


def test_kept_weights_under_torch_func_and_with_a_non_finite_query():
    q, k, v = (t.detach().double() for t in _wide_operands())
    grad_q = torch.func.grad(lambda q: attend(q, k, v).square().sum())(q)
    q_ref = q.clone().requires_grad_()
    (expected,) = torch.autograd.grad(_einsum_attention(q_ref, k, v, 256**-0.5).square().sum(), q_ref)
    torch.testing.assert_close(grad_q, expected)
    # a NaN or Inf query reaches its own output row, and only that one: this path has no carrier,
    # the row's logits are NaN or +-Inf and so is its softmax
    for value in (float("nan"), float("inf"), -float("inf")):
        q_bad = q.clone().requires_grad_()
        with torch.no_grad():
            q_bad[0, 1, 3, 7] = value
        out = attend(q_bad, k, v)
        assert "KeptWeights" in _autograd_nodes(out) and out[0, 1, 3].isnan().all(), value
        assert torch.isfinite(out[0, 1, [0, 1, 2, 4]]).all() and torch.isfinite(out[1]).all()


def test_an_exported_graph_keeps_the_fused_kernel_whatever_the_grad_mode():
    """torch.export traces with gradients enabled by default: the kept-weights path (a training
    step's trade) must not end up in a graph exported for deployment."""

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return attend(q, k, v)

    q, k, v = _wide_operands()
    program = torch.export.export(Attend(), (q, k, v))
    targets = " ".join(str(node.target) for node in program.graph.nodes)
    assert "scaled_dot_product" in targets and "softmax" not in targets, targets
    torch.testing.assert_close(program.module()(q, k, v), attend(q, k, v))


@pytest.mark.slow
def test_kept_weights_compile_to_the_same_step():
    q, k, v = _wide_operands()
    compiled = torch.compile(lambda q, k, v: attend(q, k, v), fullgraph=True)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    eager = attend(q, k, v)
    torch.testing.assert_close(out, eager)
    for got, want in zip(grads, torch.autograd.grad(eager.sum(), (q, k, v))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("masking", ["none", "bool", "additive_learned", "causal"])
def test_fused_path_differentiates_twice(masking):
    """gradgradcheck through the fused path (the kernels have no double backward of their own):
    no mask, a bool mask, an additive mask that gets a gradient itself (a learned bias) and the
    kernel's causal mode."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 2, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    inputs = [q, k, v]
    mask = None
    if masking == "bool":
        mask = torch.rand(2, 1, 5, 5, generator=generator) < 0.7
        mask[..., 0] = True
    elif masking == "additive_learned":
        mask = torch.randn(1, 2, 5, 5, generator=generator, dtype=torch.float64, requires_grad=True)
        inputs.append(mask)

    def f(q, k, v, *learned):
        return attend(q, k, v, mask=learned[0] if learned else mask, causal=masking == "causal")

    assert torch.autograd.gradgradcheck(f, tuple(inputs))


def test_fused_path_backward_twice_and_under_checkpoint():
    """The kernel's graph kept by the twice-differentiable path is freed after a backward; a second
    backward of a retained graph forms it again, and activation checkpointing recomputes it."""
    from torch.utils.checkpoint import checkpoint

    generator = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(2, 3, 6, 8, generator=generator, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    expected = torch.autograd.grad(attend(q, k, v).square().sum(), (q, k, v))
    loss = attend(q, k, v).square().sum()
    loss.backward(retain_graph=True)
    loss.backward()
    for t, e in zip((q, k, v), expected):
        torch.testing.assert_close(t.grad, 2 * e, rtol=1e-12, atol=1e-12)
    checkpointed = checkpoint(lambda q, k, v: attend(q, k, v), q, k, v, use_reentrant=False)
    for g, e in zip(torch.autograd.grad(checkpointed.square().sum(), (q, k, v)), expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masking", ["none", "bool", "additive", "causal", "fully_masked_row"])
def test_fused_path_has_forward_derivatives(masking):
    """Forward-mode AD through the fused path (the kernels have none of their own): gradcheck's
    forward-mode Jacobian against finite differences, for q, k, v, with every mask kind, and a
    fully masked row that stays zero with a zero tangent."""
    generator = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(2, 2, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    mask = None
    if masking == "bool":
        mask = torch.rand(2, 1, 5, 5, generator=generator) < 0.7
        mask[..., 0] = True
    elif masking == "additive":
        mask = torch.randn(1, 2, 5, 5, generator=generator, dtype=torch.float64)
    elif masking == "fully_masked_row":
        mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
        mask[:, :, 1] = False

    def f(q, k, v):
        return attend(q, k, v, mask=mask, causal=masking == "causal")

    assert torch.autograd.gradcheck(f, (q, k, v), check_forward_ad=True, check_backward_ad=False)
    if masking == "fully_masked_row":
        tangents = tuple(torch.randn_like(t) for t in (q, k, v))
        out, derivative = torch.func.jvp(f, (q, k, v), tangents)
        assert out[:, :, 1].abs().max() == 0 and derivative[:, :, 1].abs().max() == 0


def test_hessian_through_the_fused_path_and_mha():
    """``torch.func.hessian`` (forward over reverse) equals the reverse-over-reverse Hessian, for
    attend and for a whole mha module in training mode (its fused fast path)."""
    from attnzoo.sequence.mha import MultiheadAttention

    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 4, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    weights = torch.randn(1, 2, 4, 3, generator=generator, dtype=torch.float64)

    def loss(q):
        return (attend(q, k, v, causal=True) * weights).sum()

    torch.testing.assert_close(torch.func.hessian(loss)(q), torch.func.jacrev(torch.func.jacrev(loss))(q))
    torch.manual_seed(0)
    mha = MultiheadAttention(8, 2).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    out_weights = torch.randn(1, 3, 8, dtype=torch.float64)

    def module_loss(x):
        return (mha(x) * out_weights).sum()

    hessian = torch.func.hessian(module_loss)(x)
    assert hessian.shape == (1, 3, 8, 1, 3, 8)
    torch.testing.assert_close(hessian, torch.func.jacrev(torch.func.jacrev(module_loss))(x))
