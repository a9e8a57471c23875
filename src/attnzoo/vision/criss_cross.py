"""Criss-cross attention (CCNet), with recurrence.

Huang et al. 2019, "CCNet: Criss-Cross Attention for Semantic Segmentation",
https://arxiv.org/abs/1811.11721.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input
from attnzoo.layers import reduced_width
from attnzoo.registry import Paper, image_input, register

__all__ = ["CrissCrossAttention", "criss_cross_attention"]


def criss_cross_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """One criss-cross aggregation: every position attends to its row and column.

    ``A_u = softmax_i(Q_u . K_i)`` over the H + W - 1 positions i in the column and the row of u
    (u itself once), and ``out_u = sum_i A_{i,u} V_i``. The row and column energies are two
    batched products, concatenated and normalised jointly; no HW x HW matrix is formed.

    Args:
        q, k: (B, C', H, W) queries and keys.
        v: (B, C, H, W) values.

    Returns:
        ``(out, weights)``: out (B, C, H, W) in the dtype of ``v``; weights (B, H, W, H + W) as
        laid out in :class:`CrissCrossAttention` (float32 for half-precision inputs).
    """
    height, width = q.shape[-2], q.shape[-1]
    if q.dtype in (torch.float16, torch.bfloat16):
        # Unscaled logits overflow fp16 quickly and bf16 rounds the softmax coarsely: work in fp32.
        q, k, v_work = q.float(), k.float(), v.float()
    else:
        v_work = v
    # column term: e_col[b, i, j, i'] = Q(i, j) . K(i', j)  -> (B, H, W, H)
    e_col = torch.einsum("bcij,bckj->bijk", q, k)
    # row term: e_row[b, i, j, j'] = Q(i, j) . K(i, j')  -> (B, H, W, W)
    e_row = torch.einsum("bcij,bcik->bijk", q, k)
    # The centre u lies in both its row and its column: count it once (in the row term), as the
    # paper's H + W - 1 keys and the official code's -inf diagonal do.
    centre = torch.eye(height, dtype=torch.bool, device=q.device).unsqueeze(1)  # (H, 1, H)
    e_col = e_col.masked_fill(centre, float("-inf"))
    weights = torch.softmax(torch.cat([e_col, e_row], dim=-1), dim=-1)  # (B, H, W, H + W)
    a_col, a_row = weights.split([height, width], dim=-1)
    out = torch.einsum("bijk,bckj->bcij", a_col, v_work) + torch.einsum("bijk,bcik->bcij", a_row, v_work)
    return out.to(v.dtype), weights


@register(
    "criss_cross",
    family="non_local",
    paper=Paper("CCNet: Criss-Cross Attention for Semantic Segmentation", "1811.11721"),
    equation="A_u = softmax_i(Q_u . K_i) over the H+W-1 positions i in the row and column of u; "
    "H'_u = gamma * sum_i A_{i,u} V_i + H_u; applied R = 2 times with the same weights",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(R B HW (H + W) C); memory O(B HW (H + W) + B C HW): no HW x HW matrix",
    notes="gamma=False drops the learnable scale (the paper's Eq. 2 adds the context unscaled); "
    "the RCCA segmentation head (3x3 convs around it, concat, bottleneck) is not part of the module",
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
        if channels <= 0:
            raise ValueError(f"channels: expected a positive count, got {channels}")
        if recurrence < 1:
            raise ValueError(f"recurrence: expected at least 1, got {recurrence}")
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
        if self.gamma is not None:
            context = self.gamma * context
        return context + x, weights

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels)
        out, weights = self.step(x)
        for _ in range(self.recurrence - 1):  # R passes of the SAME weights, not a loop over positions
            out, weights = self.step(out)
        return (out, weights) if return_attn else out
