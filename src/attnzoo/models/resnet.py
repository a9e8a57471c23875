"""ResNets with any registered attention mechanism inserted where its paper puts it.

He et al. 2016, "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385
(ImageNet ResNet-18/34/50/101/152, and the CIFAR ResNet-20/32/44/56/110 of its section 4.2).

Placements (the default is the mechanism's spec's ``placement``; ``placement=`` overrides it):

- ``"residual"``: on the residual branch after the block's last BN, before the addition with the
  identity: SE (arXiv:1709.01507, Fig. 3), CBAM (arXiv:1807.06521, Fig. 3), ECA, GC and any
  other shape-preserving module (the default).
- ``"stage"``: after every stage but the last, where the feature maps are downsampled next: BAM
  (arXiv:1807.06514, Fig. 1), and the standalone pairwise blocks that carry their own residual
  connection (non-local, DNL, SAGAN, DANet, criss-cross) instead of sitting inside a block. NOTE: the
  non-local paper's ImageNet models add them to res3 and res4 only; ``"stage"`` adds one after
  every stage but the last.
- ``"conv"``: replacing the 3x3 convolution (with its BN and ReLU): SK (arXiv:1903.06586),
  split attention (ResNeSt, arXiv:2004.08955), SC conv (SCNet); the module is built as
  ``create(name, in_width, out_width, stride=s)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive
from attnzoo.registry import create, get_spec

__all__ = ["CIFAR_DEPTHS", "IMAGENET_DEPTHS", "ResNet", "resnet"]

Placement = Literal["residual", "stage", "conv"]

#: Depth -> (block, blocks per stage) of the ImageNet ResNets (paper Table 1).
IMAGENET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    # ResNet-26, the baseline of LR-Net (arXiv:1904.11491, Table 1): two bottlenecks a stage
    26: ("bottleneck", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
#: Depth 6n + 2 -> n basic blocks in each of three stages (paper section 4.2).
#: (depth - 2) / 6 basic blocks per stage; 8 (one block per stage) is the small network of the
#: `attnzoo compare` default, cheap enough to train eight variants on two cores in minutes.
CIFAR_DEPTHS: dict[int, int] = {8: 1, 14: 2, 20: 3, 32: 5, 44: 7, 56: 9, 110: 18}

#: The papers' settings for ``resnet(depth, conv=NAME)``: constructor defaults, and how many of the
#: last stages have their 3x3 convolutions replaced (None: every stage).
CONV_PAPER_SETTINGS: dict[str, tuple[dict[str, Any], int | None]] = {
    # AA-ResNet (arXiv:1904.09925, sec. 4.1): k = 2v = 0.2, N_h = 8, at least 20 dimensions a key
    # head, every residual block of the last 3 stages (the first stage's maps cost too much memory)
    "aa_conv": ({"value_ratio": 0.1, "min_key_head_dim": 20, "bias": False}, 3),
    # SASA-ResNet (arXiv:1906.05909, sec. 4, "conv-stem + attention"): every spatial convolution,
    # k = 7, 8 heads; the stem stays convolutional
    "sasa": ({}, None),
    # the learned quadratic-encoding layer (arXiv:1911.03584) with 9 heads, a 3x3 conv's worth
    "conv_as_attention": ({"bias": False}, None),
    # LR-Net (arXiv:1904.11491, sec. 4 and Table 1): every 3x3 conv a 7x7 local relation layer,
    # m = 8 (the layer's defaults)
    "local_relation": ({}, None),
}

#: LR-Net's changes beyond the replaced convolutions (arXiv:1904.11491, Table 1, LR-Net-26):
#: bottleneck widths 100, 200, 400, 800 instead of 64 ... 512 (the same FLOPs as ResNet-26), and
#: the 7x7 stem convolution replaced by a 1x1 conv to 64 channels and a 7x7 local relation layer
#: of stride 2. Name -> (bottleneck width ratio, replace the stem).
CONV_NETWORK_CHANGES: dict[str, tuple[float, bool]] = {"local_relation": (100 / 64, True)}


def _conv_plan(
    conv: str, attention: str | None, placement: str | None, num_stages: int, stages: Sequence[int] | None
) -> tuple[dict[str, Any], tuple[int, ...] | None]:
    """Check ``resnet(conv=NAME)`` and return the paper's kwargs and the replaced stages."""
    if attention is not None or placement is not None:
        raise ValueError(
            f"conv: {conv!r} replaces the 3x3 convolutions; pass attention= and placement= without "
            f"it, got attention={attention!r}, placement={placement!r}"
        )
    spec = get_spec(conv)  # KeyError with suggestions for an unknown name
    parameters = inspect.signature(spec.cls).parameters
    if spec.placement != "conv" or not {"out_channels", "stride"} <= parameters.keys():
        raise ValueError(
            f"conv: expected a mechanism with placement='conv' taking (in_channels, out_channels=, "
            f"stride=), got {conv!r} (placement {spec.placement!r})"
        )
    kwargs, last = CONV_PAPER_SETTINGS.get(conv, ({}, None))
    if stages is None:
        chosen = None if last is None else tuple(range(max(0, num_stages - last), num_stages))
    else:
        chosen = tuple(stages)
        if any(not 0 <= s < num_stages for s in chosen):
            raise ValueError(f"conv_stages: expected stage indices in [0, {num_stages}), got {chosen}")
    return dict(kwargs), chosen


