"""Adaptive context modules (APCNet): every pixel weighs the s x s pooled regions of its image.

He, Deng, Zhou, Wang and Qiao 2019, "Adaptive Pyramid Context Network for Semantic Segmentation"
(CVPR 2019). No official code was released; the reference implementation is mmsegmentation's
``APCHead``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.softmax import mean_of
from attnzoo.layers import NormLayer, create_norm, reduced_width
from attnzoo.registry import Paper, Sample, image_input, register

__all__ = ["AdaptiveContext", "AdaptiveContextModule"]


def _conv_bn_relu(
    in_ch: int, out_ch: int, norm_layer: NormLayer, factory: dict, kernel: int = 1
) -> nn.Sequential:
    """Conv (no bias: the norm's shift replaces it) + norm + ReLU; a bias without a norm."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=norm_layer is None, **factory),
        create_norm(norm_layer, out_ch, **factory),
        nn.ReLU(),
    )


class AdaptiveContextModule(nn.Module):
    """One ACM at pooling scale s: ``z = sigmoid(gla(x' + g(GAP(x')))) Y_s``.

    ``x' = reduce(x)`` (1x1 conv + BN + ReLU, C -> C'), ``Y_s = reduce_pooled(AvgPool_s(x))``
    (s^2 region features), ``g`` a 1x1 conv + BN + ReLU of the global average of x' broadcast to
    every position, ``gla`` a 1x1 conv C' -> s^2; the affinities are sigmoids, not a softmax: a
    pixel may draw on several regions, or on none. Then ``ReLU(residual(z) + x')`` and, with
    ``fusion``, one more 1x1 conv + BN + ReLU.

    Shape:
        - x: (B, C, H, W); output: (B, C', H, W); affinity (``return_attn``): (B, s^2, H, W).
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int,
        pool_scale: int,
        *,
        fusion: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.pool_scale = pool_scale

        def block(in_ch: int, out_ch: int) -> nn.Sequential:
            return _conv_bn_relu(in_ch, out_ch, norm_layer, factory)

        self.reduce_pooled = block(channels, inner_channels)
        self.reduce = block(channels, inner_channels)
        self.global_info = block(inner_channels, inner_channels)
        self.gla = nn.Conv2d(inner_channels, pool_scale * pool_scale, 1, **factory)
        self.residual = block(inner_channels, inner_channels)
        self.fusion = block(inner_channels, inner_channels) if fusion else nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the context (B, C', H, W) and the affinities (B, s^2, H, W)."""
        reduced = self.reduce(x)  # (B, C', H, W)
        regions = self.reduce_pooled(F.adaptive_avg_pool2d(x, self.pool_scale))  # (B, C', s, s)
        context = self.global_info(mean_of(reduced, (2, 3), keepdim=True))  # (B, C', 1, 1)
        affinity = torch.sigmoid(self.gla(reduced + context))  # (B, s^2, H, W), broadcast add
        # sum_r a_r(p) Y_r: (B, s^2, HW)^T @ (B, s^2, C') -> (B, HW, C'), written as one einsum
        # over the region axis so that neither operand needs a transposed copy
        z = torch.einsum("brp,bcr->bcp", affinity.flatten(2), regions.flatten(2))  # (B, C', HW)
        z = z.view_as(reduced)  # (B, C', HW) -> (B, C', H, W)
        out = self.fusion(torch.relu(self.residual(z) + reduced))
        return out, affinity


