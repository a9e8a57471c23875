"""Split attention (ResNeSt): a softmax across radix splits within each cardinal group.

Zhang et al. 2020, "ResNeSt: Split-Attention Networks", https://arxiv.org/abs/2004.08955.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.layers import LayerSpec, call_layer, create_layer, reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._norm import NormSpec, check_batch_statistics, create_norm

__all__ = ["SplitAttention"]


@register(
    "split_attention",
    placement="conv",
    map_kind="channel",
    linear_memory=True,
    family="gating",
    paper=Paper("ResNeSt: Split-Attention Networks", "2004.08955"),
    equation="U_{k,r} = ReLU(BN(conv3x3_{k,r}(X))); s^k = GAP(sum_r U_{k,r}); "
    "a^k_r = softmax_r(G_r(s^k)) (sigmoid if R = 1); V^k = sum_r a^k_r * U_{k,r}; V = [V^1, ..., V^K]",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B HW C C_in R 9 / (K R) + B C d R / K); memory O(R B C HW) (the radix splits)",
    notes="radix-major splits and cardinality-major attention logits, as in the official SplAtConv2d "
    "(its weights load here); the mid width uses the input width, max(C_in * R // 4, 32); "
    "norm_layer replaces both BatchNorms (None: no normalisation)",
    samples=(
        Sample("radix=1", {"radix": 1}, description="one split: a sigmoid gate"),
        Sample("cardinality=2", {"cardinality": 2}, description="two cardinal groups"),
        Sample(
            "norm_layer=GroupNorm",
            {"norm_layer": lambda s: functools.partial(nn.GroupNorm, 2)},
            description="GroupNorm instead of BatchNorm (trains with a batch of one)",
        ),
        Sample("norm_layer=None", {"norm_layer": None}, description="no normalisation"),
    ),
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
        act_layer: the activation after the conv and in G (default ReLU; a ``nn.ReLU`` after the
            conv's norm runs in place, as in the official code, which saves a full-size buffer).
        norm_layer: the normalisation after the conv and in G, a factory ``(num_features, device=,
            dtype=) -> nn.Module`` (default ``nn.BatchNorm2d``, as in the paper; e.g.
            ``functools.partial(nn.GroupNorm, 32)``); None for none.

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
        norm_layer: NormSpec = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        check_positive(channels=channels, out_channels=out_channels, stride=stride)
        check_positive(radix=radix, cardinality=cardinality, min_rd_channels=min_rd_channels)
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
        self.bn0 = create_norm(norm_layer, out_channels * radix, **factory)
        self.act0 = create_layer(act_layer, argument="act_layer")
        if type(self.act0) is nn.ReLU:
            # in place on the norm's output, which nothing else keeps (BatchNorm's backward reads
            # its input): one full-size (B, R*C, H', W') buffer less in training
            self.act0.inplace = True
        self.fc1 = nn.Conv2d(out_channels, width, 1, groups=cardinality, **factory)
        self.bn1 = create_norm(norm_layer, width, **factory)
        self.act1 = create_layer(act_layer, argument="act_layer")
        self.fc2 = nn.Conv2d(width, out_channels * radix, 1, groups=cardinality, **factory)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        check_batch_statistics(self.bn1, x, "the BatchNorm of the attention MLP G (bn1)")
        batch, radix, channels, card = x.shape[0], self.radix, self.out_channels, self.cardinality
        feats = call_layer(self.act0, call_layer(self.bn0, call_layer(self.conv, x)))  # (B, R*C, H', W')
        height, width = feats.shape[-2:]
        splits = feats.view(batch, radix, channels, height, width)  # (B, R*C, H', W') -> (B, R, C, H', W')
        # GAP(sum_r U_r) as sums over (h, w), then over r, then a scale on the (B, C) result: no
        # (B, C, H', W') temporary, and every backward step is a broadcast view (a mean per split
        # would write a full-size (B, R, C, H', W') gradient; one sum over the non-adjacent dims
        # (r, h, w) makes a full-size float32 copy of half-precision input)
        pooled = splits.sum(dim=(3, 4)).sum(dim=1) * (1.0 / (height * width))  # (B, C)
        hidden = call_layer(
            self.act1, call_layer(self.bn1, call_layer(self.fc1, pooled.view(batch, channels, 1, 1)))
        )  # (B, d, 1, 1)
        logits = call_layer(self.fc2, hidden)  # (B, R*C, 1, 1), cardinality-major
        # (B, R*C, 1, 1) -> (B, K, R, C/K): fc2's groups are the cardinal groups
        logits = logits.view(batch, card, radix, channels // card)
        # in x's dtype: the kernels compute half precision in float32 and round once, and the
        # weights meet the splits (and are returned) in x's dtype, so a float32 result would only
        # add two casts (softmax over R entries: no long sum to keep accurate)
        weights = torch.softmax(logits, dim=2) if radix > 1 else torch.sigmoid(logits)
        # (B, K, R, C/K) -> (B, R, K, C/K) -> (B, R, C, 1, 1): split-major, like the conv output
        weights = weights.transpose(1, 2).reshape(batch, radix, channels, 1, 1)
        # sum_r a_r * U_r without a (B, R, C, H', W') product temporary; unbind, not indexing:
        # the backward stacks the R gradients into one buffer where each index would write its own
        # full-size zero-filled one
        parts, part_weights = splits.unbind(dim=1), weights.unbind(dim=1)  # R x (B, C, H', W')
        out = parts[0] * part_weights[0]  # (B, C, H', W')
        for r in range(1, radix):
            out = torch.addcmul(out, parts[r], part_weights[r])
        return (out, weights) if return_attn else out
