"""Generic query/key/value soft addressing: scores, masks, the fused fast path.

Attention as soft addressing (seed 004; Luong et al. 2015, arXiv:1508.04025; Graves 2014,
arXiv:1410.5401): a query is compared with every key, the similarities are normalised by a softmax,
and the values are summed with those weights::

    a_ij = softmax_j( score(q_i, k_j) * scale ),     out_i = sum_j a_ij v_j

Scores (``score=``):

========== ================================== ============================================
name       score(q, k)                        parameters (given by the caller)
========== ================================== ============================================
dot        q . k                              none
scaled_dot q . k / sqrt(d_k)                  none (Vaswani et al. 2017)
cosine     q . k / (|q| |k|)                  none (scale acts as an inverse temperature)
general    q^T W k                            ``w``: (D_q, D_k) (Luong "general")
additive   v_a^T tanh(W_q q + W_k k + b_a)    ``w_q``: (A, D_q), ``w_k``: (A, D_k), ``v_a``: (A,),
                                              optional ``b_a``: (A,) (Bahdanau)
concat     v_a^T tanh(W_a [q; k] + b_a)       ``w``: (A, D_q + D_k), ``v_a``: (A,), optional
                                              ``b_a`` (Luong "concat")
========== ================================== ============================================

``dot``, ``scaled_dot``, ``cosine`` and ``general`` are bilinear in (q, k), so when the weights are
not requested they run through :func:`torch.nn.functional.scaled_dot_product_attention`, which
never materialises the N_q x N_k matrix (the flash kernel on CPU and GPU). One exception, for speed:
an unmasked float32/float64 training step with heads at least 256 wide and at most 512 queries and
keys keeps its weights for the backward rather than recomputing q k^T there (``_keeps_weights``;
the kept matrix holds at most half of what autograd keeps of q, k, v and the output). ``additive``
and ``concat`` need the (N_q, N_k, A) tensor of their MLP and always take the explicit path.

Masks have one polarity everywhere: a boolean ``mask`` is True where a query may attend; a floating
mask is added to the logits. A query whose every key is masked gets a zero output and zero
gradients (never NaN) on both paths.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from attnzoo._checks import autocast_enabled, check_mask
from attnzoo._tracing import differentiates_twice, is_eager
from attnzoo.functional.softmax import additive_mask_for, masked_softmax

__all__ = [
    "SCORES",
    "Attended",
    "Score",
    "and_masks",
    "attend",
    "attend_with_weights",
    "attention_logits",
    "attention_weights",
    "causal_mask",
    "key_padding_to_mask",
    "merge_masks",
]

Score = Literal["dot", "scaled_dot", "cosine", "general", "additive", "concat"]
SCORES: tuple[str, ...] = ("dot", "scaled_dot", "cosine", "general", "additive", "concat")
#: Scores that are bilinear in (q, k) and so can run through the fused kernel.
FUSABLE_SCORES: tuple[str, ...] = ("dot", "scaled_dot", "cosine", "general")


def causal_mask(n_q: int, n_k: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean (n_q, n_k) mask, True where query i may attend to key j.

    The queries are aligned with the END of the keys (bottom-right): query i sits at position
    ``n_k - n_q + i`` and sees keys ``0 .. n_k - n_q + i``. For n_q == n_k this is the usual lower
    triangle; for one query against a cache of n_k keys it sees all of them, as incremental decoding
    needs. (``torch``'s ``is_causal`` aligns top-left instead; the two agree when n_q == n_k.)
    """
    q_pos = torch.arange(n_q, device=device).unsqueeze(-1) + (n_k - n_q)
    k_pos = torch.arange(n_k, device=device)
    return k_pos <= q_pos


def and_masks(mask: Tensor | None, allowed: Tensor | None) -> Tensor | None:
    """Restrict ``mask`` (bool or additive, or None) to where the bool ``allowed`` is True."""
    if allowed is None:
        return mask
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def key_padding_to_mask(key_mask: Tensor, batch: int, n_k: int, device: torch.device | None = None) -> Tensor:
    """Check a (B, N_k) bool key mask (True = real key), on ``device`` (the keys') when given, and
    return it as (B, 1, N_k)."""
    check_mask(key_mask, "key_mask", (batch, n_k), device=device)
    if key_mask.dtype != torch.bool or key_mask.dim() != 2:
        raise TypeError(
            f"key_mask: expected a (B, N_k) bool mask (True = real key), got "
            f"{key_mask.dtype} of shape {tuple(key_mask.shape)}"
        )
    return key_mask.unsqueeze(1)  # (B, N_k) -> (B, 1, N_k): the same for every query