@register(
    "adaptive_context",
    family="non_local",
    paper=Paper("Adaptive Pyramid Context Network for Semantic Segmentation", venue="CVPR 2019"),
    equation="per scale s in (1, 2, 3, 6): a = sigmoid(W(x' + g(GAP(x')))) (HW x s^2), "
    "z_s = a Y_s (Y_s the s x s pooled regions); out = bottleneck(cat[x, z_1, z_2, z_3, z_6])",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B HW C C' S + B HW C' sum_s s^2 + 9 B HW (C + S C') C_out), S = 4 scales; "
    "memory O(B HW (C + S C')): affinities are HW x s^2 (s^2 <= 36), no HW x HW matrix",
    placement="head",
    map_kind="mixed",
    linear_memory=True,
    samples=(
        Sample("no_fusion", kwargs={"fusion": False}, description="without the fusion conv"),
        Sample("scales", kwargs={"pool_scales": (1, 4)}, description="other pooling scales"),
        Sample(
            "norm_layer=GroupNorm",
            {"norm_layer": lambda s: functools.partial(nn.GroupNorm, 1)},
            description="GroupNorm in every conv block (trains with a batch of one)",
        ),
    ),
    notes="As mmsegmentation's APCHead (no official code): C' = C/4 (512 for 2048), the head's "
    "3x3 bottleneck over the concatenation included so the output has out_channels (default C).",
)
class AdaptiveContext(nn.Module):
    """APCNet head: adaptive context modules at several scales, concatenated with the input.

    For each pooling scale s (paper: 1, 2, 3, 6) an :class:`AdaptiveContextModule` gives every
    pixel a sigmoid affinity to each of the s x s pooled regions, computed from the pixel and the
    global context (``x' + g(GAP(x'))``), and sums the region features with those weights. The
    contexts are concatenated with the input and fused by a 3x3 conv + BN + ReLU (the head's
    bottleneck, before the classifier).

    Args:
        channels: C.
        inner_channels: C', the width of each module (default C/4: 512 for a 2048-wide ResNet).
        out_channels: the bottleneck's width (default C, so the head preserves the shape).
        pool_scales: the region grids (paper: 1, 2, 3, 6).
        fusion: the extra 1x1 conv + BN + ReLU at the end of every module (mmseg default).
        norm_layer: the norm of every conv block, called as ``norm_layer(width)`` on (B, width,
            H, W) maps (default ``nn.BatchNorm2d``, as mmsegmentation; its global-context block
            normalises a (B, C', 1, 1) map, which BatchNorm cannot train on with a batch of one:
            ``functools.partial(nn.GroupNorm, 32)`` can; None: none, the convs then have biases).

    Shape:
        - x: (B, C, H, W); output: (B, out_channels, H, W).
        - attention (``return_attn``): ``{"scale_<s>": (B, s^2, H, W)}``, each pixel's sigmoid
          affinity to every region (row-major over the s x s grid), in [0, 1].
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int | None = None,
        out_channels: int | None = None,
        *,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        fusion: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels, inner_channels=inner_channels, out_channels=out_channels)
        if not pool_scales or any(int(s) < 1 for s in pool_scales):
            raise ValueError(f"pool_scales: expected positive grid sides, got {tuple(pool_scales)}")
        self.channels = channels
        self.inner_channels = inner_channels or reduced_width(channels, 1 / 4)
        self.out_channels = out_channels or channels
        self.pool_scales = tuple(int(s) for s in pool_scales)
        factory = {"device": device, "dtype": dtype}
        self.modules_per_scale = nn.ModuleList(
            AdaptiveContextModule(
                channels, self.inner_channels, s, fusion=fusion, norm_layer=norm_layer, **factory
            )
            for s in self.pool_scales
        )
        width = channels + len(self.pool_scales) * self.inner_channels
        self.bottleneck = _conv_bn_relu(width, self.out_channels, norm_layer, factory, kernel=3)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inner_channels={self.inner_channels}, "
            f"out_channels={self.out_channels}, pool_scales={self.pool_scales}"
        )

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        contexts, maps = [x], {}
        for scale, module in zip(self.pool_scales, self.modules_per_scale):
            context, affinity = module(x)
            contexts.append(context)
            maps[f"scale_{scale}"] = affinity
        out = self.bottleneck(torch.cat(contexts, dim=1))
        return (out, maps) if return_attn else out