def _network_changes(conv: str | None) -> dict[str, Any]:
    """``resnet(conv=NAME)``: the paper network's bottleneck widths and stem (``CONV_NETWORK_CHANGES``)."""
    ratio, stem = CONV_NETWORK_CHANGES.get(conv, (1.0, False)) if conv is not None else (1.0, False)
    return {"bottleneck_ratio": ratio, "replace_stem": stem}


def _sk_defaults(in_width: int, out_width: int) -> dict[str, Any]:
    # SK's G = 32 groups must divide both widths: narrow (CIFAR) layers get the largest divisor
    return {"groups": math.gcd(32, math.gcd(in_width, out_width))}


def _sasa_defaults(in_width: int, out_width: int) -> dict[str, Any]:
    # SASA's 8 heads need a width of 16 k (a row and a column half a head): narrow (CIFAR, compare
    # --width 4) layers get the most heads, at most 8, that divide it
    heads = 8
    while heads > 1 and out_width % (2 * heads):
        heads //= 2
    return {"num_heads": heads}


#: Per-name constructor defaults that depend on the layer's widths (a user's kwargs win).
_WIDTH_DEFAULTS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "sk": _sk_defaults,
    "sasa": _sasa_defaults,
}


@dataclass
class _Plan:
    """Which mechanism goes where, and the modules built so far (kept out of the ResNet's init)."""

    name: str | None
    placement: Placement | None
    kwargs: dict[str, Any]
    stage_kwargs: list[dict[str, Any]]
    factory: dict[str, Any]
    built: list[nn.Module] = field(default_factory=list)
    #: ``conv=``: the module replaces the 3x3 convolution only, its BN and ReLU stay
    keep_norm: bool = False
    #: the stages whose 3x3 convolutions a "conv" placement replaces (None: all)
    conv_stages: tuple[int, ...] | None = None
    #: the inner width of a bottleneck whose 3x3 conv is replaced, times ``planes`` (LR-Net: 100 / 64)
    bottleneck_ratio: float = 1.0
    #: replace the 7x7 stem conv by a 1x1 conv and the mechanism with stride 2 (LR-Net)
    replace_stem: bool = False

    def replaces_conv(self, stage: int) -> bool:
        return self.placement == "conv" and (self.conv_stages is None or stage in self.conv_stages)

    def make(self, stage: int, *args: int, **extra: Any) -> nn.Module:
        assert self.name is not None
        kwargs = {**self.kwargs, **self.stage_kwargs[stage], **extra}
        module = create(self.name, *args, **kwargs, **self.factory)
        self.built.append(module)
        return module

    def make_conv(self, stage: int, in_width: int, out_width: int, stride: int) -> nn.Module:
        assert self.name is not None
        user = {**self.kwargs, **self.stage_kwargs[stage]}
        defaults = _WIDTH_DEFAULTS.get(self.name, lambda i, o: {})(in_width, out_width)
        extra: dict[str, Any] = {k: v for k, v in defaults.items() if k not in user}
        extra["stride"] = stride
        if out_width != in_width:
            extra["out_channels"] = out_width
        return self.make(stage, in_width, **extra)

    def can_change_width(self) -> bool:
        assert self.name is not None
        return "out_channels" in inspect.signature(get_spec(self.name).cls).parameters