def merge_masks(mask: Tensor | None, causal: bool, n_q: int, n_k: int, device: torch.device) -> Tensor | None:
    """Combine a user mask (bool or additive) with a causal mask on ``device`` (the scores') into
    one mask, or None."""
    if not causal:
        return mask
    return and_masks(mask, causal_mask(n_q, n_k, device=device))


def _default_scale(score: str, d_k: int, scale: float | None) -> float:
    if scale is not None:
        return scale
    return 1.0 / math.sqrt(d_k) if score == "scaled_dot" else 1.0


def _check_qkv(q: Tensor, k: Tensor, v: Tensor | None, score: str) -> None:
    # every call goes through here: plain loops and comparisons, no dicts or generators (a small
    # call's whole cost is its Python, on a GPU above all)
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    named = (("q", q), ("k", k)) if v is None else (("q", q), ("k", k), ("v", v))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name}: expected (..., N, D) with at least 2 dims, got {tuple(t.shape)}")
    if q.dtype != k.dtype or (v is not None and v.dtype != q.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got { ({name: t.dtype for name, t in named}) }")
    if v is not None and k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k, v: expected the same number of keys and values, got k {tuple(k.shape)} "
            f"and v {tuple(v.shape)}"
        )
    if score in ("dot", "scaled_dot", "cosine") and q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q, k: score {score!r} needs equal query and key widths, got {q.shape[-1]} and "
            f"{k.shape[-1]} (use score='general' to compare different widths)"
        )


def _require(name: str, value: Tensor | None, score: str, shape: tuple[int, ...]) -> Tensor:
    if value is None:
        raise ValueError(f"{name}: score {score!r} needs a {name} of shape {shape}, got None")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}: score {score!r} expected shape {shape}, got {tuple(value.shape)}")
    return value


def _bilinear_query(q: Tensor, k: Tensor, score: str, w: Tensor | None) -> tuple[Tensor, Tensor]:
    """Rewrite a bilinear score as a plain dot product: returns (q', k') with score = q' . k'."""
    if score == "cosine":
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if score == "general":
        w = _require("w", w, score, (q.shape[-1], k.shape[-1]))
        return q @ w, k  # (..., N_q, D_q) @ (D_q, D_k) -> (..., N_q, D_k)
    return q, k


def _lead_shape(*tensors: Tensor) -> torch.Size:
    """The broadcast leading shape of ``tensors`` (all dims but the last two).

    The common case (equal leading shapes) is answered directly in eager mode: ``torch.broadcast_shapes``
    goes through the symbolic-shape machinery and costs about 40 us a call, a third of a whole small
    fused attention call. While tracing, it keeps ``torch.broadcast_shapes`` so that no equality guard
    is added between dynamic sizes.
    """
    leads = [t.shape[:-2] for t in tensors]
    if not torch.compiler.is_compiling() and leads.count(leads[0]) == len(leads):
        return leads[0]
    return torch.broadcast_shapes(*leads)


