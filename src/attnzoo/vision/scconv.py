"""Self-calibrated convolution (SCNet): half the channels gated by a down-sampled view of themselves.

Liu et al. 2020, "Improving Convolutional Networks with Self-Calibrated Convolutions", CVPR 2020
(https://mmcheng.net/scconv/; official code https://github.com/backseason/SCNet).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, check_variant, parameter_dtype
from attnzoo.layers import LayerSpec, NormLayer, create_layer, create_norm
from attnzoo.registry import Paper, Sample, image_input, register

__all__ = ["SelfCalibratedConv"]

Variant = Literal["paper", "official"]


@register(
    "scconv",
    placement="conv",
    map_kind="spatial",
    linear_memory=True,
    family="gating",
    paper=Paper("Improving Convolutional Networks with Self-Calibrated Convolutions", venue="CVPR 2020"),
    equation="[X1, X2] = X; T1 = AvgPool_r(X1); X1' = Up(K2(T1)); Y1 = K4(K3(X1) * sigmoid(X1 + X1')); "
    "Y2 = K1(X2); Y = [Y1, Y2], r = 4",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(9 B HW C^2 (3 + 1/r^2) / (4 g)), about 3/4 of a plain 3x3 conv; memory O(B C HW)",
    notes="Up is bilinear as in the paper; variant='official' upsamples by nearest neighbour "
    "(F.interpolate's default in the official code) and feeds the FIRST half to the plain conv K1, "
    "putting its output first",
    samples=(
        Sample("variant=official", {"variant": "official"}),
        Sample("pooling_r=2", {"pooling_r": 2}),
    ),
)
class SelfCalibratedConv(nn.Module):
    """Self-calibrated convolution: a plain 3x3 conv on one half, a self-calibrated one on the other.

    The input is split into halves X1, X2 of C/2 channels. X2 takes the plain path
    ``Y2 = K1(X2)``; X1 is calibrated at two scales (paper eqs. 1-4):
    ``T1 = AvgPool_r(X1)`` (window and stride r = 4), ``X1' = Up(K2(T1))`` (bilinear, back to
    the size of X1, so sizes not divisible by r work), ``Y1' = K3(X1) * sigmoid(X1 + X1')`` and
    ``Y1 = K4(Y1')``; the output is ``Y = [Y1, Y2]``. K1..K4 are 3x3 convs of C/2 channels; K1 and
    K4 carry the stride.

    Each K_i is followed by BN, as in the official code (the paper's equations leave
    normalisation out; ``norm_layer=None`` gives the bare equations, with conv biases). The official
    bottleneck applies ReLU to both halves after the SC conv; that activation is part of this
    module (``act_layer``), so that, like ``sk`` and ``split_attention``, it replaces the
    conv-BN-ReLU of a bottleneck.

    Args:
        channels: C (even), the input and output width.
        stride: stride of K1 and K4 (the output is ``ceil(H / stride)`` on a side).
        pooling_r: r, the average-pooling window and stride (paper: 4). Sides shorter than r are
            pooled whole.
        groups: group count of each K_i (1 in SCNet; the cardinality in SCNeXt); must divide C/2.
        norm_layer: the normalisation after each K_i, called as ``norm_layer(C / 2)`` (default
            BatchNorm, as in the official code; None: the bare equations, convs with bias).
        act_layer: the activation applied to the output (default ReLU; None for the bare SC conv).
        variant: ``"paper"`` (bilinear Up; first half calibrated, Y = [Y1, Y2]) or ``"official"``
            (nearest-neighbour Up as in the official ``F.interpolate`` call; the first half takes
            the plain K1 and the output is [Y2, Y1], as the official bottleneck's concatenation).

    Shape:
        - x: (B, C, H, W).
        - output: (B, C, H', W'), H' = ceil(H / stride); attention (``return_attn``): the
          calibration gate ``sigmoid(X1 + X1')``, (B, C/2, H, W), in (0, 1).
    """

    def __init__(
        self,
        channels: int,
        stride: int = 1,
        *,
        pooling_r: int = 4,
        groups: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: LayerSpec = "relu",
        variant: Variant = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels, stride=stride, pooling_r=pooling_r, groups=groups)
        if channels % 2:
            raise ValueError(f"channels: expected an even width (split into two halves), got {channels}")
        half = channels // 2
        if half % groups:
            raise ValueError(f"groups: expected a divisor of channels / 2 = {half}, got {groups}")
        check_variant(variant)
        self.channels, self.stride, self.pooling_r, self.variant = channels, stride, pooling_r, variant
        factory = {"device": device, "dtype": dtype}

        def conv_bn(conv_stride: int) -> nn.Sequential:
            bias = norm_layer is None  # a norm right after the conv removes any bias
            conv = nn.Conv2d(
                half, half, 3, stride=conv_stride, padding=1, groups=groups, bias=bias, **factory
            )
            return nn.Sequential(conv, create_norm(norm_layer, half, **factory))

        self.k1 = conv_bn(stride)
        self.k2 = conv_bn(1)
        self.k3 = conv_bn(1)
        self.k4 = conv_bn(stride)
        self.act = create_layer(act_layer, argument="act_layer")

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        official = self.variant == "official"
        first, second = x.chunk(2, dim=1)  # (B, C, H, W) -> 2 x (B, C/2, H, W)
        plain, calib = (first, second) if official else (second, first)
        height, width = x.shape[-2:]
        # NOTE: deviates from the official code, which fails on sides shorter than r: those are
        # pooled whole (a global average along that side)
        window = (min(self.pooling_r, height), min(self.pooling_r, width))
        reference = self.k2(F.avg_pool2d(calib, window, window))  # K2(T1), (B, C/2, H/r, W/r)
        if official:
            upsampled = F.interpolate(reference, size=(height, width), mode="nearest")
        else:
            upsampled = F.interpolate(reference, size=(height, width), mode="bilinear", align_corners=False)
        gate = torch.sigmoid(calib + upsampled)  # (B, C/2, H, W)
        calibrated = self.k4(self.k3(calib) * gate)  # Y1
        straight = self.k1(plain)  # Y2
        parts = [straight, calibrated] if official else [calibrated, straight]
        out = self.act(torch.cat(parts, dim=1))
        return (out, gate) if return_attn else out
