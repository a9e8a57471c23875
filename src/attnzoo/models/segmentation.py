"""A dilated ResNet with an FCN head, and any registered mechanism placed as its paper places it.

The network of the segmentation papers, small: a ResNet whose last two stages are dilated instead
of strided (output stride 8, DeepLab, https://arxiv.org/abs/1606.00915; the backbone of PSPNet,
DANet, CCNet, the non-local and DNL segmentation models), and the FCN head (Long, Shelhamer and
Darrell 2015, "Fully Convolutional Networks for Semantic Segmentation",
https://arxiv.org/abs/1411.4038) as mmsegmentation's ``FCNHead`` builds it: two 3x3 conv-BN-ReLU
layers, dropout, a 1x1 classifier, and bilinear upsampling of the logits to the input's size.

Where the mechanism goes, from its spec (:func:`segmentation_placement`):

- ``"head"``: the segmentation heads (the non-local family and every mechanism whose
  ``placement`` is ``"head"``: non-local, DNL, DANet, CCNet, APNB, PSA, APCNet, GloRe, SpyGR,
  DGMN, A2, CGNL) sit between the head's two convolutions, on the reduced last-stage features,
  as their papers' segmentation models (and mmsegmentation's NLHead, DAHead, CCHead, ...) do;
- ``"backbone"``: the blocks (gating modules on every residual branch, GC, SE, CBAM), the
  stage modules (BAM) and the convolution replacements (SK) go into the ResNet where
  :func:`attnzoo.models.resnet` puts them.

``upsample="carafe"`` replaces the final bilinear upsampling by the registered CARAFE upsampler
(https://arxiv.org/abs/1905.02188), on the head's features before the classifier.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive
from attnzoo.models.resnet import IMAGENET_DEPTHS, _call, resnet
from attnzoo.registry import create, get_spec

__all__ = ["SegmentationNet", "segmentation_placement"]

Upsample = Literal["bilinear", "carafe"]


def segmentation_placement(name: str) -> Literal["head", "backbone"]:
    """Where mechanism ``name`` goes in :class:`SegmentationNet`, read from its spec.

    Raises:
        KeyError: an unknown name (with suggestions).
        ValueError: a mechanism that goes in neither (sequences, graphs, an upsampler).
    """
    spec = get_spec(name)
    if spec.placement == "head" and not spec.shape_preserving:
        raise ValueError(
            f"{name!r} is an upsampler, not a context module: use it as the decoder's upsampling "
            f"(upsample={name!r})"
        )
    if spec.placement == "head" or (spec.family == "non_local" and spec.placement == "stage"):
        return "head"
    if spec.placement in ("residual", "stage", "conv"):
        return "backbone"
    raise ValueError(
        f"{name!r} is not a module for a segmentation network (family {spec.family}, placement "
        f"{spec.placement!r}): it takes {'sequences' if spec.channel_dim != 1 else 'other inputs'}"
    )


def _conv_bn_relu(cin: int, cout: int, factory: dict[str, Any]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False, **factory),
        nn.BatchNorm2d(cout, **factory),
        nn.ReLU(inplace=True),
    )


class SegmentationNet(nn.Module):
    """Dilated ResNet (output stride 8) + FCN head, with an attention mechanism where its paper
    puts it.

    ``forward(x)`` gives per-pixel class logits at the input's resolution; with
    ``return_attn=True`` also a dict of every attention module's maps (``"head"`` for the head's
    module, ``"stageS.blockB"`` / ``"stageS"`` for the backbone's).

    Args:
        num_classes: K, the classes of every pixel (the background included).
        in_chans: input channels (1 for grey images).
        attention: a registered name, or None for the plain FCN.
        depth: an ImageNet ResNet depth (18, 34, 50, 101, 152).
        width: the first stage's width (the stages have ``width * (1, 2, 4, 8)``).
        head_channels: the head's width (default: the last stage's width / 2, 256 of 512 in the
            ResNet-18 heads of mmsegmentation).
        upsample: ``"bilinear"`` (the FCN's) or ``"carafe"``.
        output_stride: 8 (the papers'), 16 or 32.
        dropout: before the classifier (0.1, mmsegmentation's).
        device, dtype: for every parameter.
        **attention_kwargs: passed to the mechanism's constructor.

    Shape:
        - x: (B, in_chans, H, W) with H and W multiples of ``output_stride``.
        - output: (B, num_classes, H, W).
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        *,
        attention: str | None = None,
        depth: int = 18,
        width: int = 16,
        head_channels: int | None = None,
        upsample: Upsample = "bilinear",
        output_stride: int = 8,
        dropout: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_chans=in_chans, width=width, head_channels=head_channels)
        if depth not in IMAGENET_DEPTHS:
            raise ValueError(f"depth: expected one of {sorted(IMAGENET_DEPTHS)}, got {depth}")
        if upsample not in ("bilinear", "carafe"):
            raise ValueError(f"upsample: expected 'bilinear' or 'carafe', got {upsample!r}")
        if attention is None and attention_kwargs:
            raise ValueError(
                f"attention: None, but attention arguments were given: {sorted(attention_kwargs)}"
            )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_classes, self.in_chans, self.output_stride = num_classes, in_chans, output_stride
        self.attention = attention
        self.placement = None if attention is None else segmentation_placement(attention)
        in_backbone = self.placement == "backbone"
        self.backbone = resnet(
            depth,
            attention if in_backbone else None,
            num_classes=1,
            in_chans=in_chans,
            width=width,
            output_stride=output_stride,
            **factory,
            **(attention_kwargs if in_backbone else {}),
        )
        # the classifier of the ResNet is not used: a parameter that gets no gradient would also
        # stop DistributedDataParallel
        self.backbone.fc = nn.Identity()
        features = self.backbone.num_features
        channels = head_channels or max(features // 2, 1)
        self.reduce = _conv_bn_relu(features, channels, factory)
        self.context = (
            create(attention, channels, **attention_kwargs, **factory) if self.placement == "head" else None
        )
        self.fuse = _conv_bn_relu(channels, channels, factory)
        self.dropout = nn.Dropout2d(dropout)
        self.upsampler = (
            create("carafe", channels, scale=output_stride, **factory) if upsample == "carafe" else None
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1, **factory)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Any]]:
        check_input(x, "x", "B C H W", C=self.in_chans)
        maps: dict[str, Any] | None = {} if return_attn else None
        features = self.reduce(self.backbone.forward_features(x, maps))
        if self.context is not None:
            features = _call(self.context, features, maps, "head")
        features = self.dropout(self.fuse(features))
        if self.upsampler is not None:
            # (B, C, H/8, W/8) -> (B, C, H, W), then classified per pixel
            logits = self.classifier(self.upsampler(features))
        else:
            # bilinear upsampling commutes with the 1x1 classifier: upsample the K logits, not C maps
            logits = F.interpolate(
                self.classifier(features), size=x.shape[-2:], mode="bilinear", align_corners=False
            )
        if maps is not None:
            return logits, maps
        return logits
