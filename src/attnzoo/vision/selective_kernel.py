"""Selective kernel convolution (SKNet): a softmax across kernel branches, per channel.

Li et al. 2019, "Selective Kernel Networks", https://arxiv.org/abs/1903.06586.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.softmax import masked_softmax, mean_of
from attnzoo.layers import LayerSpec, create_layer, reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._norm import NormSpec, check_batch_statistics, create_norm

__all__ = ["SelectiveKernel"]


@register(
    "sk",
    placement="conv",
    map_kind="channel",
    linear_memory=True,
    family="gating",
    paper=Paper("Selective Kernel Networks", "1903.06586"),
    equation="U_m = ReLU(BN(conv_m(X))) (3x3 and 3x3 dilation 2, G = 32 groups); "
    "z = ReLU(BN(W GAP(sum_m U_m))), d = max(C/r, L); a_m = softmax_m(A_m z); V = sum_m a_m * U_m",
    # G = 32 is the paper's; narrower test widths get the largest group count dividing them
    make_kwargs=lambda s: {"channels": s.width, "groups": math.gcd(32, s.width)},
    make_inputs=image_input,
    cost="time O(M B HW C C_in 9 / G + B C d (M + 1)); memory O(M B C HW) (the branch outputs)",
    notes="the paper's '5x5' branch is a 3x3 conv with dilation 2 (paper and official Caffe code); "
    "kernel_sizes=(3, 5), dilations=(1, 1) gives true 5x5 kernels as some re-implementations do; "
    "norm_layer replaces every BatchNorm (None: no normalisation)",
    samples=(
        Sample(
            "kernel_sizes=(3, 5)",
            {"kernel_sizes": (3, 5), "dilations": (1, 1)},
            description="a true 5x5 branch",
        ),
        Sample(
            "norm_layer=GroupNorm",
            {"norm_layer": lambda s: functools.partial(nn.GroupNorm, 2)},
            description="GroupNorm instead of BatchNorm (trains with a batch of one)",
        ),
        Sample("norm_layer=None", {"norm_layer": None}, description="no normalisation"),
    ),
)
class SelectiveKernel(nn.Module):
    """Selective kernel (SK) convolution: M conv branches mixed by a softmax over branches per channel.

    Split: ``U_m = ReLU(BN(F_m(X)))`` for M grouped convolutions F_m (paper: a 3x3 conv and a
    "5x5" realised as a 3x3 conv with dilation 2, G = 32 groups). Fuse:
    ``s = GAP(U)`` with ``U = sum_m U_m``, ``z = ReLU(BN(W s))`` with W: C -> d,
    ``d = max(C/r, L)`` (r = 16, L = 32; paper eq. 4). Select:
    ``a_m = exp(A_m z) / sum_m' exp(A_m' z)`` (a softmax across the branches for each channel,
    eq. 5) and ``V = sum_m a_m * U_m`` (eq. 6). Like the official code, no layer has a bias
    (each is followed by BN or the softmax).

    A drop-in replacement for the 3x3 conv (with its BN and ReLU) of a ResNeXt bottleneck:
    ``channels -> out_channels`` with ``stride``.

    The floor L keeps the bottleneck from collapsing on narrow layers: with C = 256 (SKNet-50
    stage 1), C/r = 16 but d = 32. BN on z means a training batch needs more than one sample.

    Args:
        channels: C_in, the input width.
        out_channels: C, the output width (default: ``channels``).
        stride: stride of every branch conv (the output is ``ceil(H / stride)`` on a side).
        groups: G, the group count of each branch conv (paper: 32); must divide both widths.
        rd_ratio: 1/r (paper: 1/16).
        rd_channels: d, overriding ``rd_ratio`` and ``min_rd_channels``.
        min_rd_channels: L, the floor of d (paper: 32; 1 disables it).
        kernel_sizes: the kernel size of each branch (paper: (3, 3)).
        dilations: the dilation of each branch (paper: (1, 2)); same length as ``kernel_sizes``.
        act_layer: the activation of the branches and of z (default ReLU).
        norm_layer: the normalisation of the branches and of z, a factory ``(num_features,
            device=, dtype=) -> nn.Module`` applied to (B, C, H, W) maps and to z as (B, d, 1, 1)
            (default ``nn.BatchNorm2d``, as in the paper; e.g. ``functools.partial(nn.GroupNorm,
            32)``); None for none.

    Shape:
        - x: (B, C_in, H, W).
        - output: (B, C, H', W'), H' = ceil(H / stride); attention (``return_attn``): the branch
          weights a, (B, M, C, 1, 1), summing to 1 over M.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        groups: int = 32,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        min_rd_channels: int = 32,
        kernel_sizes: Sequence[int] = (3, 3),
        dilations: Sequence[int] = (1, 2),
        act_layer: LayerSpec = "relu",
        norm_layer: NormSpec = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        check_positive(channels=channels, out_channels=out_channels, stride=stride, groups=groups)
        check_positive(min_rd_channels=min_rd_channels)
        if channels % groups or out_channels % groups:
            raise ValueError(
                f"groups: expected a divisor of channels={channels} and out_channels={out_channels}, "
                f"got {groups} (math.gcd(32, channels) is the usual choice for narrow layers)"
            )
        kernel_sizes, dilations = tuple(kernel_sizes), tuple(dilations)
        if len(kernel_sizes) != len(dilations):
            raise ValueError(
                f"dilations: expected one per branch ({len(kernel_sizes)} kernel_sizes), got {len(dilations)}"
            )
        if len(kernel_sizes) < 2:
            raise ValueError(f"kernel_sizes: expected at least 2 branches to select from, got {kernel_sizes}")
        for k in kernel_sizes:
            if k < 1 or k % 2 == 0:
                raise ValueError(f"kernel_sizes: expected odd positive sizes, got {kernel_sizes}")
        for d in dilations:
            check_positive(dilations=d)
        self.channels, self.out_channels, self.stride = channels, out_channels, stride
        self.num_branches = len(kernel_sizes)
        if rd_channels is None:
            width = max(reduced_width(out_channels, rd_ratio), min_rd_channels)
        else:
            width = reduced_width(out_channels, rd_ratio, rd_channels)
        self.rd_channels = width
        factory = {"device": device, "dtype": dtype}
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(
                    channels,
                    out_channels,
                    k,
                    stride=stride,
                    padding=d * (k - 1) // 2,
                    dilation=d,
                    groups=groups,
                    bias=False,
                    **factory,
                ),
                create_norm(norm_layer, out_channels, **factory),
                create_layer(act_layer, argument="act_layer"),
            )
            for k, d in zip(kernel_sizes, dilations)
        )
        self.fc = nn.Linear(out_channels, width, bias=False, **factory)  # W
        # on z as (B, d, 1, 1): BatchNorm2d there is the paper's BatchNorm over (B, d)
        self.norm = create_norm(norm_layer, width, **factory)
        self.act = create_layer(act_layer, argument="act_layer")
        # A_1, ..., A_M stacked into one layer: output m * C + c is row c of A_m
        self.select = nn.Linear(width, self.num_branches * out_channels, bias=False, **factory)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        check_batch_statistics(self.norm, x, "the BatchNorm of the fuse step's z (norm)")
        feats = [branch(x) for branch in self.branches]  # M x (B, C, H', W')
        # GAP is linear: GAP(sum_m U_m) = sum_m GAP(U_m), without materialising U
        pooled = mean_of(feats[0], (2, 3))  # (B, C)
        for feat in feats[1:]:
            pooled = pooled + mean_of(feat, (2, 3))
        batch = x.shape[0]
        z = self.norm(self.fc(pooled)[:, :, None, None])  # (B, d) -> (B, d, 1, 1)
        z = self.act(z.flatten(1))  # (B, d, 1, 1) -> (B, d)
        logits = self.select(z).view(batch, self.num_branches, self.out_channels)  # (B, M*C) -> (B, M, C)
        # softmax in at least float32: half-precision logits lose the small differences that matter
        weights = masked_softmax(logits, dim=1)
        weights = weights.to(x.dtype).view(batch, self.num_branches, self.out_channels, 1, 1)
        out = feats[0] * weights[:, 0]
        for m in range(1, self.num_branches):
            out = torch.addcmul(out, feats[m], weights[:, m])
        return (out, weights) if return_attn else out