def _conv(
    cin: int, cout: int, k: int, stride: int, factory: Mapping[str, Any], dilation: int = 1
) -> nn.Conv2d:
    return nn.Conv2d(
        cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, bias=False, **factory
    )


def _call(module: nn.Module, x: Tensor, maps: dict[str, Any] | None, key: str) -> Tensor:
    """Run an attention module, collecting its maps under ``key`` when ``maps`` is given."""
    if maps is None or not get_spec(module.registry_name).returns_attn:
        return module(x)
    out, attn = module(x, return_attn=True)
    maps[key] = attn
    return out


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34, CIFAR ResNets); attention on the branch or replacing a conv.

    With ``placement="conv"`` the first 3x3 conv (which carries the stride) is replaced, as timm's
    SK basic block does; a module that cannot change the width (``scconv``) replaces the second
    one instead (planes -> planes, stride 1).
    """

    expansion = 1

    def __init__(
        self,
        in_width: int,
        planes: int,
        stride: int,
        stage: int,
        plan: _Plan,
        factory: Mapping[str, Any],
        dilation: int = 1,
    ) -> None:
        super().__init__()
        out_width = planes * self.expansion
        placement = plan.placement
        replaces = plan.replaces_conv(stage)
        replace_first = replaces and (in_width == planes or plan.can_change_width())
        replace_second = replaces and not replace_first
        if replace_first:
            self.conv1: nn.Module = plan.make_conv(stage, in_width, planes, stride)
            self.bn1: nn.Module = nn.BatchNorm2d(planes, **factory) if plan.keep_norm else nn.Identity()
            self.act1: nn.Module = nn.ReLU(inplace=True) if plan.keep_norm else nn.Identity()
        else:
            self.conv1 = _conv(in_width, planes, 3, stride, factory, dilation)
            self.bn1 = nn.BatchNorm2d(planes, **factory)
            self.act1 = nn.ReLU(inplace=True)
        if replace_second:
            self.conv2: nn.Module = plan.make_conv(stage, planes, out_width, 1)
            self.bn2: nn.Module = nn.BatchNorm2d(out_width, **factory) if plan.keep_norm else nn.Identity()
        else:
            self.conv2 = _conv(planes, out_width, 3, 1, factory, dilation)
            self.bn2 = nn.BatchNorm2d(out_width, **factory)
        self.attn = plan.make(stage, out_width) if placement == "residual" else None
        # which conv an attention module replaced: 0 none, 1 or 2
        self.attn_conv = 1 if replace_first else (2 if replace_second else 0)
        self.downsample = _downsample(in_width, out_width, stride, factory)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, maps: dict[str, Any] | None = None, key: str = "") -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = _call(self.conv1, x, maps, key) if self.attn_conv == 1 else self.conv1(x)
        out = self.act1(self.bn1(out))
        out = _call(self.conv2, out, maps, key) if self.attn_conv == 2 else self.conv2(out)
        out = self.bn2(out)
        if self.attn is not None:
            out = _call(self.attn, out, maps, key)
        return self.act(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as torchvision's v1.5), 1x1 expand by 4; attention as placed."""

    expansion = 4

    def __init__(
        self,
        in_width: int,
        planes: int,
        stride: int,
        stage: int,
        plan: _Plan,
        factory: Mapping[str, Any],
        dilation: int = 1,
    ) -> None:
        super().__init__()
        out_width = planes * self.expansion
        self.conv_attn = plan.replaces_conv(stage)
        if self.conv_attn:
            # the inner width (LR-Net: 100 / 64 wider), a multiple of 8 so that groups of m = 8
            # channels divide it (LR-Net's first stage: 104 for the paper's 100)
            planes = 8 * math.ceil(planes * plan.bottleneck_ratio / 8)
        self.conv1 = _conv(in_width, planes, 1, 1, factory)
        self.bn1 = nn.BatchNorm2d(planes, **factory)
        if self.conv_attn:
            self.conv2: nn.Module = plan.make_conv(stage, planes, planes, stride)
            self.bn2: nn.Module = nn.BatchNorm2d(planes, **factory) if plan.keep_norm else nn.Identity()
            self.act2: nn.Module = nn.ReLU(inplace=True) if plan.keep_norm else nn.Identity()
        else:
            self.conv2 = _conv(planes, planes, 3, stride, factory, dilation)
            self.bn2 = nn.BatchNorm2d(planes, **factory)
            self.act2 = nn.ReLU(inplace=True)
        self.conv3 = _conv(planes, out_width, 1, 1, factory)
        self.bn3 = nn.BatchNorm2d(out_width, **factory)
        self.attn = plan.make(stage, out_width) if plan.placement == "residual" else None
        self.downsample = _downsample(in_width, out_width, stride, factory)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, maps: dict[str, Any] | None = None, key: str = "") -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = _call(self.conv2, out, maps, key) if self.conv_attn else self.conv2(out)
        out = self.act2(self.bn2(out))
        out = self.bn3(self.conv3(out))
        if self.attn is not None:
            out = _call(self.attn, out, maps, key)
        return self.act(out + identity)