def _as_4d(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, lead: torch.Size
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Give q, k, v exactly two leading dims, as the fused kernels and ONNX's lowering expect.

    One leading dim is the batch of one head: (B, N, D) -> (B, 1, N, D). The fused kernels lay
    their output and gradients out (B, N, h, D), which for h = 1 is the operands' own layout; as
    (1, B, N, D), B heads, they came back token-major, and the output and each input gradient
    were copied back into (B, N, D) (two of 8 ms a training step of attention at B 8, N 512,
    d 256). None: padded with size-1 dims in front; more than two are folded into the first,
    after broadcasting. A mask gets 4 dims too: with 3 (a (B, 1, N_k) key padding, say) SDPA
    leaves its fused CPU kernel for the math path, which forms the N_q x N_k matrix.
    """
    if len(lead) == 2 and q.dim() == k.dim() == v.dim() == 4 and (mask is None or mask.dim() != 3):
        return q, k, v, mask  # (B, h, N, D) each, as multi-head callers pass them: nothing to do
    if len(lead) == 1:
        # (B, N, D) -> (B, 1, N, D); an (N, D) operand broadcasts as (1, 1, N, D)
        q, k, v = (t.unsqueeze(1) if t.dim() == 3 else t.reshape(1, 1, *t.shape) for t in (q, k, v))
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)  # (X, N_q, N_k) -> (X, 1, N_q, N_k), X in {1, B}
        return q, k, v, mask
    if mask is not None and mask.dim() == 3:
        mask = mask.unsqueeze(0)  # (X, N_q, N_k) -> (1, X, N_q, N_k): broadcasts as before
    if len(lead) <= 2:
        # (N, D) -> (1, 1, N, D); (H, N, D) beside 4-D operands -> (1, H, N, D); 4-D pass untouched
        return (
            *(t if t.dim() == 4 else t.reshape(*([1] * (4 - t.dim())), *t.shape) for t in (q, k, v)),
            mask,
        )
    folded = (-1, lead[-1])
    # (..., H, N, D) -> (prod(...), H, N, D) once every operand has the full leading shape
    q4, k4, v4 = (t.expand(*lead, *t.shape[-2:]).reshape(*folded, *t.shape[-2:]) for t in (q, k, v))
    if mask is not None:
        mask = mask.expand(*lead, q.shape[-2], k.shape[-2]).reshape(*folded, q.shape[-2], k.shape[-2])
    return q4, k4, v4, mask


def attention_logits(
    q: Tensor,
    k: Tensor,
    *,
    score: Score = "scaled_dot",
    scale: float | None = None,
    w: Tensor | None = None,
    w_q: Tensor | None = None,
    w_k: Tensor | None = None,
    v_a: Tensor | None = None,
    b_a: Tensor | None = None,
) -> Tensor:
    """Unnormalised scores ``score(q_i, k_j) * scale``, shape (..., N_q, N_k); float32 for
    half-precision inputs.

    Args:
        q: queries (..., N_q, D_q).
        k: keys (..., N_k, D_k).
        score: one of :data:`SCORES` (see the module docstring for the equations).
        scale: multiplies the score; default 1/sqrt(D_k) for ``scaled_dot``, 1 otherwise.
        w, w_q, w_k, v_a, b_a: the score's parameters, as listed in the module docstring.
    """
    _check_qkv(q, k, None, score)
    scale = _default_scale(score, k.shape[-1], scale)
    if q.dtype in (torch.float16, torch.bfloat16):
        # half-precision logits overflow (float16 ends at 65504) and lose the small differences a
        # softmax amplifies: form them in float32, as the fused kernels do internally
        q, k = q.float(), k.float()
        w, w_q, w_k, v_a, b_a = (t.float() if t is not None else None for t in (w, w_q, w_k, v_a, b_a))
    if score in FUSABLE_SCORES:
        q, k = _bilinear_query(q, k, score, w)
        return (q @ k.transpose(-2, -1)) * scale  # (..., N_q, N_k)
    d_q, d_k = q.shape[-1], k.shape[-1]
    if score == "concat":
        # W_a [q; k] = W_a[:, :D_q] q + W_a[:, D_q:] k: the concat score is additive with W_a split.
        if w is None:
            raise ValueError(f"w: score 'concat' needs a w of shape (A, {d_q + d_k}), got None")
        if w.dim() != 2 or w.shape[1] != d_q + d_k:
            raise ValueError(f"w: score 'concat' expected shape (A, {d_q + d_k}), got {tuple(w.shape)}")
        w_q, w_k = w.split([d_q, d_k], dim=1)  # one split: its backward fills one gradient buffer
    attn_dim = (w_q.shape[0] if w_q is not None else None) or (v_a.shape[0] if v_a is not None else 0)
    w_q = _require("w_q", w_q, score, (attn_dim, d_q))
    w_k = _require("w_k", w_k, score, (attn_dim, d_k))
    v_a = _require("v_a", v_a, score, (attn_dim,))
    query_part = F.linear(q, w_q, b_a)  # (..., N_q, A)
    key_part = F.linear(k, w_k)  # (..., N_k, A)
    # (..., N_q, 1, A) + (..., 1, N_k, A) -> (..., N_q, N_k, A): the MLP needs every pair.
    hidden = torch.tanh(query_part.unsqueeze(-2) + key_part.unsqueeze(-3))
    return (hidden @ v_a) * scale  # (..., N_q, N_k)


def attention_weights(
    q: Tensor,
    k: Tensor,
    *,
    score: Score = "scaled_dot",
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    w: Tensor | None = None,
    w_q: Tensor | None = None,
    w_k: Tensor | None = None,
    v_a: Tensor | None = None,
    b_a: Tensor | None = None,
) -> Tensor:
    """The attention weights softmax_j(score(q_i, k_j) * scale) after masking, (..., N_q, N_k).

    Kept separate from :func:`attend` for introspection. Computed in float32 for half-precision
    inputs; returned in that precision (float32), so small weights are not rounded away.
    """
    logits = attention_logits(q, k, score=score, scale=scale, w=w, w_q=w_q, w_k=w_k, v_a=v_a, b_a=b_a)
    n_q, n_k = q.shape[-2], k.shape[-2]
    if mask is not None:
        check_mask(mask, "mask", logits.shape, device=logits.device)
    return masked_softmax(logits, merge_masks(mask, causal, n_q, n_k, logits.device))


class Attended(NamedTuple):
    """What :func:`attend_with_weights` returns: the output, and the weights when requested."""

    out: Tensor
    #: (..., N_q, N_k) softmax weights (float32 for half-precision inputs), or None when not requested
    weights: Tensor | None


def _zero_padded_keys(k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Zero the keys and values that no query may attend to (padding).

    Whatever a padded position holds must not reach a real output, but a masked weight of 0 times a
    NaN or Inf value is NaN, and so is a NaN score plus an additive -inf mask; zeros are inert.
    """
    blocked = ~mask if mask.dtype == torch.bool else torch.isneginf(mask)
    # (..., N_q, N_k) -> (..., N_k, 1): True where every query is blocked; a 1-D mask is per key
    padded = (blocked if mask.dim() == 1 else blocked.all(dim=-2)).unsqueeze(-1)
    return torch.where(padded, 0.0, k), torch.where(padded, 0.0, v)


def _nan_carrier(q: Tensor) -> Tensor:
    """(..., N_q, 1): for each query row a value that is finite where the row is and NaN or Inf
    where it holds a NaN or an Inf; :func:`_carry_nan` adds it times zero to the output row.

    The row's sum: one read of q at O(N_q D), next to the attention's O(N_q N_k D), without a
    q-sized temporary (profiled on mha's q, B 8, h 8, d 64, N 1024: ``sum(q - q)`` took 7.6 ms
    where this takes 4.6, in float32). Detached where q needs a gradient (the carrier is
    constant in q wherever it is finite; its backward would be a q-sized expand and add). A
    float16 row sums in float32, so that 64 entries of 6e4 do not overflow to Inf, and gives its
    0 or NaN (``s - s``) in float16; float32 and bfloat16 sums accumulate in float32 and overflow
    only for rows summing past 3.4e38 in magnitude (entries near 1e37 at D = 64), which then read
    as non-finite.
    """
    source = q.detach() if q.requires_grad else q
    if q.dtype == torch.float16:
        total = source.sum(dim=-1, keepdim=True, dtype=torch.float32)
        return (total - total).to(q.dtype)
    return source.sum(dim=-1, keepdim=True)


def _carry_nan(out: Tensor, carrier: Tensor) -> Tensor:
    """``out + 0 * carrier`` (0 for a finite row, NaN for one holding a NaN or an Inf: 0 * Inf is
    NaN), as one add with ``alpha=0``; in place where autograd records nothing (an out-of-place
    add would hold a second output-sized buffer at the call's memory peak, in inference)."""
    carrier = carrier if carrier.dtype == out.dtype else carrier.to(out.dtype)
    return torch.add(out, carrier, alpha=0) if out.requires_grad else out.add_(carrier, alpha=0)


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(softmax(q k^T * scale) v, the weights)`` as plain operators, on 4-D operands."""
    # (B, h, N_q, D) @ (B, h, D, N_k) -> (B, h, N_q, N_k), scaled in place
    logits = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    weights = torch.softmax(logits, dim=-1)
    return torch.matmul(weights, v), weights  # (B, h, N_q, N_k) @ (B, h, N_k, D) -> (B, h, N_q, D)


class _KeptWeightsAttention(torch.autograd.Function):
    """``softmax(q k^T * scale) v`` on 4-D operands, keeping the weights P for the backward.

    The fused kernels keep only the softmax's log-sum-exp and recompute ``q k^T`` in the
    backward: five products per training step, against four here. Where the recompute costs more
    than keeping the weights does (:func:`_keeps_weights`), this runs instead. Its backward is the
    softmax's own, between the products of the scores' gradient::

        dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(P * dP)) * scale,   dQ = dS K,   dK = dS^T Q

    It holds P (B, h, N_q, N_k) and at most two buffers of that size in the backward, as autograd's
    backward of the same operators does. Every step is a differentiable operator, and under
    ``create_graph`` the weights are formed again from q and k (the kept ones are constants to
    autograd), so double backward works (the fused kernels have none). ``generate_vmap_rule`` lets
    ``torch.func`` transforms through.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        # (B, h, N_q, D) @ (B, h, D, N_k) -> (B, h, N_q, N_k), scaled in place
        logits = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
        weights = torch.softmax(logits, dim=-1)
        # (B, h, N_q, N_k) @ (B, h, N_k, D) -> (B, h, N_q, D); the weights are an output only so
        # that setup_context can keep them (the way torch.func's Functions save intermediates)
        return torch.matmul(weights, v), weights

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        q, k, v, scale = inputs
        weights = output[1]
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)  # the weights get no gradient: None, not a zero buffer
        ctx.save_for_backward(q, k, v, weights)
        ctx.scale = scale  # type: ignore[attr-defined]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor | None, _grad_weights: None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        q, k, v, weights = ctx.saved_tensors  # type: ignore[attr-defined]
        scale: float = ctx.scale  # type: ignore[attr-defined]
        needs_q, needs_k, needs_v = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        if grad_out is None:
            return None, None, None, None
        if torch.is_grad_enabled():  # create_graph: the weights as a differentiable function of q, k
            weights = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1)
        # (B, h, N_k, N_q) @ (B, h, N_q, D) -> (B, h, N_k, D)
        grad_v = torch.matmul(weights.transpose(-2, -1), grad_out) if needs_v else None
        grad_q = grad_k = None
        if needs_q or needs_k:
            # (B, h, N_q, D) @ (B, h, D, N_k) -> (B, h, N_q, N_k)
            grad_weights = torch.matmul(grad_out, v.transpose(-2, -1))
            # the softmax's backward in one pass, then the scale in place
            grad_logits = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
            del grad_weights
            grad_logits = grad_logits.mul_(scale)
            # (B, h, N_q, N_k) @ (B, h, N_k, D) -> (B, h, N_q, D), and the transposed product for k
            grad_q = torch.matmul(grad_logits, k) if needs_q else None
            grad_k = torch.matmul(grad_logits.transpose(-2, -1), q) if needs_k else None
        return grad_q, grad_k, grad_v, None


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout_p: float, scale: float
) -> Tensor:
    """``scaled_dot_product_attention``, causal in the kernel's own mode (then ``mask`` is None)."""
    if causal:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


