"""Criss-cross attention (CCNet), with recurrence.

Huang et al. 2019, "CCNet: Criss-Cross Attention for Semantic Segmentation",
https://arxiv.org/abs/1811.11721.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from attnzoo._checks import autocast_enabled, check_input, check_positive, parameter_dtype
from attnzoo._tracing import is_eager
from attnzoo.functional.softmax import compute_dtype
from attnzoo.layers import plain_layer, reduced_width
from attnzoo.registry import Paper, Sample, image_input, register

__all__ = ["CrissCrossAttention", "criss_cross_attention", "criss_cross_context"]


def _contiguous_as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, contiguous in its logical order, in one copy (the cast writes the layout).

    ``Tensor.to(dtype, memory_format=...)`` returns ``t`` itself when the dtype already matches,
    whatever its strides: ``.contiguous()`` then makes the copy (and is free after a cast).
    """
    return t.to(dtype, memory_format=torch.contiguous_format).contiguous()


class _CompactGradient(torch.autograd.Function):
    """The identity, whose backward makes the incoming gradient contiguous in the tensor's layout.

    The aggregation's outputs are channels-last, but their gradient arrives as a permuted view of
    the block's (B, C, H, W) gradient, with a leading dimension of H*W in every (W, C) or (H, C)
    slice; the product's backward GEMMs on such operands ran 3-7x slower (bfloat16 without native
    support: 71 ms against 10 ms at 64 x 64) than on one compact copy.
    """

    generate_vmap_rule = True  # torch.func's vmap and grad compose with it

    @staticmethod
    def forward(t: Tensor) -> Tensor:  # type: ignore[override]
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
        pass  # nothing to keep: the backward only copies the gradient

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


def _aggregation_weights(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The aggregation's weights ``t`` in ``dtype``: a compact copy in half precision (the cast makes
    one anyway, and emulated bfloat16 GEMMs run 5-30x faster on it), a view otherwise (float32 GEMMs
    barely care, and a copy would be two more (B, H, W, H) buffers kept for the backward)."""
    return t if t.dtype == dtype else _contiguous_as(t, dtype)


def _compact_gradient(t: Tensor) -> Tensor:
    """``t``; in eager training its gradient is copied compact first (see :class:`_CompactGradient`).

    Traced, compiled and exported graphs see ``t`` itself.
    """
    if t.dtype not in (torch.bfloat16, torch.float16):
        return t  # float32 and float64 GEMMs take the strided gradient as fast: no copy
    if not t.requires_grad or not is_eager(t):
        return t
    return _CompactGradient.apply(t)  # type: ignore[no-any-return]


def _energy_operands(q: Tensor, k: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q and k in ``dtype``, laid out for the row and the column products.

    Returns ``(q_rows, k_rows, q_cols, k_cols)``: the rows batched over (B, H), (B, H, W, C'); the
    columns batched over (B, W), (B*W, H, C'). Where q and k already have the dtype and their
    channels contiguous (channels-last views of :meth:`CrissCrossAttention.project`'s buffer),
    these are views wherever the batch dimensions merge (the rows always, the columns when B = 1):
    a GEMM reads a strided operand as fast, and a copy would be kept for the backward (2 MiB per
    pass at (1, 64, 128^2) in float32 training). Otherwise one copy each, which the cast to
    ``dtype`` makes anyway.
    """
    batch, height, width = q.shape[0], q.shape[-2], q.shape[-1]

    def laid_out(t: Tensor, *dims: int) -> Tensor:
        t = t.permute(*dims)
        return t if t.dtype == dtype and t.stride(-1) == 1 else _contiguous_as(t, dtype)

    # (B, C', H, W) -> (B, H, W, C')
    q_rows, k_rows = laid_out(q, 0, 2, 3, 1), laid_out(k, 0, 2, 3, 1)
    # (B, C', H, W) -> (B, W, H, C') -> (B*W, H, C'): a view when (B, W) merge, a copy otherwise
    q_cols = laid_out(q, 0, 3, 2, 1).reshape(batch * width, height, q.shape[1])
    k_cols = laid_out(k, 0, 3, 2, 1).reshape(batch * width, height, k.shape[1])
    return q_rows, k_rows, q_cols, k_cols