def _downsample(in_width: int, out_width: int, stride: int, factory: Mapping[str, Any]) -> nn.Module | None:
    """The projection shortcut (1x1 conv + BN) where the shape changes (the paper's option B)."""
    if stride == 1 and in_width == out_width:
        return None
    return nn.Sequential(_conv(in_width, out_width, 1, stride, factory), nn.BatchNorm2d(out_width, **factory))


class Stage(nn.Module):
    """A run of residual blocks at one resolution, with an optional attention module after it."""

    def __init__(self, blocks: Sequence[nn.Module], attn: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn

    def forward(self, x: Tensor, maps: dict[str, Any] | None = None, key: str = "") -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, maps, f"{key}.block{i}")
        if self.attn is not None:
            x = _call(self.attn, x, maps, key)
        return x


class ResNet(nn.Module):
    """A residual network with an attention mechanism in every block or after every stage.

    Build it with :func:`resnet`. ``forward(x)`` gives the class logits; with
    ``return_attn=True`` also a dict of every attention module's maps, keyed ``"stage1.block0"``
    (block modules) and ``"stage1"`` (modules after a stage, BAM).

    Shape:
        - x: (B, in_chans, H, W).
        - output: (B, num_classes); maps (``return_attn``): as each module returns them.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        widths: Sequence[int],
        stem: Literal["imagenet", "cifar"],
        num_classes: int,
        in_chans: int,
        plan: _Plan,
        zero_init_residual: bool = False,
        dilations: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        # a dilated stage keeps its input's resolution (stride 1) and widens its 3x3 convolutions
        # instead (DeepLab, arXiv:1606.00915): the segmentation backbones of output stride 8
        dilations = tuple(dilations) if dilations is not None else (1,) * len(layers)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.attention, self.placement = plan.name, plan.placement
        stem_width = widths[0]
        if stem == "imagenet" and plan.replace_stem:
            # LR-Net: a 1x1 conv and the mechanism with stride 2 (its BN and ReLU), then max pool
            self.stem = nn.Sequential(
                _conv(in_chans, stem_width, 1, 1, factory),
                nn.BatchNorm2d(stem_width, **factory),
                nn.ReLU(inplace=True),
                plan.make_conv(0, stem_width, stem_width, 2),
                nn.BatchNorm2d(stem_width, **factory),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        elif stem == "imagenet":
            # 7x7 stride 2 and a 3x3 max pool: 224 -> 56 before the first stage
            self.stem = nn.Sequential(
                _conv(in_chans, stem_width, 7, 2, factory),
                nn.BatchNorm2d(stem_width, **factory),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            # 3x3 stride 1 and no pooling: small (32-64 px) inputs keep their resolution
            self.stem = nn.Sequential(
                _conv(in_chans, stem_width, 3, 1, factory),
                nn.BatchNorm2d(stem_width, **factory),
                nn.ReLU(inplace=True),
            )
        stages = []
        in_width = stem_width
        for s, (planes, count) in enumerate(zip(widths, layers)):
            blocks = []
            for i in range(count):
                stride = 2 if (i == 0 and s > 0 and dilations[s] == 1) else 1
                blocks.append(block(in_width, planes, stride, s, plan, factory, dilations[s]))
                in_width = planes * block.expansion
            last = s == len(layers) - 1
            attn = plan.make(s, in_width) if plan.placement == "stage" and not last else None
            stages.append(Stage(blocks, attn))
        self.stages = nn.ModuleList(stages)
        self.num_features = in_width
        self.fc = nn.Linear(in_width, num_classes, **factory)
        self._init_weights(plan.built, zero_init_residual)

    def _init_weights(self, attention_modules: list[nn.Module], zero_init_residual: bool) -> None:
        # the attention modules keep their own (paper) initialisation, e.g. GC's zero last conv
        skip = {id(m) for m in attention_modules}

        def visit(module: nn.Module) -> None:
            for child in module.children():
                if id(child) in skip:
                    continue
                if isinstance(child, nn.Conv2d):
                    nn.init.kaiming_normal_(child.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(child, nn.BatchNorm2d):
                    nn.init.ones_(child.weight)
                    nn.init.zeros_(child.bias)
                visit(child)

        visit(self)
        if zero_init_residual:
            for stage in self.stages:
                for block in stage.blocks:
                    last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
                    if isinstance(last_bn, nn.BatchNorm2d):
                        nn.init.zeros_(last_bn.weight)

    def forward_features(self, x: Tensor, maps: dict[str, Any] | None = None) -> Tensor:
        """The last stage's feature map, (B, num_features, H', W')."""
        check_input(x, "x", "B C H W", C=self.in_chans)
        x = self.stem(x)
        for s, stage in enumerate(self.stages):
            x = stage(x, maps, f"stage{s + 1}")
        return x

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Any]]:
        maps: dict[str, Any] | None = {} if return_attn else None
        features = self.forward_features(x, maps)
        logits = self.fc(features.mean(dim=(2, 3)))  # global average pooling, (B, C) -> (B, classes)
        if maps is not None:
            return logits, maps
        return logits


