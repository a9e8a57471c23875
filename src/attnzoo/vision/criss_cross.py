"""Criss-cross attention (CCNet), with recurrence.

Huang et al. 2019, "CCNet: Criss-Cross Attention for Semantic Segmentation",
https://arxiv.org/abs/1811.11721.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.softmax import compute_dtype
from attnzoo.layers import reduced_width
from attnzoo.registry import Paper, Sample, image_input, register

__all__ = ["CrissCrossAttention", "criss_cross_attention"]


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

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, t: Tensor) -> Tensor:  # type: ignore[override]
        return t.view_as(t)

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
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    if t.dtype not in (torch.bfloat16, torch.float16):
        return t  # float32 and float64 GEMMs take the strided gradient as fast: no copy
    if not t.requires_grad or torch.compiler.is_compiling() or exporting or torch.jit.is_tracing():
        return t
    return _CompactGradient.apply(t)  # type: ignore[no-any-return]


def _joint_softmax(q: Tensor, k: Tensor, dtype: torch.dtype) -> Tensor:
    """Row and column energies of every position in ``dtype``, softmaxed jointly: (B, H, W, H + W)."""
    batch, height, width = q.shape[0], q.shape[-2], q.shape[-1]

    def laid_out(t: Tensor, *dims: int) -> Tensor:
        return _contiguous_as(t.permute(*dims), dtype)

    # row energies e_row[b, i, j, j'] = Q(i, j) . K(i, j'): (B, H, W, C') @ (B, H, C', W)
    q_rows = laid_out(q, 0, 2, 3, 1)  # (B, C', H, W) -> (B, H, W, C')
    e_row = torch.matmul(q_rows, laid_out(k, 0, 2, 3, 1).transpose(-1, -2))  # (B, H, W, W)
    # column energies e_col[b, j, i, i'] = Q(i, j) . K(i', j), batched over the columns:
    # (B, C', H, W) -> (B, W, H, C') -> (B*W, H, C'), and K the same, transposed to (B*W, C', H)
    q_cols = laid_out(q, 0, 3, 2, 1).view(batch * width, height, q.shape[1])
    k_cols = laid_out(k, 0, 3, 2, 1).view(batch * width, height, k.shape[1]).transpose(1, 2)
    # The centre u lies in both its row and its column: count it once (in the row term), as the
    # paper's H + W - 1 keys and the official code's -inf diagonal do. The -inf diagonal is the
    # GEMM's initial value (baddbmm): no pass of its own over the energies (a masked_fill costs 2x
    # more; an in-place fill of the diagonal is cheaper still but breaks torch.export).
    eye = torch.eye(height, dtype=torch.bool, device=q.device)
    centre = torch.zeros((), dtype=dtype, device=q.device).masked_fill(eye, float("-inf"))  # (H, H)
    e_col = torch.baddbmm(centre, q_cols, k_cols)  # (B*W, H, H)
    # (B*W, H, H) -> (B, W, H, H) -> (B, H, W, H): beside the row energies, in one contiguous buffer.
    # No masked_softmax: nothing is masked beyond the diagonal (every row keeps its H + W - 1
    # keys), and the energies are already in float32 for half-precision inputs.
    return torch.softmax(torch.cat([e_col.view(batch, width, height, height).transpose(1, 2), e_row], -1), -1)


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
    (a convex combination of values, accumulated in float32 inside the GEMM).

    Args:
        q, k: (B, C', H, W) queries and keys.
        v: (B, C, H, W) values.

    Returns:
        ``(out, weights)``: out (B, C, H, W) in the dtype of ``v``; weights (B, H, W, H + W) as
        laid out in :class:`CrissCrossAttention` (float32 for half-precision inputs).
    """
    height = q.shape[-2]
    weights = _joint_softmax(q, k, compute_dtype(q.dtype))  # (B, H, W, H + W)
    # column weights A(i, j; i', j) as (B, W, H, H') with i contiguous: (B, H, W, H') -> (B, W, H', H)
    # (copied in half precision, a view otherwise), then viewed back as (B, W, H, H')
    attn_col = _aggregation_weights(weights[..., :height].permute(0, 2, 3, 1), v.dtype)
    # out_col[b, j, i, c] = sum_i' A(i, j; i', j) V(c, i', j): (B, W, H, H') @ (B, W, H', C)
    out_col = _compact_gradient(
        torch.matmul(attn_col.transpose(-1, -2), v.permute(0, 3, 2, 1))
    )  # (B, W, H, C)
    del attn_col
    # row weights A(i, j; i, j') as (B, H, W, W') with j contiguous: (B, H, W, W') -> (B, H, W', W)
    attn_row = _aggregation_weights(weights[..., height:].transpose(-1, -2), v.dtype)
    # out_row[b, i, j, c] = sum_j' A(i, j; i, j') V(c, i, j'): (B, H, W, W') @ (B, H, W', C)
    out_row = _compact_gradient(
        torch.matmul(attn_row.transpose(-1, -2), v.permute(0, 2, 3, 1))
    )  # (B, H, W, C)
    # (B, H, W, C) -> (B, C, H, W) and (B, W, H, C) -> (B, C, H, W)
    return out_row.permute(0, 3, 1, 2) + out_col.permute(0, 3, 2, 1), weights


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
        bfloat16, and float32 gains too (one GEMM instead of three).
        """
        batch, _, height, width = x.shape
        convs = (self.query_conv, self.key_conv, self.value_conv)
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

    def step(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One criss-cross pass: ``(H', weights)``."""
        context, weights = criss_cross_attention(*self.project(x))
        # x first: the result takes x's (B, C, H, W) layout, not the context's permuted one
        if self.gamma is not None:
            return torch.addcmul(x, self.gamma, context), weights  # x + gamma * context, one pass
        return x + context, weights

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        out, weights = self.step(x)
        for _ in range(self.recurrence - 1):  # R passes of the SAME weights, not a loop over positions
            del weights  # the previous pass's map would stay alive through the next pass
            out, weights = self.step(out)
        return (out, weights) if return_attn else out
