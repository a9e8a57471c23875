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


def _joint_softmax(q: Tensor, k: Tensor) -> Tensor:
    """Row and column energies of every position, softmaxed jointly: (B, H, W, H + W)."""
    batch, height, width = q.shape[0], q.shape[-2], q.shape[-1]
    # row energies e_row[b, i, j, j'] = Q(i, j) . K(i, j'): (B, H, W, C') @ (B, H, C', W)
    e_row = torch.matmul(q.permute(0, 2, 3, 1), k.permute(0, 2, 1, 3))  # (B, H, W, W)
    # column energies e_col[b, j, i, i'] = Q(i, j) . K(i', j), batched over the columns:
    # (B, C', H, W) -> (B, W, H, C') -> (B*W, H, C') and (B, C', H, W) -> (B, W, C', H) -> (B*W, C', H)
    q_cols = q.permute(0, 3, 2, 1).reshape(batch * width, height, q.shape[1])
    k_cols = k.permute(0, 3, 1, 2).reshape(batch * width, k.shape[1], height)
    # The centre u lies in both its row and its column: count it once (in the row term), as the
    # paper's H + W - 1 keys and the official code's -inf diagonal do. The -inf diagonal is the
    # GEMM's initial value (baddbmm): no pass of its own over the energies (a masked_fill costs 2x
    # more; an in-place fill of the diagonal is cheaper still but breaks torch.export).
    eye = torch.eye(height, dtype=torch.bool, device=q.device)
    centre = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(eye, float("-inf"))  # (H, H)
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

    Every product is a batched GEMM on operands laid out for it (rows batched over (B, H),
    columns over (B, W)); the joint softmax runs on one contiguous (B, H, W, H + W) buffer.

    Precision: for float16 and bfloat16 inputs the energies and the softmax run in float32, and
    only there: the logits are unscaled (no 1/sqrt(d)), so float16 overflows and bfloat16 rounds a
    logit of 50 by 0.25, which moves its weight by 28% (measured: 3x the output error of float32
    energies on the same bfloat16 weights). Only q and k (C' = C/8 channels) are upcast for it;
    the weights are cast back to the input's dtype to meet v, and the aggregation stays in v's
    dtype (a convex combination of values, accumulated in float32 inside the GEMM).

    Args:
        q, k: (B, C', H, W) queries and keys.
        v: (B, C, H, W) values.

    Returns:
        ``(out, weights)``: out (B, C, H, W) in the dtype of ``v``; weights (B, H, W, H + W) as
        laid out in :class:`CrissCrossAttention` (float32 for half-precision inputs).
    """
    height = q.shape[-2]
    dtype = compute_dtype(q.dtype)
    weights = _joint_softmax(q.to(dtype), k.to(dtype))  # (B, H, W, H + W)
    attn = weights.to(v.dtype)
    # out_col[b, j, c, i] = sum_i' V(c, i', j) A(i, j; i', j): (B, W, C, H') @ (B, W, H', H); v
    # copied to (B, W, C, H) first, as no stride of its (C, H') slices is 1
    v_cols = v.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W) -> (B, W, C, H)
    out_col = torch.matmul(v_cols, attn[..., :height].permute(0, 2, 3, 1))  # (B, W, C, H)
    del v_cols  # a full-size buffer: free it before the row product
    # out_row[b, i, c, j] = sum_j' V(c, i, j') A(i, j; i, j'): (B, H, C, W') @ (B, H, W', W)
    out_row = torch.matmul(v.permute(0, 2, 1, 3), attn[..., height:].transpose(-1, -2))  # (B, H, C, W)
    # (B, H, C, W) -> (B, C, H, W) and (B, W, C, H) -> (B, C, H, W)
    return out_row.permute(0, 2, 1, 3) + out_col.permute(0, 2, 3, 1), weights


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

    def step(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One criss-cross pass: ``(H', weights)``."""
        context, weights = criss_cross_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x))
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
