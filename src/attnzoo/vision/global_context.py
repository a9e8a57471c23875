"""GC block: global context block (simplified non-local pooling + SE-like transform).

Cao et al. 2019, "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
https://arxiv.org/abs/1904.11492.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input
from attnzoo.layers import LayerSpec, create_layer, reduced_width
from attnzoo.registry import Paper, image_input, register

__all__ = ["GlobalContext"]

Pooling = Literal["att", "avg"]
Fusion = Literal["add", "scale"]


@register(
    "gc",
    family="gating",
    paper=Paper("GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", "1904.11492"),
    equation="z_i = x_i + W_v2 relu(LN(W_v1 sum_j softmax_j(W_k x_j) x_j)), W_v1: C -> C/r, "
    "W_v2: C/r -> C, r = 16, W_v2 zero-initialised",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B C HW + B C^2 / r); memory O(B C HW) (no HW x HW map)",
    notes="fusion='scale' is the official code's multiplicative 'channel_mul' (x * sigmoid(.)); "
    "pooling='avg' replaces the attention pooling by global average pooling (the paper's ablation)",
)
class GlobalContext(nn.Module):
    """Global context block: attention pooling to one context vector, a bottleneck transform, add.

    ``z_i = x_i + W_v2 ReLU(LN(W_v1 sum_j alpha_j x_j))`` with
    ``alpha_j = exp(W_k x_j) / sum_m exp(W_k x_m)`` (paper eq. 3): one softmax over all H*W
    positions (a single query-independent map, the simplified non-local block), then
    W_v1: C -> C/r, LayerNorm, ReLU, W_v2: C/r -> C (r = 16), and a broadcast addition to every
    position. W_v2 is zero-initialised so the block starts as the identity. In a ResNet it goes on
    the residual branch after the last 1x1 conv, before the addition.

    W_k has no bias: a constant added to every logit cancels in the softmax (the official code has
    one; it never receives a gradient). The pooling runs as one (C x HW) @ (HW x 1) product per
    image on the NCHW layout; it is not routed through :func:`attnzoo.functional.attend`, which
    would need a transposed (B, HW, C) copy of x for a single query (twice as slow here). The
    softmax runs in float32 for half-precision inputs.

    Args:
        channels: C.
        rd_ratio: 1/r, the transform's bottleneck ratio (paper: 1/16).
        rd_channels: the bottleneck width, overriding ``rd_ratio``.
        rd_divisor: round the bottleneck to a multiple of this (1 = floor of C/r).
        pooling: ``"att"`` (paper: softmax attention pooling) or ``"avg"`` (global average pooling,
            the paper's ablation / the official ``pooling_type='avg'``; no W_k).
        fusion: ``"add"`` (paper: z = x + transform) or ``"scale"`` (the official code's
            ``channel_mul``: z = x * sigmoid(transform), SE-like).
        layer_norm: the LayerNorm in the transform (paper: yes; it eases optimisation).
        act_layer: the transform's activation (default ReLU).
        bias: biases in W_v1 and W_v2 (the official 1x1 convs have them).

    Shape:
        - x: (B, C, H, W); output: the same.
        - attention (``return_attn``): ``{"position": alpha (B, 1, H, W), summing to 1 over H*W
          (uniform for ``pooling="avg"``), "channel": the transformed context (B, C, 1, 1), i.e.
          the added term for ``"add"`` or the gate for ``"scale"``}``.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        *,
        pooling: Pooling = "att",
        fusion: Fusion = "add",
        layer_norm: bool = True,
        act_layer: LayerSpec = "relu",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels: expected a positive count, got {channels}")
        if pooling not in ("att", "avg"):
            raise ValueError(f"pooling: expected 'att' or 'avg', got {pooling!r}")
        if fusion not in ("add", "scale"):
            raise ValueError(f"fusion: expected 'add' or 'scale', got {fusion!r}")
        self.channels, self.pooling, self.fusion = channels, pooling, fusion
        width = reduced_width(channels, rd_ratio, rd_channels, rd_divisor)
        if layer_norm and width == 1 and rd_channels is None:
            # NOTE: LayerNorm over a single unit outputs its bias whatever the input (x - mean = 0),
            # which would cut the context off entirely; small C (C < 32 at r = 16) gets 2 units.
            width = 2
        self.rd_channels = width
        factory = {"device": device, "dtype": dtype}
        self.key = nn.Linear(channels, 1, bias=False, **factory) if pooling == "att" else None
        self.fc1 = nn.Linear(channels, width, bias=bias, **factory)
        self.norm = nn.LayerNorm(width, **factory) if layer_norm else nn.Identity()
        self.act = create_layer(act_layer, argument="act_layer")
        self.fc2 = nn.Linear(width, channels, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: W_k Kaiming-normal (fan_in), W_v2 (weight and bias) zero."""
        if self.key is not None:
            nn.init.kaiming_normal_(self.key.weight, mode="fan_in", nonlinearity="relu")
        self.fc1.reset_parameters()
        if isinstance(self.norm, nn.LayerNorm):
            self.norm.reset_parameters()
        nn.init.zeros_(self.fc2.weight)
        if self.fc2.bias is not None:
            nn.init.zeros_(self.fc2.bias)

    def pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The context vector sum_j alpha_j x_j, (B, C), and the pooling weights alpha, (B, HW)."""
        flat = x.flatten(2)  # (B, C, H, W) -> (B, C, HW)
        if self.key is None:
            context = flat.mean(dim=-1)
            weights = torch.full_like(flat[:, 0], 1.0 / flat.shape[-1])  # (B, HW), uniform
            return context, weights
        # W_k x_j for every position, as a 1x1 conv: (B, C, HW) -> (B, 1, HW) -> (B, HW). NOTE: not
        # matmul(W_k, flat), which folds to one (B*HW, C) product and copies a transposed x first.
        logits = F.conv1d(flat, self.key.weight.unsqueeze(-1)).squeeze(1)
        compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
        weights = torch.softmax(logits, dim=-1, dtype=compute_dtype)
        # (B, C, HW) @ (B, HW, 1) -> (B, C, 1) -> (B, C)
        context = torch.matmul(flat, weights.to(x.dtype).unsqueeze(-1)).squeeze(-1)
        return context, weights

    def transform(self, context: Tensor) -> Tensor:
        """W_v2 ReLU(LN(W_v1 c)), (B, C) -> (B, C)."""
        return self.fc2(self.act(self.norm(self.fc1(context))))

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        check_input(x, "x", "B C H W", C=self.channels)
        context, weights = self.pool(x)
        term = self.transform(context)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        if self.fusion == "add":
            out = x + term
        else:
            term = torch.sigmoid(term)
            out = x * term
        if return_attn:
            # (B, HW) -> (B, 1, H, W)
            position = weights.view(weights.shape[0], 1, *x.shape[2:])
            return out, {"position": position, "channel": term}
        return out