#: the CPU flash kernel SDPA dispatches to, forward and backward (absent from some builds)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class _TwiceDifferentiableSDPA(torch.autograd.Function):
    """The fused kernel, forward and backward, whose backward is itself differentiable.

    The fused kernels have no double backward (torch raises "derivative for
    _scaled_dot_product_flash_attention_for_cpu_backward is not implemented"): a gradient
    penalty (R1, WGAN-GP) through a self-attention discriminator, second-order meta-learning and
    Hessian-vector products stop there, in torch's own MultiheadAttention too. Here a first-order
    backward is the fused kernel's own, and under ``create_graph`` the backward is formed from the
    explicit weights ``softmax(q k^T s + mask)``, differentiable to any order (N_q x N_k memory,
    only then). Without dropout only (its random mask cannot be replayed).

    On the CPU (outside autocast, whose casts SDPA's entry point applies) the forward and
    backward call the flash kernel SDPA dispatches to, keeping what SDPA keeps (q, k, v, the
    output, the log-sum-exp). Elsewhere (CUDA's several kernels, a mask that needs a gradient) the
    forward runs SDPA on detached aliases under ``enable_grad`` and keeps that small graph; the
    backward runs it once and frees it (a second backward of a retained graph forms it again).
    The Function costs ~0.1-0.2 ms of Python per training call on a 2-core CPU (against ~0.25 ms
    for SDPA's whole step at B 1, N 4): nothing beside the products of real sizes.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        causal: bool,
        scale: float,
    ) -> Tensor:
        ctx.options = (causal, scale)  # type: ignore[attr-defined]
        ctx.kernel_graph = None  # type: ignore[attr-defined]
        if _calls_cpu_flash(q, mask):
            # the kernel's mask is additive: SDPA turns a bool one into 0 / -inf the same way
            additive = None if mask is None else additive_mask_for(_as_additive(mask, q.dtype), q.dtype)
            try:
                out, logsumexp = _CPU_FLASH(q, k, v, 0.0, causal, attn_mask=additive, scale=scale)  # type: ignore[misc]
            except RuntimeError:  # operands SDPA would send to its math path: the general route below
                pass
            else:
                ctx.save_for_backward(q, k, v, mask, additive, out, logsumexp)
                return out  # type: ignore[no-any-return]
        ctx.save_for_backward(q, k, v, mask)
        ctx.kernel_graph = _kernel_graph(q, k, v, mask, causal, scale)  # type: ignore[attr-defined]
        return ctx.kernel_graph[1].detach()  # type: ignore[attr-defined]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        q, k, v, mask = saved[:4]
        causal, scale = ctx.options  # type: ignore[attr-defined]
        inputs = (q, k, v, mask)
        wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph: the explicit weights, differentiable again
            ctx.kernel_graph = None  # type: ignore[attr-defined]
            logits = torch.matmul(q, k.transpose(-2, -1)) * scale  # (..., N_q, N_k)
            allowed = causal_mask(q.shape[-2], k.shape[-2], q.device) if causal else mask
            out = torch.matmul(masked_softmax(logits, allowed).to(v.dtype), v)
            grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out, create_graph=True)
        elif len(saved) == 7:  # the CPU flash kernel's own backward
            additive, out, logsumexp = saved[4:]
            grads_qkv = _CPU_FLASH_BACKWARD(  # type: ignore[misc]
                grad_out, q, k, v, out, logsumexp, 0.0, causal, attn_mask=additive, scale=scale
            )
            grads = [grads_qkv[i] for i in wanted]
        else:
            graph = ctx.kernel_graph or _kernel_graph(q, k, v, mask, causal, scale)  # type: ignore[attr-defined]
            ctx.kernel_graph = None  # type: ignore[attr-defined]  # freed now, as autograd frees its own
            aliases, out = graph
            grads = torch.autograd.grad(out, [aliases[i] for i in wanted], grad_out)
        result: list[Tensor | None] = [None] * 6
        for i, g in zip(wanted, grads):
            result[i] = g
        return tuple(result)


def _calls_cpu_flash(q: Tensor, mask: Tensor | None) -> bool:
    """Whether :class:`_TwiceDifferentiableSDPA` calls the CPU flash kernel directly: a CPU call
    outside autocast, with a mask (if any) that needs no gradient (the kernel gives none), while
    the flash backend is enabled (``torch.nn.attention.sdpa_kernel`` may turn it off)."""
    return (
        _CPU_FLASH is not None
        and _CPU_FLASH_BACKWARD is not None
        and q.device.type == "cpu"
        and torch.backends.cuda.flash_sdp_enabled()  # (it rules the CPU kernel too) as SDPA does
        and not autocast_enabled(q.device)
        and (mask is None or not mask.requires_grad)
    )


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = may attend) as 0 / -inf in ``dtype``; a floating one as it is."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _kernel_graph(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float
) -> tuple[tuple[Tensor | None, ...], Tensor]:
    """The fused kernel on detached aliases of q, k, v (and a mask that needs a gradient), under
    ``enable_grad``: (the aliases, the output), the output's graph the kernel's own."""
    with torch.enable_grad():
        aliases = tuple(
            None if t is None else t.detach().requires_grad_(t.requires_grad) for t in (q, k, v, mask)
        )
        out = _sdpa(aliases[0], aliases[1], aliases[2], aliases[3], causal, 0.0, scale)  # type: ignore[arg-type]
    return aliases, out


def _keeps_weights(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    """Whether a training step of unmasked attention keeps its weights instead of running the
    fused kernel: heads at least 256 wide, at most 512 queries and keys, float32 or float64, no
    dropout, and not while ``torch.export`` traces (an exported graph is for deployment: it keeps
    the fused kernel whatever grad mode it was traced in).

    The grid this comes from is ``benchmarks/bench_kept_weights.py`` (training steps against the
    fused kernel, float32, 2-core AMD EPYC): keeping the weights takes 0.8-0.9x the fused kernel's
    time with one head of d 256 from N 64 to 512, and with d 512 at N 128 and 512; at N 1024 it
    took 1.15-1.3x (d 256) and 0.9-1.1x with twice the memory (d 512). With heads of 64 it is slower
    at every length, with heads of 128 within noise. Within these bounds the kept weights (N_q N_k
    per head, N_q N_k <= 256 (N_q + N_k) <= (N_q + N_k) D) hold at most half as much as autograd
    keeps of q, k, v and the output (2 (N_q + N_k) D). Half precision keeps the fused kernel, which
    forms its scores in float32 (this path would form them in the input's precision).
    """
    width = q.shape[-1]
    return (
        width >= 256
        and q.shape[-2] <= 512
        and k.shape[-2] <= 512
        and v.shape[-1] == width
        and dropout_p == 0.0
        and q.dtype in (torch.float32, torch.float64)
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        # an exported graph is for deployment, whatever the grad mode it was traced in: the kernel
        and not torch.compiler.is_exporting()
    )


def _fused_kernel(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout_p: float, scale: float
) -> Tensor:
    """``scaled_dot_product_attention`` on 4-D operands; causal alone in the kernel's own mode.
    Unmasked training steps with wide heads and short sequences keep their weights instead
    (:func:`_keeps_weights`). A NaN or Inf query gives a NaN output row either way."""
    if differentiates_twice():
        # forward-mode AD or torch.func's grad of grad: the fused kernels have neither a forward
        # derivative nor a double backward; the same function as plain operators has both
        return _plain_attention(q, k, v, mask, causal, dropout_p, scale)
    if mask is None and not causal and _keeps_weights(q, k, v, dropout_p):
        # an Inf or NaN in q_i makes every logit of row i NaN or +-Inf, and its softmax NaN: the
        # row carries it without the carrier's out-of-place add (an output-sized buffer a step)
        return _KeptWeightsAttention.apply(q, k, v, scale)[0]
    # the fused kernels turn a NaN score row into zeros (or finite values, for an Inf query)
    query_nan = _nan_carrier(q)  # (B, h, N_q, 1)
    if dropout_p == 0.0 and _needs_graph(q, k, v, mask) and is_eager(q):
        # a backward that is differentiable again (gradient penalties, second-order methods)
        out = _TwiceDifferentiableSDPA.apply(q, k, v, mask, causal, scale)
    else:
        out = _sdpa(q, k, v, mask, causal, dropout_p, scale)
    return _carry_nan(out, query_nan)


def _plain_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout_p: float, scale: float
) -> Tensor:
    """:func:`_fused_kernel`'s function as plain operators, differentiable in every mode and to
    any order: the explicit weights (N_q x N_k per head), a fully masked row zero, a NaN query
    row NaN."""
    # (B, h, N_q, D) @ (B, h, D, N_k) -> (B, h, N_q, N_k)
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    weights = masked_softmax(logits, merge_masks(mask, causal, q.shape[-2], k.shape[-2], q.device))
    weights = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    out = weights.to(v.dtype) @ v  # (B, h, N_q, N_k) @ (B, h, N_k, D) -> (B, h, N_q, D)
    return _carry_nan(out, _nan_carrier(q))


def _needs_graph(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors`` (grad mode on and one of them needs one)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attend_heads(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """:func:`attend`'s fused path (``scaled_dot``, no mask, no weights) without its checks, for
    multi-head modules whose operands are right by construction.

    The caller guarantees: (B, h, N, d) q, k, v of one floating dtype, from its own projections of
    checked inputs, with unit stride in the last dim and one head width; N_q == N_k when
    ``causal``; ``dropout_p`` in [0, 1). Every check, broadcast and re-layout of :func:`attend`
    is skipped (about a third of a small call's time, on a GPU where small calls are launch-bound);
    what it computes is the same, NaN queries included.
    """
    return _fused_kernel(q, k, v, None, causal, dropout_p, _default_scale("scaled_dot", q.shape[-1], None))


def attend_with_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    score: Score = "scaled_dot",
    mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
    w: Tensor | None = None,
    w_q: Tensor | None = None,
    w_k: Tensor | None = None,
    v_a: Tensor | None = None,
    b_a: Tensor | None = None,
) -> Attended:
    """:func:`attend` with one return type for callers that pass ``return_weights`` through:
    ``Attended(out, weights)``, weights None unless requested.

    Example:
        >>> out, maps = attend_with_weights(q, k, v, mask=mask, return_weights=return_attn)
    """
    if isinstance(q, fx.Proxy) or isinstance(k, fx.Proxy) or isinstance(v, fx.Proxy):
        # torch.fx symbolic tracing: the checks and shape logic below need concrete values, so the
        # whole call becomes one node of the graph (run for real when the graph runs)
        traced = _attend_node(
            q, k, v, score=score, mask=mask, causal=causal, dropout_p=dropout_p, scale=scale,
            return_weights=return_weights, w=w, w_q=w_q, w_k=w_k, v_a=v_a, b_a=b_a,
        )  # fmt: skip
        return Attended(traced[0], traced[1] if return_weights else None)
    if not q.dtype == k.dtype == v.dtype and autocast_enabled(q.device):
        # under autocast, operands legitimately arrive in two precisions (a value kept in float32
        # beside autocast-produced queries): compute in the autocast dtype, as the matmuls would
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    _check_qkv(q, k, v, score)
    n_q, n_k = q.shape[-2], k.shape[-2]
    if mask is not None:
        check_mask(mask, "mask", (*_lead_shape(q, k), n_q, n_k), device=q.device)
        mask = additive_mask_for(mask, q.dtype)  # a float mask of another precision: one SDPA takes
        k, v = _zero_padded_keys(k, v, mask)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
    # A NaN (or Inf) query must reach its output on both paths: the fused kernels turn a NaN score
    # row into zeros (_fused_kernel carries it past them), and the explicit path below zeroes a
    # fully masked row whatever its query holds.
    if score in FUSABLE_SCORES and not return_weights:
        q, k = _bilinear_query(q, k, score, w)
        # The fused kernels need a unit stride in the last dim; views of NCHW maps or transposed
        # features lack it, and SDPA then silently takes its quadratic-memory math path.
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # each a no-op where unit-stride
        fused_scale = _default_scale(score, q.shape[-1], scale)  # from the true width, before padding
        width_qk, width_v = q.shape[-1], v.shape[-1]
        # The flash kernels need one head width for q, k and v; with two, SDPA silently takes its
        # quadratic math path. Zero columns change neither the scores nor the kept output columns.
        if width_qk > width_v:
            v = F.pad(v, (0, width_qk - width_v))
        elif width_v > width_qk:
            q, k = F.pad(q, (0, width_v - width_qk)), F.pad(k, (0, width_v - width_qk))
        # causal alone: the kernel's own causal mode, without forming an N x N bool mask
        kernel_causal = causal and mask is None and n_q == n_k
        mask = None if kernel_causal else merge_masks(mask, causal, n_q, n_k, q.device)
        lead = _lead_shape(q, k, v)
        q4, k4, v4, mask4 = _as_4d(q, k, v, mask, lead)
        out = _fused_kernel(q4, k4, v4, mask4, kernel_causal, dropout_p, fused_scale)
        if out.shape[:-2] != lead:
            out = out.reshape(*lead, n_q, v.shape[-1])  # (B', H', N_q, D) -> (..., N_q, D)
        out = out[..., :width_v] if v.shape[-1] != width_v else out
        return Attended(out, None)

    query_nan = _nan_carrier(q)  # (..., N_q, 1)
    weights = attention_weights(
        q,
        k,
        score=score,
        mask=mask,
        causal=causal,
        scale=scale,
        w=w,
        w_q=w_q,
        w_k=w_k,
        v_a=v_a,
        b_a=b_a,
    )
    dropped = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    out = dropped.to(v.dtype) @ v  # (..., N_q, N_k) @ (..., N_k, D_v) -> (..., N_q, D_v)
    return Attended(_carry_nan(out, query_nan), weights if return_weights else None)


def _attend_node(q: Tensor, k: Tensor, v: Tensor, **kwargs: object) -> tuple[Tensor, Tensor | None]:
    """:func:`attend_with_weights` as a plain tuple, a leaf function for ``torch.fx``."""
    return tuple(attend_with_weights(q, k, v, **kwargs))  # type: ignore[arg-type,return-value]


fx.wrap("_attend_node")


@overload
def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    score: Score = ...,
    mask: Tensor | None = ...,
    causal: bool = ...,
    dropout_p: float = ...,
    scale: float | None = ...,
    return_weights: Literal[False] = ...,
    w: Tensor | None = ...,
    w_q: Tensor | None = ...,
    w_k: Tensor | None = ...,
    v_a: Tensor | None = ...,
    b_a: Tensor | None = ...,
) -> Tensor: ...


@overload
def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    score: Score = ...,
    mask: Tensor | None = ...,
    causal: bool = ...,
    dropout_p: float = ...,
    scale: float | None = ...,
    return_weights: Literal[True],
    w: Tensor | None = ...,
    w_q: Tensor | None = ...,
    w_k: Tensor | None = ...,
    v_a: Tensor | None = ...,
    b_a: Tensor | None = ...,
) -> tuple[Tensor, Tensor]: ...


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    score: Score = "scaled_dot",
    mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
    w: Tensor | None = None,
    w_q: Tensor | None = None,
    w_k: Tensor | None = None,
    v_a: Tensor | None = None,
    b_a: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Soft addressing: ``out_i = sum_j softmax_j(score(q_i, k_j) * scale) v_j``.

    Args:
        q: queries (..., N_q, D_q).
        k: keys (..., N_k, D_k).
        v: values (..., N_k, D_v).
        score: one of ``dot``, ``scaled_dot``, ``cosine``, ``general``, ``additive``, ``concat``.
        mask: bool (True = may attend) or additive float, broadcastable to (..., N_q, N_k), on the
            device of ``q``. Keys that no query may attend to are padding: whatever they hold
            (even NaN or Inf) never reaches an output.
        causal: query i may only attend to keys at or before its position; queries are aligned
            with the end of the keys (see :func:`causal_mask`).
        dropout_p: dropout on the attention weights; the caller passes 0.0 in eval mode.
        scale: multiplies the score; default 1/sqrt(D_k) for ``scaled_dot``, 1 otherwise.
        return_weights: also return the weights (before dropout). Forces the explicit path.
        w, w_q, w_k, v_a, b_a: the score's parameters (module docstring).

    Returns:
        ``out`` (..., N_q, D_v), or ``(out, weights)`` with weights (..., N_q, N_k). A NaN or Inf
        query gives a NaN output row on both paths. Callers that pass ``return_weights`` through
        use :func:`attend_with_weights`, which has one return type.

    Shape:
        Leading dims of q, k, v (batch, heads, ...) must be equal or broadcast.
    """
    result = attend_with_weights(
        q,
        k,
        v,
        score=score,
        mask=mask,
        causal=causal,
        dropout_p=dropout_p,
        scale=scale,
        return_weights=return_weights,
        w=w,
        w_q=w_q,
        w_k=w_k,
        v_a=v_a,
        b_a=b_a,
    )
    return (result.out, result.weights) if return_weights else result.out  # type: ignore[return-value]
