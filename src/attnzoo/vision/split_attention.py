"""Split attention (ResNeSt): a softmax across radix splits within each cardinal group.

Zhang et al. 2020, "ResNeSt: Split-Attention Networks", https://arxiv.org/abs/2004.08955.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input
from attnzoo.layers import LayerSpec, create_layer, reduced_width
from attnzoo.registry import Paper, image_input, register

__all__ = ["SplitAttention"]


def _positive(value: int, name: str) -> None:
    if value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value}")


@register(
    "split_attention",
    family="gating",
    paper=Paper("ResNeSt: Split-Attention Networks", "2004.08955"),
    equation="U_{k,r} = ReLU(BN(conv3x3_{k,r}(X))); s^k = GAP(sum_r U_{k,r}); "
    "a^k_r = softmax_r(G_r(s^k)) (sigmoid if R = 1); V^k = sum_r a^k_r * U_{k,r}; V = [V^1, ..., V^K]",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B HW C C_in R 9 / (K R) + B C d R / K); memory O(R B C HW) (the radix splits)",
    notes="radix-major splits and cardinality-major attention logits, as in the official SplAtConv2d "
    "(its weights load here); the mid width uses the input width, max(C_in * R // 4, 32)",
)
class SplitAttention(nn.Module):
    """ResNeSt split-attention convolution: R radix splits per cardinal group, mixed by a softmax.

    A grouped 3x3 conv (K * R groups, no bias) with BN and ReLU gives the splits U_{k,r}
    (k < K cardinal groups, r < R radix splits, C/K channels each). Per cardinal group,
    ``s^k = GAP(sum_r U_{k,r})``; ``G`` is two 1x1 convs grouped by cardinality,
    ``C -> d -> R*C`` with BN and ReLU between, ``d = max(C_in * R / 4, 32)``; the weights are
    ``a^k_r(c) = softmax_r G^c_r(s^k)`` for R > 1 and ``sigmoid(G^c(s^k))`` for R = 1 (paper eq. 3);
    ``V^k = sum_r a^k_r * U_{k,r}`` and ``V = [V^1, ..., V^K]`` (eq. 2).

    Layout (the official code's, paper Fig. 4 "radix-major"): the conv output is R chunks of C
    channels, chunk r holding split r of every cardinal group (group k at channels
    ``k*C/K : (k+1)*C/K`` of the chunk); fc2's ``R*C`` outputs, being grouped by cardinality, are
    cardinality-major: output ``k*(R*C/K) + r*(C/K) + c`` is the logit of split r, channel c of
    group k (the official ``rSoftMax`` reshapes to (B, K, R, C/K) and softmaxes over R).

    A drop-in replacement for the 3x3 conv (with its BN and ReLU) of a ResNeSt bottleneck:
    ``channels -> out_channels`` with ``stride``. BN in G means a training batch needs more
    than one sample.

    Args:
        channels: C_in, the input width.
        out_channels: C, the output width (default: ``channels``).
        stride: stride of the 3x3 conv (the output is ``ceil(H / stride)`` on a side).
        radix: R, splits per cardinal group (paper default 2; 1 gives an SE-like sigmoid gate).
        cardinality: K, cardinal groups (the official ``groups``; ResNeSt-50 uses 1).
        rd_ratio: 1 / reduction factor of the attention MLP (official: 1/4), on ``C_in * R``.
        rd_channels: d, overriding ``rd_ratio`` and ``min_rd_channels``.
        min_rd_channels: the floor of d (official: 32).
        act_layer: the activation after the conv and in G (default ReLU).

    Shape:
        - x: (B, C_in, H, W).
        - output: (B, C, H', W'), H' = ceil(H / stride); attention (``return_attn``): the split
          weights a, (B, R, C, 1, 1) (weight of split r for output channel c), summing to 1 over R
          when R > 1.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        radix: int = 2,
        cardinality: int = 1,
        rd_ratio: float = 1 / 4,
        rd_channels: int | None = None,
        min_rd_channels: int = 32,
        act_layer: LayerSpec = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        for value, name in (
            (channels, "channels"),
            (out_channels, "out_channels"),
            (stride, "stride"),
            (radix, "radix"),
            (cardinality, "cardinality"),
            (min_rd_channels, "min_rd_channels"),
        ):
            _positive(value, name)
        if channels % (cardinality * radix):
            raise ValueError(
                f"channels: expected a multiple of cardinality * radix = {cardinality * radix}, "
                f"got {channels}"
            )
        if out_channels % cardinality:
            raise ValueError(
                f"out_channels: expected a multiple of cardinality={cardinality}, got {out_channels}"
            )
        self.channels, self.out_channels, self.stride = channels, out_channels, stride
        self.radix, self.cardinality = radix, cardinality
        if rd_channels is None:
            width = max(reduced_width(channels * radix, rd_ratio), min_rd_channels)
            # fc1 is grouped by cardinality; the official code would fail to build otherwise
            width = -(-width // cardinality) * cardinality
        else:
            width = reduced_width(channels, rd_ratio, rd_channels)
            if width % cardinality:
                raise ValueError(
                    f"rd_channels: expected a multiple of cardinality={cardinality}, got {rd_channels}"
                )
        self.rd_channels = width
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(
            channels,
            out_channels * radix,
            3,
            stride=stride,
            padding=1,
            groups=cardinality * radix,
            bias=False,
            **factory,
        )
        self.bn0 = nn.BatchNorm2d(out_channels * radix, **factory)
        self.act0 = create_layer(act_layer, argument="act_layer")
        self.fc1 = nn.Conv2d(out_channels, width, 1, groups=cardinality, **factory)
        self.bn1 = nn.BatchNorm2d(width, **factory)
        self.act1 = create_layer(act_layer, argument="act_layer")
        self.fc2 = nn.Conv2d(width, out_channels * radix, 1, groups=cardinality, **factory)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels)
        batch, radix, channels, card = x.shape[0], self.radix, self.out_channels, self.cardinality
        feats = self.act0(self.bn0(self.conv(x)))  # (B, R*C, H', W')
        height, width = feats.shape[-2:]
        splits = feats.view(batch, radix, channels, height, width)  # (B, R*C, H', W') -> (B, R, C, H', W')
        # GAP is linear: mean each split, then sum over the splits (no (B, C, H', W') temporary)
        pooled = splits.mean(dim=(3, 4)).sum(dim=1)  # (B, C)
        hidden = self.act1(self.bn1(self.fc1(pooled.view(batch, channels, 1, 1))))  # (B, d, 1, 1)
        logits = self.fc2(hidden)  # (B, R*C, 1, 1), cardinality-major
        # (B, R*C, 1, 1) -> (B, K, R, C/K): fc2's groups are the cardinal groups
        logits = logits.view(batch, card, radix, channels // card)
        compute = torch.promote_types(logits.dtype, torch.float32)
        if radix > 1:
            weights = torch.softmax(logits, dim=2, dtype=compute)
        else:
            weights = torch.sigmoid(logits.to(compute))
        # (B, K, R, C/K) -> (B, R, K, C/K) -> (B, R, C, 1, 1): split-major, like the conv output
        weights = weights.to(x.dtype).transpose(1, 2).reshape(batch, radix, channels, 1, 1)
        # sum_r a_r * U_r without a (B, R, C, H', W') product temporary
        out = splits[:, 0] * weights[:, 0]  # (B, C, H', W')
        for r in range(1, radix):
            out = torch.addcmul(out, splits[:, r], weights[:, r])
        return (out, weights) if return_attn else out
