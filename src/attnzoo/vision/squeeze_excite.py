"""Squeeze-and-excitation.

Hu et al. 2018, "Squeeze-and-Excitation Networks", https://arxiv.org/abs/1709.01507.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import SPATIAL_LAYOUTS, check_input
from attnzoo.layers import LayerSpec, create_layer, reduced_width
from attnzoo.registry import Paper, image_input, register

__all__ = ["SqueezeExcite", "channel_descriptor"]


def channel_descriptor(x: Tensor, pool: str) -> Tensor:
    """Global pooling over every spatial dim: (B, C, *S) -> (B, C)."""
    flat = x.flatten(2)  # (B, C, *S) -> (B, C, prod(S))
    if pool == "avg":
        return flat.mean(dim=-1)
    if pool == "max":
        # max(dim), not amax: its backward scatters through the indices, where amax's splits the
        # gradient over ties with full-size masks (2.7x slower measured at (32, 256, 56, 56))
        return flat.max(dim=-1).values
    raise ValueError(f"pool: expected 'avg' or 'max', got {pool!r}")


@register(
    "se",
    family="gating",
    paper=Paper("Squeeze-and-Excitation Networks", "1709.01507"),
    equation="y = x * sigmoid(W2 relu(W1 GAP(x) + b1) + b2), W1: C -> C/r, W2: C/r -> C, r = 16",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B C HW + B C^2 / r); memory O(B C HW) (the gated output)",
)
class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: gate each channel by a function of the global average.

    ``s = sigmoid(W2 delta(W1 z + b1) + b2)``, ``z = GAP(x)``, ``y = s * x``, with
    W1: C -> C/r and W2: C/r -> C (r = 16 in the paper). In a ResNet it goes on the residual
    branch, before the addition with the identity (paper, Fig. 3).

    Args:
        channels: C.
        rd_ratio: 1/r, the bottleneck ratio (paper: 1/16).
        rd_channels: the bottleneck width, overriding ``rd_ratio``.
        rd_divisor: round the bottleneck to a multiple of this (1 = exact C/r as in the paper;
            timm uses 8). Never rounds to zero width.
        act_layer: the bottleneck activation delta (name, class or factory; default ReLU).
        gate_layer: the gate (default sigmoid; ``"hard_sigmoid"`` for MobileNetV3).
        bias: biases in the two FC layers (paper: yes).

    Shape:
        - x: (B, C, L), (B, C, H, W) or (B, C, T, H, W).
        - output: same as x; attention (``return_attn``): the gate s, (B, C, 1, ...) broadcastable
          to x.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        *,
        act_layer: LayerSpec = "relu",
        gate_layer: LayerSpec = "sigmoid",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels: expected a positive count, got {channels}")
        self.channels = channels
        width = reduced_width(channels, rd_ratio, rd_channels, rd_divisor)
        factory = {"device": device, "dtype": dtype}
        # Linear on the pooled (B, C) vector equals the paper's 1x1 convs and works for any rank.
        self.fc1 = nn.Linear(channels, width, bias=bias, **factory)
        self.act = create_layer(act_layer, argument="act_layer")
        self.fc2 = nn.Linear(width, channels, bias=bias, **factory)
        self.gate = create_layer(gate_layer, argument="gate_layer")

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", SPATIAL_LAYOUTS, C=self.channels)
        squeezed = channel_descriptor(x, "avg")  # (B, C)
        excitation = self.gate(self.fc2(self.act(self.fc1(squeezed))))  # (B, C)
        # (B, C) -> (B, C, 1, ..., 1) to broadcast over the spatial dims
        scale = excitation.view(*excitation.shape, *([1] * (x.dim() - 2)))
        out = x * scale
        return (out, scale) if return_attn else out