def resnet(
    depth: int,
    attention: str | None = None,
    *,
    num_classes: int | None = None,
    in_chans: int = 3,
    width: int | None = None,
    stem: Literal["imagenet", "cifar"] | None = None,
    placement: Placement | None = None,
    conv: str | None = None,
    conv_stages: Sequence[int] | None = None,
    stage_attention_kwargs: Sequence[Mapping[str, Any]] | None = None,
    zero_init_residual: bool = False,
    output_stride: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **attention_kwargs: Any,
) -> ResNet:
    """A ResNet with the registered mechanism ``attention`` (None: the plain network).

    Depths 18, 34 (basic blocks), 26, 50, 101, 152 (bottlenecks) are the ImageNet networks: four stages
    of widths ``width * (1, 2, 4, 8)`` (64 by default), a 7x7/2 stem with max pooling (or, with
    ``stem="cifar"``, a 3x3/1 stem without pooling, as the BAM/CBAM code trains on CIFAR).
    Depths 8, 14, 20, 32, 44, 56, 110 are the CIFAR ResNets: three stages of (depth - 2) / 6 basic blocks,
    widths ``width * (1, 2, 4)`` (16 by default), a 3x3/1 stem; cheap on CPU for 32-64 px images
    (ResNet-20: 0.27M parameters, 41 MFLOPs at 32 x 32). Shortcuts are 1x1 projections where the
    shape changes; the stride sits on the 3x3 conv (torchvision's "v1.5").

    Args:
        depth: 18, 34, 26, 50, 101, 152 or 8, 14, 20, 32, 44, 56, 110.
        attention: a registered name (``attnzoo.list_modules()``), or None.
        num_classes: output classes (default 1000 for ImageNet depths, 10 for CIFAR depths).
        in_chans: input channels (1 for grey images).
        width: the first stage's width (default 64 ImageNet, 16 CIFAR).
        stem: ``"imagenet"`` or ``"cifar"`` (ImageNet depths only; CIFAR depths always use
            ``"cifar"``).
        placement: ``"residual"``, ``"stage"`` or ``"conv"``; None: the mechanism's paper's
            (its spec's ``placement``, see :data:`attnzoo.registry.PLACEMENTS`).
        conv: a mechanism with ``placement="conv"`` that replaces the spatial 3x3 convolutions
            only (their BN and ReLU stay; the stem stays convolutional), built as
            ``create(conv, in_width, out_channels=, stride=)`` with its paper's settings
            (:data:`CONV_PAPER_SETTINGS`): ``conv="sasa"`` is SASA-ResNet, ``conv="aa_conv"``
            AA-ResNet (last three stages). Not with ``attention=``.
        conv_stages: the stage indices whose convolutions ``conv`` replaces (default: the paper's).
        stage_attention_kwargs: one dict per stage merged over ``attention_kwargs`` for that stage's
            modules, e.g. ECA's per-stage kernel sizes of the released models:
            ``[{"kernel_size": k} for k in (3, 5, 5, 7)]``.
        zero_init_residual: zero the last BN of each block so blocks start as identities.
        output_stride: the input's size over the last stage's (None: the network's own, 32 for
            the ImageNet stem, 4 for the CIFAR one); a smaller power of two replaces the strides
            of the last stages by dilations (DeepLab, arXiv:1606.00915): ``output_stride=8`` is
            the dilated ResNet of the segmentation papers (the last two stages dilated 2 and 4).
            A ``"conv"`` mechanism in a dilated stage runs undilated.
        device, dtype: for every parameter (``device="meta"`` counts parameters without memory).
        **attention_kwargs: passed to every attention module's constructor.

    Raises:
        ValueError: unknown depth or stem, a mechanism that does not preserve shape on the residual
            branch, stage kwargs of the wrong length, kwargs without a mechanism.
        KeyError: an unknown mechanism name.
    """
    if depth in IMAGENET_DEPTHS:
        kind, layers = IMAGENET_DEPTHS[depth]
        stem = stem or "imagenet"
        base = 64 if width is None else width
        widths = [base * m for m in (1, 2, 4, 8)]
        classes = 1000 if num_classes is None else num_classes
    elif depth in CIFAR_DEPTHS:
        kind, layers = "basic", (CIFAR_DEPTHS[depth],) * 3
        if stem not in (None, "cifar"):
            raise ValueError(f"stem: CIFAR depth {depth} uses the 'cifar' stem, got {stem!r}")
        stem = "cifar"
        base = 16 if width is None else width
        widths = [base * m for m in (1, 2, 4)]
        classes = 10 if num_classes is None else num_classes
    else:
        known = sorted([*IMAGENET_DEPTHS, *CIFAR_DEPTHS])
        raise ValueError(f"depth: expected one of {known}, got {depth}")
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"stem: expected 'imagenet' or 'cifar', got {stem!r}")
    check_positive(num_classes=classes, in_chans=in_chans, width=base)
    if placement not in (None, "residual", "stage", "conv"):
        raise ValueError(f"placement: expected 'residual', 'stage', 'conv' or None, got {placement!r}")

    conv_kwargs: dict[str, Any] = {}
    replaced_stages: tuple[int, ...] | None = None
    if conv is not None:
        conv_kwargs, replaced_stages = _conv_plan(conv, attention, placement, len(layers), conv_stages)
        attention, placement = conv, "conv"
    elif conv_stages is not None:
        raise ValueError(f"conv_stages: only with conv=NAME, got {conv_stages!r} without it")
    if attention is None:
        if attention_kwargs or stage_attention_kwargs or placement:
            raise ValueError(
                f"attention: None, but attention arguments were given: "
                f"{sorted(attention_kwargs) or stage_attention_kwargs or placement}"
            )
        plan_placement = None
    else:
        spec = get_spec(attention)  # KeyError with suggestions for an unknown name
        plan_placement = placement or spec.placement
        if plan_placement != "conv" and not spec.shape_preserving:
            raise ValueError(
                f"attention: {attention!r} does not preserve its input's shape, so it cannot go "
                f"{'on the residual branch' if plan_placement == 'residual' else 'after a stage'}"
            )
        if plan_placement not in ("residual", "stage", "conv"):
            raise ValueError(
                f"attention: {attention!r} goes {'on a network head' if plan_placement else 'on sequences'} "
                f"(placement {plan_placement!r}), not in a ResNet's residual stages"
            )
    if stage_attention_kwargs is None:
        stage_kwargs: list[dict[str, Any]] = [{} for _ in layers]
    else:
        stage_kwargs = [dict(k) for k in stage_attention_kwargs]
        if len(stage_kwargs) != len(layers):
            raise ValueError(
                f"stage_attention_kwargs: expected one mapping per stage ({len(layers)}), "
                f"got {len(stage_kwargs)}"
            )
    factory = {"device": device, "dtype": dtype}
    plan = _Plan(
        attention,
        plan_placement,
        {**conv_kwargs, **attention_kwargs},
        stage_kwargs,
        factory,
        keep_norm=conv is not None,
        conv_stages=replaced_stages,
        **_network_changes(conv),
    )
    block = BasicBlock if kind == "basic" else Bottleneck
    dilations = _stage_dilations(4 if stem == "imagenet" else 1, len(layers), output_stride)
    return ResNet(
        block,
        layers,
        widths=widths,
        stem=stem,
        num_classes=classes,
        in_chans=in_chans,
        plan=plan,
        zero_init_residual=zero_init_residual,
        dilations=dilations,
        **factory,
    )


def _stage_dilations(stem_stride: int, num_stages: int, output_stride: int | None) -> tuple[int, ...] | None:
    """Each stage's dilation for ``output_stride``: once the stride is reached, every later stage
    keeps the resolution and doubles the dilation (None: no dilation)."""
    if output_stride is None:
        return None
    valid = [stem_stride * 2**k for k in range(num_stages)]
    if output_stride not in valid:
        raise ValueError(f"output_stride: expected one of {valid} for this network, got {output_stride!r}")
    dilations, reached, dilation = [], stem_stride, 1
    for s in range(num_stages):
        if s > 0 and reached < output_stride:
            reached *= 2
        elif s > 0:
            dilation *= 2
        dilations.append(dilation)
    return tuple(dilations)
