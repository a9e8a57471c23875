"""ECA: efficient channel attention.

Wang et al. 2020, "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks",
https://arxiv.org/abs/1910.03151.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import SPATIAL_LAYOUTS, check_input, parameter_dtype
from attnzoo.layers import LayerSpec, create_layer
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision.squeeze_excite import channel_descriptor

__all__ = ["ECA", "OFFICIAL_RESNET_KERNEL_SIZES", "adaptive_kernel_size"]

#: Kernel sizes per ResNet stage of the authors' released ImageNet models (README of the official
#: code: ``eca_resnet50_k3557``, ``eca_resnet101_k3357``, ``eca_resnet152_k3357``). The adaptive
#: rule gives (5, 5, 5, 7) for ResNet-50's stage widths 256..2048 instead.
OFFICIAL_RESNET_KERNEL_SIZES: dict[int, tuple[int, int, int, int]] = {
    50: (3, 5, 5, 7),
    101: (3, 3, 5, 7),
    152: (3, 3, 5, 7),
}


def adaptive_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA's kernel size for C channels: ``k = |log2(C) / gamma + b / gamma|_odd`` (paper eq. 12).

    ``|t|_odd`` is the nearest odd number to t; at a tie (t even) it goes up, as the authors' code
    does (``t = int(|.|); k = t if t is odd else t + 1``). C = 64, 256, 2048 give 3, 5, 7.
    """
    if channels <= 0:
        raise ValueError(f"channels: expected a positive count, got {channels}")
    if gamma <= 0:
        raise ValueError(f"gamma: expected a positive value, got {gamma}")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


@register(
    "eca",
    placement="residual",
    map_kind="channel",
    linear_memory=True,
    family="gating",
    paper=Paper("ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", "1910.03151"),
    equation="y = x * sigmoid(conv1d_k(GAP(x))) (1-D conv across channels, zero padding, no bias); "
    "k = |log2(C)/2 + 1/2|_odd unless given",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B C HW + B C k); memory O(B C HW) (the gated output); k parameters",
    notes="kernel_size=None is the paper's adaptive k; the released ImageNet ResNets fix k per stage "
    "(OFFICIAL_RESNET_KERNEL_SIZES, e.g. 3, 5, 5, 7 for ResNet-50); padding='circular' wraps the "
    "channel axis around (timm's CecaModule)",
    samples=(
        Sample("kernel_size=5", {"kernel_size": 5}, description="a fixed kernel size"),
        Sample("padding=circular", {"padding": "circular"}, description="circular ECA (channels wrap)"),
    ),
)
class ECA(nn.Module):
    """Efficient channel attention: a k-tap 1-D convolution across the pooled channel vector.

    ``omega = sigma(C1D_k(y))``, ``y = GAP(x)``, ``out = omega * x`` (paper eq. 9-10). No
    dimensionality reduction and no bias: the module has exactly k parameters, shared by all
    channels, and each channel's weight depends on its k neighbours (zero-padded at the ends).
    The kernel size follows the channel count, ``k = |log2(C) / gamma + b / gamma|_odd`` with
    gamma = 2, b = 1 (eq. 12), unless ``kernel_size`` is given. In a ResNet it goes on the residual
    branch after the last BN, before the addition (as SE).

    NOTE: the authors' released ImageNet models do not use the adaptive rule: they fix k per stage
    (3, 5, 5, 7 for ResNet-50, where the rule gives 5, 5, 5, 7); pass ``kernel_size`` per stage
    to reproduce them (:data:`OFFICIAL_RESNET_KERNEL_SIZES`, and ``stage_attention_kwargs`` of
    :func:`attnzoo.models.resnet.resnet`).

    Args:
        channels: C.
        kernel_size: k, odd; None chooses it from C (the paper's adaptive rule).
        gamma, b: the adaptive rule's constants (paper: 2 and 1).
        padding: how the channel axis is padded for the 1-D conv: ``"zeros"`` (paper: zero
            padding, the end channels see fewer neighbours) or ``"circular"`` (the channel axis
            wraps around, so every channel has k neighbours: timm's ``CecaModule``).
        gate_layer: the gate (default sigmoid).

    Shape:
        - x: (B, C, L), (B, C, H, W) or (B, C, T, H, W).
        - output: same as x; attention (``return_attn``): the gate omega, (B, C, 1, ...).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        *,
        gamma: float = 2.0,
        b: float = 1.0,
        padding: Literal["zeros", "circular"] = "zeros",
        gate_layer: LayerSpec = "sigmoid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels: expected a positive count, got {channels}")
        if kernel_size is None:
            kernel_size = adaptive_kernel_size(channels, gamma, b)
        elif kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd positive size or None, got {kernel_size}")
        if padding not in ("zeros", "circular"):
            raise ValueError(f"padding: expected 'zeros' or 'circular', got {padding!r}")
        self.channels, self.kernel_size, self.padding = channels, kernel_size, padding
        # the paper's C1D_k: one input and one output "channel"; C is the convolved axis
        self.conv = nn.Conv1d(
            1,
            1,
            kernel_size,
            padding=kernel_size // 2,
            padding_mode=padding,
            bias=False,
            device=device,
            dtype=dtype,
        )
        self.gate = create_layer(gate_layer, argument="gate_layer")

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", SPATIAL_LAYOUTS, C=self.channels, dtype=parameter_dtype(self))
        pooled = channel_descriptor(x, "avg").unsqueeze(1)  # (B, C) -> (B, 1, C)
        logits = self.conv(pooled)  # (B, 1, C)
        weights = self.gate(logits.squeeze(1))  # (B, 1, C) -> (B, C)
        # (B, C) -> (B, C, 1, ..., 1) to broadcast over the spatial dims
        scale = weights.view(*weights.shape, *([1] * (x.dim() - 2)))
        out = x * scale
        return (out, scale) if return_attn else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, padding={self.padding!r}"
