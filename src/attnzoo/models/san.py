"""SAN10 / SAN15 / SAN19: the self-attention networks of Zhao, Jia and Koltun 2020.

"Exploring Self-attention for Image Recognition" (CVPR 2020), https://arxiv.org/abs/2004.13621,
architecture as in the official code (hszhao/SAN, ``model/san.py`` and ``config/imagenet``):

- stem: 1x1 conv 3 -> 64, BN, ReLU (no strided or 7x7 convolution);
- five stages at widths 64, 256, 512, 1024, 2048, each: 2x2 max-pool, a 1x1 transition conv,
  the stage's pre-activation bottlenecks, BN, ReLU;
- bottleneck: BN-ReLU, SAN layer (C -> C/4, relation width C/16, 8 channels per weight map),
  BN-ReLU, 1x1 conv (C/4 -> C), plus the identity;
- footprints (3, 7, 7, 7, 7); blocks per stage SAN10 (2, 1, 2, 4, 1), SAN15 (3, 2, 3, 5, 2),
  SAN19 (3, 3, 4, 6, 3).

Parameter counts (official table: pairwise 10.5 / 14.1 / 17.6 M, patchwise 11.8 / 16.2 / 20.5 M
with 1000 classes) are checked in ``tests/models/test_san.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, parameter_dtype
from attnzoo.vision.san import SANAttention

__all__ = ["SAN", "SAN_DEPTHS", "SANBottleneck", "san"]

#: Depth -> blocks per stage (official configs).
SAN_DEPTHS: dict[int, tuple[int, ...]] = {
    10: (2, 1, 2, 4, 1),
    15: (3, 2, 3, 5, 2),
    19: (3, 3, 4, 6, 3),
}
#: Footprint of each stage: 3 in the first (at 112 x 112), 7 after.
SAN_KERNELS: tuple[int, ...] = (3, 7, 7, 7, 7)
#: Stage widths.
SAN_WIDTHS: tuple[int, ...] = (64, 256, 512, 1024, 2048)

Mode = Literal["pairwise", "patchwise"]


class SANBottleneck(nn.Module):
    """Pre-activation SAN block: ``x + conv1x1(ReLU(BN(SA(ReLU(BN(x))))))``.

    Shape:
        - x: (B, C, H, W); output: (B, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        *,
        mode: Mode,
        kernel_size: int,
        share_channels: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        mid = channels // 4
        self.bn1 = nn.BatchNorm2d(channels, **factory)
        self.attn = SANAttention(
            channels,
            mid,
            mode=mode,
            kernel_size=kernel_size,
            rel_channels=channels // 16,
            share_channels=share_channels,
            **factory,
        )
        self.bn2 = nn.BatchNorm2d(mid, **factory)
        self.conv = nn.Conv2d(mid, channels, 1, **factory)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.attn(self.act(self.bn1(x)))
        return x + self.conv(self.act(self.bn2(out)))


class SAN(nn.Module):
    """A SAN network (official architecture; see the module docstring).

    Args:
        layers: blocks per stage (five stages).
        mode: ``"pairwise"`` or ``"patchwise"``.
        kernels: footprint per stage (official: 3, 7, 7, 7, 7).
        num_classes: classifier outputs (1000 for ImageNet).
        in_chans: input channels.

    Shape:
        - x: (B, in_chans, H, W), H and W at least 128: after five 2x2 max-pools the last
          stage's 7 x 7 footprint needs a map of at least 4 x 4 for its reflection padding
          (224 -> 7 x 7 there).
        - output: (B, num_classes).
    """

    def __init__(
        self,
        layers: Sequence[int],
        mode: Mode = "pairwise",
        *,
        kernels: Sequence[int] = SAN_KERNELS,
        num_classes: int = 1000,
        in_chans: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != 5 or len(kernels) != 5:
            raise ValueError(
                f"layers, kernels: expected 5 stages each, got {tuple(layers)} and {tuple(kernels)}"
            )
        factory = {"device": device, "dtype": dtype}
        self.in_chans = in_chans
        width = SAN_WIDTHS[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 1, bias=False, **factory), nn.BatchNorm2d(width, **factory), nn.ReLU()
        )
        stages = []
        previous = width
        for width, blocks, kernel in zip(SAN_WIDTHS, layers, kernels):
            stages.append(
                nn.Sequential(
                    nn.MaxPool2d(2, 2),
                    nn.Conv2d(previous, width, 1, bias=False, **factory),  # transition
                    *(SANBottleneck(width, mode=mode, kernel_size=kernel, **factory) for _ in range(blocks)),
                    nn.BatchNorm2d(width, **factory),
                    nn.ReLU(),
                )
            )
            previous = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes, **factory)

    def forward_features(self, x: Tensor) -> Tensor:
        check_input(x, "x", "B C H W", C=self.in_chans, dtype=parameter_dtype(self))
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.forward_features(x)).flatten(1))  # (B, C, 1, 1) -> (B, C) -> logits


def san(
    depth: int,
    mode: Mode = "pairwise",
    *,
    num_classes: int = 1000,
    in_chans: int = 3,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SAN:
    """SAN10, SAN15 or SAN19, pairwise or patchwise (official architecture).

    Example:
        >>> net = san(10, "patchwise", num_classes=10)
        >>> net(torch.randn(1, 3, 128, 128)).shape
        torch.Size([1, 10])
    """
    if depth not in SAN_DEPTHS:
        raise ValueError(f"depth: expected one of {sorted(SAN_DEPTHS)}, got {depth!r}")
    if mode not in ("pairwise", "patchwise"):
        raise ValueError(f"mode: expected 'pairwise' or 'patchwise', got {mode!r}")
    return SAN(
        SAN_DEPTHS[depth], mode, num_classes=num_classes, in_chans=in_chans, device=device, dtype=dtype
    )
