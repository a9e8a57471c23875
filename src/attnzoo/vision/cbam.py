"""CBAM: convolutional block attention module (channel, spatial, and both in sequence).

Woo et al. 2018, "CBAM: Convolutional Block Attention Module", https://arxiv.org/abs/1807.06521.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, check_variant, parameter_dtype
from attnzoo.functional.softmax import mean_of
from attnzoo.layers import LayerSpec, NormLayer, call_layer, create_layer, create_norm
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision.squeeze_excite import Pool, SqueezeExcite, needs_grad

__all__ = ["CBAM", "ChannelAttention", "SpatialAttention"]

CBAM_PAPER = Paper("CBAM: Convolutional Block Attention Module", "1807.06521")
Variant = Literal["paper", "official"]


def _check_norm_variant(norm_layer: NormLayer, variant: str) -> None:
    """The paper's spatial branch has no norm: a norm_layer other than the default or None needs
    ``variant="official"``, rather than being ignored."""
    if variant == "paper" and norm_layer is not nn.BatchNorm2d and norm_layer is not None:
        raise ValueError(
            f"norm_layer: the paper's spatial branch has no normalisation (it is the official "
            f"code's, variant='official'), expected the default or None with variant='paper', "
            f"got {norm_layer!r}"
        )


@register(
    "cbam_channel",
    placement="residual",
    map_kind="channel",
    linear_memory=True,
    family="gating",
    paper=CBAM_PAPER,
    equation="M_c(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F))), one shared MLP C -> C/r -> C; "
    "F' = M_c(F) * F",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B C HW + B C^2 / r); memory O(B C HW)",
    samples=(Sample("bias=False", {"bias": False}, description="MLP without biases (timm's default)"),),
)
class ChannelAttention(SqueezeExcite):
    """CBAM channel attention: one shared MLP over the average- and max-pooled descriptors.

    ``M_c(F) = sigma(W1 delta(W0 F_avg) + W1 delta(W0 F_max))`` (paper eq. 2; W0: C -> C/r,
    W1: C/r -> C, r = 16, ReLU delta, biases as in the official ``nn.Linear``), and the module
    returns the gated features ``M_c(F) * F``, like its siblings (not the bare weights).

    This is :class:`~attnzoo.vision.squeeze_excite.SqueezeExcite` with ``pool="avg_and_max"``
    (one implementation for both): the same arguments, the same parameter names.

    Args:
        channels: C.
        rd_ratio, rd_channels, rd_divisor: bottleneck width as in :class:`SqueezeExcite`.
        act_layer, gate_layer: injectable activation and gate.
        bias: MLP biases (official code: yes; timm's ``CbamModule`` defaults to none).
        pool: the pooling (default CBAM's ``"avg_and_max"``; see :class:`SqueezeExcite`).

    Shape:
        - x: (B, C, L), (B, C, H, W) or (B, C, T, H, W); output: the same.
        - attention (``return_attn``): M_c, (B, C, 1, ...).
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
        pool: Pool = "avg_and_max",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            channels,
            rd_ratio,
            rd_channels,
            rd_divisor,
            pool=pool,
            act_layer=act_layer,
            gate_layer=gate_layer,
            bias=bias,
            device=device,
            dtype=dtype,
        )


@register(
    "cbam_spatial",
    placement="residual",
    map_kind="spatial",
    linear_memory=True,
    family="gating",
    paper=CBAM_PAPER,
    equation="M_s(F) = sigmoid(conv7x7([AvgPool_c(F); MaxPool_c(F)])); F' = M_s(F) * F",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B C HW + B HW k^2); memory O(B C HW)",
    notes="variant='official' adds BatchNorm after the conv (no conv bias) and pools [max; mean]; "
    "norm_layer replaces that BatchNorm (None: none, the conv then has a bias)",
    samples=(
        Sample("variant=official", {"variant": "official"}, description="BN after the spatial conv"),
        Sample(
            "variant=official,norm_layer=GroupNorm",
            {"variant": "official", "norm_layer": lambda s: functools.partial(nn.GroupNorm, 1)},
            description="GroupNorm instead of the official BN (per-image statistics of the map)",
        ),
    ),
)
class SpatialAttention(nn.Module):
    """CBAM spatial attention: a k x k conv over the channel-wise mean and max maps.

    ``M_s(F) = sigma(f^{7x7}([AvgPool(F); MaxPool(F)]))`` (paper eq. 3), pooling across channels;
    returns ``M_s(F) * F``.

    Args:
        channels: C, checked against the input when given (the layer itself is width-free).
        kernel_size: k (paper: 7; CenterMask's SAG-Mask uses 3). Must be odd.
        gate_layer: the gate (default sigmoid).
        variant: ``"paper"`` (conv with bias, [avg; max]) or ``"official"`` (the authors' code:
            conv without bias, then BatchNorm, and the pooled maps in the order [max; mean], so
            its weights load here).
        norm_layer: the official variant's norm after the conv, called as ``norm_layer(1)`` on
            the (B, 1, H, W) logit map (default ``nn.BatchNorm2d``, built with the official
            momentum 0.01; e.g. ``functools.partial(nn.GroupNorm, 1)``; None: no norm, and the
            conv keeps its bias). The paper's variant has no norm: it accepts only the default
            or None.

    Shape:
        - x: (B, C, H, W); output: the same; attention (``return_attn``): M_s, (B, 1, H, W).
    """

    def __init__(
        self,
        channels: int | None = None,
        kernel_size: int = 7,
        *,
        gate_layer: LayerSpec = "sigmoid",
        variant: Variant = "paper",
        norm_layer: NormLayer = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_variant(variant)
        _check_norm_variant(norm_layer, variant)
        check_positive(channels=channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd positive size, got {kernel_size}")
        self.channels, self.variant = channels, variant
        factory = {"device": device, "dtype": dtype}
        normed = variant == "official" and norm_layer is not None
        # a conv bias before the norm would be cancelled (BN) or redundant with its shift
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not normed, **factory)
        if norm_layer is nn.BatchNorm2d:  # the official BasicConv's BN(eps=1e-5, momentum=0.01)
            norm_layer = functools.partial(nn.BatchNorm2d, momentum=0.01)
        self.norm = create_norm(norm_layer if normed else None, 1, **factory)
        self.gate = create_layer(gate_layer, argument="gate_layer")

    def attention(self, x: Tensor) -> Tensor:
        """M_s(x), (B, 1, H, W)."""
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        mean_map = mean_of(x, 1, keepdim=True)  # (B, 1, H, W)
        if needs_grad(x):
            max_map = x.max(dim=1, keepdim=True).values  # (B, 1, H, W); max(dim): faster backward
        else:
            max_map = x.amax(dim=1, keepdim=True)  # no indices to compute: ~6x faster
        maps = [max_map, mean_map] if self.variant == "official" else [mean_map, max_map]
        return call_layer(self.gate, call_layer(self.norm, call_layer(self.conv, torch.cat(maps, dim=1))))

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        weights = self.attention(x)
        out = x * weights
        return (out, weights) if return_attn else out


@register(
    "cbam",
    placement="residual",
    map_kind="mixed",
    linear_memory=True,
    family="gating",
    paper=CBAM_PAPER,
    equation="F' = M_c(F) * F; F'' = M_s(F') * F'",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B C HW + B C^2 / r + B HW k^2); memory O(B C HW)",
    notes="variant='official' uses the official spatial branch (BN, [max; mean]; norm_layer replaces "
    "the BN); mlp_bias=False drops the channel MLP's biases (timm's CbamModule default)",
    samples=(
        Sample("variant=official", {"variant": "official"}, description="BN after the spatial conv"),
        Sample("mlp_bias=False", {"mlp_bias": False}, description="channel MLP without biases"),
    ),
)
class CBAM(nn.Module):
    """CBAM: channel attention, then spatial attention on the channel-refined features.

    ``F' = M_c(F) * F`` and ``F'' = M_s(F') * F'`` (paper eq. 1); the sequential channel-first
    order is the paper's best arrangement (Table 3). On the residual branch of a ResNet block,
    before the addition.

    Args:
        channels: C.
        rd_ratio, rd_channels, rd_divisor: bottleneck of the channel MLP (r = 16).
        kernel_size: spatial conv size (7).
        act_layer, gate_layer: injectable activation and gate for both branches.
        variant: ``"paper"`` or ``"official"`` (see :class:`SpatialAttention`).
        mlp_bias: biases in the channel MLP (official code: yes; timm's ``CbamModule``: no).
        norm_layer: the official spatial branch's norm (see :class:`SpatialAttention`).

    Shape:
        - x: (B, C, H, W); output: the same.
        - attention (``return_attn``): ``{"channel": (B, C, 1, 1), "spatial": (B, 1, H, W)}``.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        kernel_size: int = 7,
        *,
        act_layer: LayerSpec = "relu",
        gate_layer: LayerSpec = "sigmoid",
        variant: Variant = "paper",
        mlp_bias: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.channel = ChannelAttention(
            channels,
            rd_ratio,
            rd_channels,
            rd_divisor,
            act_layer=act_layer,
            gate_layer=gate_layer,
            bias=mlp_bias,
            **factory,
        )
        self.spatial = SpatialAttention(
            channels, kernel_size, gate_layer=gate_layer, variant=variant, norm_layer=norm_layer, **factory
        )

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        check_input(x, "x", "B C H W", C=self.channel.channels, dtype=parameter_dtype(self))
        channel_weights = self.channel.attention(x)
        refined = x * channel_weights
        spatial_weights = self.spatial.attention(refined)
        out = refined * spatial_weights
        if return_attn:
            return out, {"channel": channel_weights, "spatial": spatial_weights}
        return out