def _centre(height: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(H, H): -inf on the diagonal, 0 elsewhere; the column product's initial value.

    The centre u lies in both its row and its column: count it once (in the row term), as the
    paper's H + W - 1 keys and the official code's -inf diagonal do. As the GEMM's initial value
    (baddbmm) it costs no pass of its own over the energies (a masked_fill costs 2x more; an
    in-place fill of the diagonal is cheaper still but breaks torch.export).
    """
    eye = torch.eye(height, dtype=torch.bool, device=device)
    return torch.zeros((), dtype=dtype, device=device).masked_fill(eye, float("-inf"))


def _joint_softmax(q: Tensor, k: Tensor, dtype: torch.dtype) -> Tensor:
    """Row and column energies of every position in ``dtype``, softmaxed jointly: (B, H, W, H + W)."""
    batch, height, width = q.shape[0], q.shape[-2], q.shape[-1]
    q_rows, k_rows, q_cols, k_cols = _energy_operands(q, k, dtype)
    # row energies e_row[b, i, j, j'] = Q(i, j) . K(i, j'): (B, H, W, C') @ (B, H, C', W)
    e_row = torch.matmul(q_rows, k_rows.transpose(-1, -2))  # (B, H, W, W)
    # column energies e_col[b, j, i, i'] = Q(i, j) . K(i', j), batched over the columns:
    # (B*W, H, C') @ (B*W, C', H), from the -inf diagonal
    e_col = torch.baddbmm(_centre(height, dtype, q.device), q_cols, k_cols.transpose(1, 2))  # (B*W, H, H)
    del q_rows, k_rows, q_cols, k_cols  # not alive through the softmax's buffers
    # (B*W, H, H) -> (B, W, H, H) -> (B, H, W, H): beside the row energies, in one contiguous buffer.
    # No masked_softmax: nothing is masked beyond the diagonal (every row keeps its H + W - 1
    # keys), and the energies are already in float32 for half-precision inputs.
    energies = torch.cat([e_col.view(batch, width, height, height).transpose(1, 2), e_row], -1)
    del e_col, e_row  # freed before the softmax's output is allocated
    return torch.softmax(energies, -1)


#: the half-precision path forms the float32 energies of a block of query rows at a time: about
#: this many elements per block, in at most _MAX_ROW_BLOCKS blocks. Each block costs a dozen small
#: operators (forward) and two dozen (backward): at (1, 64, 32, 32) eight blocks made bfloat16
#: training 40% slower than one (this gives two); from 64 x 64 on, eight blocks keep the float32
#: buffers of a block at a quarter of the bfloat16 weights (training peak 7.6 MiB at 64 x 64,
#: against 8.0 with four blocks and mmcv's 7.8).
_BLOCK_ELEMENTS = 2**15
_MAX_ROW_BLOCKS = 8


def _row_blocks(batch: int, height: int, width: int, device: torch.device) -> list[tuple[int, int]]:
    """``[start, stop)`` of the blocks of query rows covering ``range(height)``.

    One block off the CPU: the blocks keep the CPU's float32 buffers small, but on a GPU each
    block's dozen operators are launched one by one, and at these sizes the launches are the time
    (bfloat16 at (1, 64, 64^2) on an H200: 7.1 ms in eight blocks against mmcv's 1.45).
    """
    if device.type != "cpu":
        return [(0, height)]
    energies = batch * height * width * (height + width)
    blocks = max(1, min(_MAX_ROW_BLOCKS, height, -(-energies // _BLOCK_ELEMENTS)))
    size = -(-height // blocks)
    return [(start, min(start + size, height)) for start in range(0, height, size)]


class _HalfPrecisionCrissCross(torch.autograd.Function):
    """:func:`criss_cross_context` of half-precision q, k and v: the weights formed in float32 and
    kept in v's dtype only, the backward in blocks of query rows.

    The forward is :func:`_half_precision_weights` and :func:`_aggregate`; it saves q, k and v
    (views of the projection, alive anyway) and the two weight maps in v's dtype (what the
    aggregation's products would save): no float32 softmax output is kept. The backward never
    forms the whole gradient of the weights either: for one block of query rows at a time it forms
    that block's gradient of the weights (the products of the compact gradient with v, in v's
    dtype as autograd's would be), upcasts it to float32 for ``p * (g - sum(p * g))`` (the sum
    joint over the row and the column) and the products for q and k. The values' gradient is the
    column product (one GEMM, the whole map) plus the rows' products block by block. Against
    autograd on the float32 softmax, the weights read in the backward are rounded to v's dtype
    (relative 2^-9 in bfloat16); their gradient already was.
    """

    generate_vmap_rule = True  # torch.func's vmap and grad compose with it

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        attn_col, attn_row = _half_precision_weights(q, k, v.dtype)
        # the weights are outputs only so that setup_context can keep them (new-style Functions
        # save intermediates that way, which torch.func's transforms need)
        return _aggregate(attn_col, attn_row, v), attn_col, attn_row

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        _, attn_col, attn_row = output
        ctx.mark_non_differentiable(attn_col, attn_row)
        ctx.set_materialize_grads(False)  # None for the weights' gradients, not two zero-filled maps
        ctx.save_for_backward(*inputs, attn_col, attn_row)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor, _grad_col: None, _grad_row: None
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, attn_col, attn_row = ctx.saved_tensors  # type: ignore[attr-defined]
        batch, inner, height, width = q.shape
        f32 = compute_dtype(q.dtype)  # float32 (float64 in the tests: the same code checked against autograd)
        # v as the aggregation reads it: (B, C, H, W) -> (B, W, H', C) and (B, H, W', C), views
        v_cols, v_rows = v.permute(0, 3, 2, 1), v.permute(0, 2, 3, 1)
        with torch.autocast(q.device.type, enabled=False) if autocast_enabled(q.device) else nullcontext():
            # the values' gradient from the columns, sum_i A(i, j; i', j) G(c, i, j), one GEMM on
            # the compact gradient: (B, C, H, W) -> (B, W, H, C); (B, W, H', H) @ (B, W, H, C)
            grad_v = torch.matmul(attn_col, _contiguous_as(grad.permute(0, 3, 2, 1), grad.dtype))
            # every key of every column: (B, C', H, W) -> (B, W, H', C') -> (B*W, H', C')
            k_cols = _contiguous_as(k.permute(0, 3, 2, 1), f32).view(batch * width, height, inner)
            grad_k = torch.zeros_like(k_cols)  # (B*W, H', C'): every block adds to it
            grad_q = q.new_empty((batch, height, width, inner))  # (B, H, W, C'), in q's dtype
            for start, stop in _row_blocks(batch, height, width, q.device):
                rows = stop - start
                # this block's gradient, compact in both layouts: (B, C, rows, W) -> (B, W, rows, C)
                # and -> (B, rows, W, C)
                g_cols = _contiguous_as(grad[:, :, start:stop].permute(0, 3, 2, 1), grad.dtype)
                g_rows = _contiguous_as(grad[:, :, start:stop].permute(0, 2, 3, 1), grad.dtype)
                # the values' gradient from this block's rows: (B, rows, W', W) @ (B, rows, W, C),
                # added to the columns' (B, W, H', C) -> (B, H', W, C)
                grad_v.transpose(1, 2)[:, start:stop] += torch.matmul(attn_row[:, start:stop], g_rows)
                # the weights' gradient G . V, each query's keys contiguous, in float32: (B, W, rows, C)
                # @ (B, W, C, H') -> (B, W, rows, H'), and (B, rows, W, C) @ (B, rows, C, W') ->
                # (B, rows, W, W')
                d_col = torch.matmul(g_cols, v_cols.transpose(-1, -2)).to(f32)
                d_row = torch.matmul(g_rows, v_rows[:, start:stop].transpose(-1, -2)).to(f32)
                del g_cols, g_rows
                # softmax backward, p * g - p * sum(p * g), the sum joint over i' and j', in place in
                # float32 (p promoted exactly from its dtype); p as (B, W, H', rows) ->
                # (B, W, rows, H') and (B, rows, W', W) -> (B, rows, W, W'), views
                p_col = attn_col[..., start:stop].transpose(-1, -2)
                p_row = attn_row[:, start:stop].transpose(-1, -2)
                d_col, d_row = d_col.mul_(p_col), d_row.mul_(p_row)
                total = d_col.sum(-1).transpose(1, 2) + d_row.sum(-1)  # (B, W, rows) -> (B, rows, W)
                d_col = d_col.addcmul_(p_col, total.transpose(1, 2).unsqueeze(-1), value=-1)
                d_row = d_row.addcmul_(p_row, total.unsqueeze(-1), value=-1)
                del p_col, p_row
                # e_col[b, j, i, i'] = Q(i, j) . K(i', j): (B, W, rows, H') -> (B*W, rows, H')
                d_col = d_col.view(batch * width, rows, height)
                # this block's queries for the column products: (B, C', rows, W) -> (B, W, rows, C')
                # -> (B*W, rows, C')
                q_cols = _contiguous_as(q[:, :, start:stop].permute(0, 3, 2, 1), f32)
                grad_k.baddbmm_(d_col.transpose(1, 2), q_cols.view(batch * width, rows, inner))
                # (B*W, rows, H') @ (B*W, H', C') -> (B, W, rows, C')
                from_cols = torch.bmm(d_col, k_cols).view(batch, width, rows, inner)
                del d_col, q_cols
                # e_row[b, i, j, j'] = Q(i, j) . K(i, j'); this block's rows: (B, C', rows, W) ->
                # (B, rows, W, C')
                q_rows = _contiguous_as(q[:, :, start:stop].permute(0, 2, 3, 1), f32)
                k_rows = _contiguous_as(k[:, :, start:stop].permute(0, 2, 3, 1), f32)
                # (B, rows, W, W') @ (B, rows, W', C'), plus the column share (B, W, rows, C') ->
                # (B, rows, W, C'), cast into q's dtype
                from_rows = torch.matmul(d_row, k_rows)
                torch.add(from_rows, from_cols.transpose(1, 2), out=grad_q[:, start:stop])
                del from_rows, from_cols, k_rows
                # (B, rows, W', W) @ (B, rows, W, C') -> (B, rows, W', C'), added to the column
                # products' (B*W, H', C') -> (B, W, H', C') -> (B, H', W, C') in place
                from_rows = torch.matmul(d_row.transpose(-1, -2), q_rows)
                grad_k.view(batch, width, height, inner).transpose(1, 2)[:, start:stop] += from_rows
            # (B*W, H', C') -> (B, W, H', C') -> (B, H', W, C')
            grad_k = grad_k.view(batch, width, height, inner).transpose(1, 2)
        # (B, H, W, C') -> (B, C', H, W) and (B, W, H', C) -> (B, C, H', W)
        grad_k = grad_k.permute(0, 3, 1, 2).to(k.dtype)
        return grad_q.permute(0, 3, 1, 2), grad_k, grad_v.permute(0, 3, 2, 1)


def _half_precision_weights(q: Tensor, k: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The joint softmax's weights of half-precision q and k, formed in float32, kept in ``dtype``.

    Returns ``(attn_col, attn_row)`` in ``dtype``, laid out for the aggregation's GEMMs (queries
    contiguous): attn_col[b, j, i', i] = A(i, j; i', j), (B, W, H', H), and attn_row[b, i, j', j] =
    A(i, j; i, j'), (B, H, W', W). The joint softmax runs on the float32 energies of one block of
    query rows at a time, each query's keys contiguous, the row and the column parts with a shared
    max and sum (no concatenation); normalising writes the weights transposed and cast into the
    outputs. The float32 softmax output is never kept.
    """
    batch, _, height, width = q.shape
    f32 = compute_dtype(q.dtype)  # float32 (float64 in the tests: the same code checked against autograd)
    # (B, W, H', H) and (B, H, W', W): each query's weights along dim 2, the queries contiguous
    attn_col = q.new_empty((batch, width, height, height), dtype=dtype)
    attn_row = q.new_empty((batch, height, width, width), dtype=dtype)
    # the energies in float32 under autocast too
    with torch.autocast(q.device.type, enabled=False) if autocast_enabled(q.device) else nullcontext():
        q_rows, k_rows, q_cols, k_cols = _energy_operands(q, k, f32)
        centre = _centre(height, f32, q.device)  # (H, H')
        for start, stop in _row_blocks(batch, height, width, q.device):
            rows = stop - start
            # e_col[b, j, i, i'] = Q(i, j) . K(i', j): (B*W, rows, C') @ (B*W, C', H') from the -inf
            # diagonal -> (B, W, rows, H'); each query's keys contiguous for the softmax
            e_col = torch.baddbmm(centre[start:stop], q_cols[:, start:stop], k_cols.transpose(1, 2))
            e_col = e_col.view(batch, width, rows, height)
            # e_row[b, i, j, j'] = Q(i, j) . K(i, j'): (B, rows, W, C') @ (B, rows, C', W')
            e_row = torch.matmul(q_rows[:, start:stop], k_rows[:, start:stop].transpose(-1, -2))
            # the joint softmax over i' and j': one max and one sum per query (i, j), (B, rows, W)
            peak = torch.maximum(e_col.amax(-1).transpose(1, 2), e_row.amax(-1))
            e_col = e_col.sub_(peak.transpose(1, 2).unsqueeze(-1)).exp_()
            e_row = e_row.sub_(peak.unsqueeze(-1)).exp_()
            scale = (e_col.sum(-1).transpose(1, 2) + e_row.sum(-1)).reciprocal_()
            # normalised and cast in one pass, into the blocks' slices of the outputs, transposed:
            # (B, W, rows, H') -> (B, W, H', rows) and (B, rows, W, W') -> (B, rows, W', W)
            scale_col = scale.transpose(1, 2).unsqueeze(-1)  # (B, W, rows, 1)
            torch.mul(e_col, scale_col, out=attn_col[..., start:stop].transpose(-1, -2))
            torch.mul(e_row, scale.unsqueeze(-1), out=attn_row[:, start:stop].transpose(-1, -2))
    return attn_col, attn_row


def _aggregate(attn_col: Tensor, attn_row: Tensor, v: Tensor) -> Tensor:
    """``sum_i A_{i,u} V_i`` over u's column and row: (B, C, H, W) in the dtype of ``v``.

    attn_col (B, W, H', H) and attn_row (B, H, W', W), the queries contiguous (see
    :func:`criss_cross_attention`). Where the caller passes its last references (no autograd),
    attn_col is freed before the row product.
    """
    # out_col[b, j, i, c] = sum_i' A(i, j; i', j) V(c, i', j): (B, W, H, H') @ (B, W, H', C)
    out_col = _compact_gradient(
        torch.matmul(attn_col.transpose(-1, -2), v.permute(0, 3, 2, 1))
    )  # (B, W, H, C)
    del attn_col
    # out_row[b, i, j, c] = sum_j' A(i, j; i, j') V(c, i, j'): (B, H, W, W') @ (B, H, W', C)
    out_row = _compact_gradient(
        torch.matmul(attn_row.transpose(-1, -2), v.permute(0, 2, 3, 1))
    )  # (B, H, W, C)
    # (B, H, W, C) -> (B, C, H, W) and (B, W, H, C) -> (B, C, H, W)
    context, from_cols = out_row.permute(0, 3, 1, 2), out_col.permute(0, 3, 2, 1)
    needs_graph = torch.is_grad_enabled() and (context.requires_grad or from_cols.requires_grad)
    if needs_graph or not is_eager(context):
        return context + from_cols
    return context.add_(from_cols)  # no autograd: into out_row, one (B, C, H, W) buffer less at the peak


def criss_cross_context(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The output of :func:`criss_cross_attention` alone, without forming the (B, H, W, H + W) map.

    For half-precision inputs in eager mode the weights go through :class:`_HalfPrecisionCrissCross`:
    float32 energies and softmax one block of query rows at a time, the weights kept (and saved
    for the backward) in the input's dtype only. The output is that of
    :func:`criss_cross_attention` up to the float32 rounding of the softmax. Otherwise, and in
    traced, compiled and exported graphs, it is :func:`criss_cross_attention`'s output.
    """
    if q.dtype not in (torch.bfloat16, torch.float16) or not is_eager(q, k, v):
        return criss_cross_attention(q, k, v)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _HalfPrecisionCrissCross.apply(q, k, v)[0]  # type: ignore[no-any-return]
    return _aggregate(*_half_precision_weights(q, k, v.dtype), v)


def criss_cross_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """One criss-cross aggregation: every position attends to its row and column.

    ``A_u = softmax_i(Q_u . K_i)`` over the H + W - 1 positions i in the column and the row of u
    (u itself once), and ``out_u = sum_i A_{i,u} V_i``. The row and column energies are two
    batched products, concatenated and normalised jointly; no HW x HW matrix is formed.

    Every product is a batched GEMM on operands laid out for it (rows batched over (B, H), columns
    over (B, W)); the joint softmax runs on one contiguous (B, H, W, H + W) buffer. In the
    aggregation the weights are laid out with the queries contiguous and v with the channels
    contiguous (v as :meth:`CrissCrossAttention.project` gives it): where bfloat16 is emulated
    (AVX2 CPUs), PyTorch's bfloat16 GEMM runs 5-30x faster on this layout than on the others
    (measured at 64 x 64); float32 GEMMs barely care. The weights are copied once for it, a copy
    that the cast back to v's dtype makes anyway in half precision.

    Precision: for float16 and bfloat16 inputs the energies and the softmax run in float32, and
    only there: the logits are unscaled (no 1/sqrt(d)), so float16 overflows and bfloat16 rounds a
    logit of 50 by 0.25, which moves its weight by 28% (measured: 3x the output error of float32
    energies on the same bfloat16 weights). Only q and k (C' = C/8 channels) are upcast for it;
    the products of bfloat16 q and k are exact in float32, so this is the bfloat16 GEMM with
    float32 accumulation and a float32 result, which PyTorch offers on CPU only this way. The
    weights are cast back to the input's dtype to meet v, and the aggregation stays in v's dtype
    (a convex combination of values, accumulated in float32 inside the GEMM). The float32 map is
    formed because it is returned: :func:`criss_cross_context` gives the output alone with the
    same precision and without the map (what :class:`CrissCrossAttention` runs without
    ``return_attn``).

    Args:
        q, k: (B, C', H, W) queries and keys.
        v: (B, C, H, W) values.

    Returns:
        ``(out, weights)``: out (B, C, H, W) in the dtype of ``v``; weights (B, H, W, H + W) as
        laid out in :class:`CrissCrossAttention` (float32 for half-precision inputs).
    """
    height, width = q.shape[-2:]
    weights = _joint_softmax(q, k, compute_dtype(q.dtype))  # (B, H, W, H + W)
    # (B, H, W, H + W) -> (B, H, W, H') and (B, H, W, W'), views. One split, not two slices: its
    # backward writes both gradients into one (B, H, W, H + W) buffer, where each slice's backward
    # zero-fills a buffer of that size of its own (the peak of a (1, 64, 128^2) float32 training
    # step: 94 -> 86 MiB).
    col_part, row_part = weights.split([height, width], -1)
    # column weights A(i, j; i', j) with i contiguous: (B, H, W, H') -> (B, W, H', H); row weights
    # A(i, j; i, j') with j contiguous: (B, H, W, W') -> (B, H, W', W) (copied in half precision,
    # views otherwise)
    attn_col = _aggregation_weights(col_part.permute(0, 2, 3, 1), v.dtype)
    attn_row = _aggregation_weights(row_part.transpose(-1, -2), v.dtype)
    del col_part, row_part
    return _aggregate(attn_col, attn_row, v), weights


@register(
    "criss_cross",
    placement="stage",
    map_kind="criss_cross",
    linear_memory=True,
    family="non_local",
    paper=Paper("CCNet: Criss-Cross Attention for Semantic Segmentation", "1811.11721"),
    equation="A_u = softmax_i(Q_u . K_i) over the H+W-1 positions i in the row and column of u; "
    "H'_u = gamma * sum_i A_{i,u} V_i + H_u; applied R = 2 times with the same weights",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(R B HW (H + W) C); memory O(B HW (H + W) + B C HW): no HW x HW matrix",
    notes="gamma=False drops the learnable scale (the paper's Eq. 2 adds the context unscaled); "
    "the RCCA segmentation head (3x3 convs around it, concat, bottleneck) is not part of the module",
    samples=(
        Sample("recurrence=1", {"recurrence": 1}, description="one criss-cross pass"),
        Sample("gamma=False", {"gamma": False}, description="no learned residual scale"),
    ),
)
class CrissCrossAttention(nn.Module):
    """Recurrent criss-cross attention (RCCA): each position attends to its row and column.

    With ``Q = W_q H``, ``K = W_k H`` (C' = C/8 channels) and ``V = W_v H`` (C channels), 1x1
    convolutions with bias::

        d_{i,u} = Q_u . K_{i,u}              i over the H + W - 1 positions in u's row and column
        A_u     = softmax_i(d_{i,u})         (unscaled, the centre counted once)
        H'_u    = gamma * sum_i A_{i,u} V_{i,u} + H_u

    (paper Eqs. 1-2; ``gamma`` is the official code's learnable scale, zero at init, so the block
    starts as the identity). The same module is applied ``recurrence`` times (R = 2 in the paper):
    after two passes every position has gathered context from every other one.

    Args:
        channels: C.
        rd_ratio: C'/C for queries and keys (1/8 in the paper and the official code).
        rd_channels: C' directly, overriding ``rd_ratio``.
        rd_divisor: round C' to a multiple of this (1: exact C/8, never 0).
        recurrence: R, how many times the shared block is applied (paper: 2).
        gamma: learnable output scale (zero at init), as in the official code and the catalog;
            ``False`` adds the context unscaled, as the paper's Eq. 2 is written.

    Shape:
        - x: (B, C, H, W); output: the same.
        - attention (``return_attn``): the weights of the LAST recurrence, (B, H, W, H + W):
          ``[..., :H]`` are the weights of the column keys (i', j) for i' = 0..H-1, with the
          centre i' = i exactly 0 (it is counted in the row part); ``[..., H:]`` are the weights
          of the row keys (i, j') for j' = 0..W-1. Each (b, i, j) row sums to 1 over H + W - 1
          non-zero entries. Float32 for half-precision inputs.

    Memory in half precision: without ``return_attn`` no float32 map is formed (see
    :func:`criss_cross_context`): the energies are float32 one block of query rows at a time,
    and the weights are kept, for the aggregation and the backward, in the input's dtype. With
    ``return_attn`` the last pass forms the float32 map it returns.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 8,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        recurrence: int = 2,
        *,
        gamma: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        check_positive(recurrence=recurrence)
        self.channels, self.recurrence = channels, recurrence
        self.inner_channels = reduced_width(channels, rd_ratio, rd_channels, rd_divisor)
        factory = {"device": device, "dtype": dtype}
        self.query_conv = nn.Conv2d(channels, self.inner_channels, 1, **factory)
        self.key_conv = nn.Conv2d(channels, self.inner_channels, 1, **factory)
        self.value_conv = nn.Conv2d(channels, channels, 1, **factory)
        self.gamma = nn.Parameter(torch.zeros(1, **factory)) if gamma else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.gamma is not None:
            nn.init.zeros_(self.gamma)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inner_channels={self.inner_channels}, "
            f"recurrence={self.recurrence}, gamma={self.gamma is not None}"
        )

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K and V of ``x`` (B, C, H, W), each (B, C_out, H, W), viewed from one channels-last
        buffer.

        The three 1x1 convolutions run as one GEMM of the stacked weights, (B, HW, C) @
        (C, 2C' + C): one pass over x instead of three, and channels contiguous in the result,
        which the criss-cross products read directly. The operands are laid out for the GEMM
        (positions contiguous in x's NCHW view, output channels contiguous in the weight): a
        bfloat16 1x1 convolution on NCHW runs 20x slower than this on CPUs without native
        bfloat16, and float32 gains too (one GEMM instead of three). A projection with hooks, or
        replaced by another module, runs as itself (and then each of the three does).
        """
        batch, _, height, width = x.shape
        convs = (self.query_conv, self.key_conv, self.value_conv)
        if not (
            plain_layer(convs[0], nn.Conv2d)
            and plain_layer(convs[1], nn.Conv2d)
            and plain_layer(convs[2], nn.Conv2d)
        ):
            # a hooked or replaced projection runs as itself: (B, C_out, H, W) each
            return convs[0](x), convs[1](x), convs[2](x)
        weight = torch.cat([conv.weight for conv in convs]).flatten(1)  # (2C' + C, C, 1, 1) -> (2C' + C, C)
        bias = torch.cat([conv.bias for conv in convs])  # (2C' + C,)
        # (B, C, H, W) -> (B, HW, C), a view; @ (C, 2C' + C) contiguous -> (B, HW, 2C' + C)
        qkv = torch.baddbmm(bias, x.flatten(2).transpose(1, 2), weight.t().contiguous().expand(batch, -1, -1))
        # (B, HW, 2C' + C) -> (B, H, W, 2C' + C) -> three (B, H, W, C_out) -> (B, C_out, H, W) views
        parts = qkv.view(batch, height, width, weight.shape[0]).split(
            [self.inner_channels, self.inner_channels, self.channels], -1
        )
        q, k, v = (part.permute(0, 3, 1, 2) for part in parts)
        return q, k, v

    def step(self, x: Tensor, *, need_weights: bool = True) -> tuple[Tensor, Tensor | None]:
        """One criss-cross pass: ``(H', weights)``; weights None unless ``need_weights``.

        Without the weights, half-precision inputs take :func:`criss_cross_context`'s path, which
        never forms the float32 (B, H, W, H + W) map.
        """
        q, k, v = self.project(x)
        if need_weights:
            context, weights = criss_cross_attention(q, k, v)
        else:
            context, weights = criss_cross_context(q, k, v), None
        del q, k, v
        # x first: the result takes x's (B, C, H, W) layout, not the context's permuted one
        if self.gamma is not None:
            return torch.addcmul(x, self.gamma, context), weights  # x + gamma * context, one pass
        return x + context, weights

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        out = x
        for last in [False] * (self.recurrence - 1) + [True]:  # R passes of the SAME weights
            # only the last pass's map is returned: the others are never formed
            out, weights = self.step(out, need_weights=return_attn and last)
        return (out, weights) if return_attn else out  # type: ignore[return-value]
