"""Dynamic graph message passing (DGMN): each node samples its own neighbours and filters.

Zhang, Li, Arnab and Torr 2020, "Dynamic Graph Message Passing Networks" (CVPR 2020),
https://arxiv.org/abs/1908.06955. Official code: lzrobots/dgmn
(``maskrcnn_benchmark/layers/dynamic_weight.py``, ``ReDynamicWeightsCat33``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, check_variant, parameter_dtype
from attnzoo.functional.global_reasoning import deformed_tap
from attnzoo.functional.softmax import masked_softmax
from attnzoo.registry import Paper, Sample, image_input, register

__all__ = ["DynamicGraphMessagePassing"]

Variant = Literal["paper", "official"]
_TAPS = 9  # a 3 x 3 neighbourhood


class _DeformableTaps(nn.Module):
    """A 3x3 deformable convolution without bias: ``sum_k W[:, :, k] s_k`` over the 9 taps'
    samples s_k (each (B, C, H, W), read at a learned offset), W of shape (C_out, C, 3, 3).

    Not an ``nn.Conv2d``, which would convolve the regular grid, yet with its weight's name, shape
    and initialisation (so a checkpoint's ``kernel.weight`` loads as it would into one): the module
    is called on every forward, so that its hooks run (``torch.nn.utils.prune`` recomputes the
    weight in a pre-hook; adapters and feature taps hang on forward hooks). It takes the sampler
    (tap index -> samples), not the samples: the 9 taps are taken one at a time, never all held.
    """

    def __init__(self, in_channels: int, out_channels: int, factory: dict) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (3, 3)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's initialisation

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bias=False"

    def forward(self, sample_tap: Callable[[int], Tensor]) -> Tensor:
        # (C_out, C, 3, 3) -> 9 x (C_out, C, 1, 1): the 1x1 kernel of each tap, row-major
        tap_kernels = self.weight.flatten(2).unbind(2)
        return sum(
            F.conv2d(sample_tap(k), tap_kernel[..., None, None]) for k, tap_kernel in enumerate(tap_kernels)
        )  # (B, C_out, H, W)


class _Dilation(nn.Module):
    """The parameters of one sampling rate: offsets, the deformable filter/affinity conv, gamma."""

    def __init__(self, channels: int, groups: int, dilation: int, factory: dict) -> None:
        super().__init__()
        self.dilation = dilation
        # 3x3 conv at this dilation -> (dy, dx) for each of the 9 taps
        self.offset = nn.Conv2d(
            channels, 2 * _TAPS, 3, padding=dilation, dilation=dilation, bias=False, **factory
        )
        # a deformable 3x3 conv (applied on the offset samples) -> G*9 filter logits + 9 affinity logits
        self.kernel = _DeformableTaps(channels, groups * _TAPS + _TAPS, factory)
        self.gamma = nn.Parameter(torch.ones(1, **factory))


@register(
    "dgmn",
    family="non_local",
    paper=Paper("Dynamic Graph Message Passing Networks", "1908.06955"),
    equation="per dilation d in (1, 4, 8, 12): samples s_k = x(p + d k + Delta_k(p)) (3x3, bilinear); "
    "[f, a] = DeformConv_d(x); m_d(p)_c = sum_k f_{g(c),k}(p) softmax_k(a)(p) s_k,c; "
    "out = x + sum_d gamma_d m_d",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B HW C (G + 1) 9 D + B HW C 9 D) for D dilations; memory O(B HW C): the 9 samples "
    "are taken one tap at a time (grid_sample), never unfolded",
    placement="head",
    map_kind="mixed",
    linear_memory=True,
    samples=(
        Sample(
            "official",
            kwargs={"variant": "official"},
            description="the official fourth branch reads its affinity from filter channels",
        ),
        Sample("groups", kwargs={"groups": 2, "dilations": (1, 2)}, description="G = 2, two rates"),
    ),
    notes="variant='official' reproduces ReDynamicWeightsCat33's fourth branch, whose affinity is "
    "sliced from the last group's filter logits instead of its own 9 channels. Offsets are "
    "zero-initialised (the sampling starts as a plain dilated 3x3 grid); gamma starts at 1 as in "
    "the official code.",
)
class DynamicGraphMessagePassing(nn.Module):
    """DGMN block: dynamic sampling, node-conditioned filters and affinities, per-rate gamma.

    For each sampling rate d (official: 1, 4, 8, 12), every position p (a node):

    1. predicts 9 offsets Delta_k(p) (a 3x3 conv at dilation d) and samples its neighbours
       ``s_k(p) = x(p + d k + Delta_k(p))`` bilinearly (k over the 3x3 grid): a random walk of the
       paper instantiated as deformable sampling;
    2. predicts, from those samples (a deformable 3x3 conv), G x 9 filter weights f and 9 affinity
       logits a, the affinities normalised by a softmax over the 9 samples;
    3. passes the message ``m_d(p)_c = sum_k f_{g(c),k}(p) a_k(p) s_k(p)_c`` with channel c in group
       g(c) (C/G consecutive channels per group).

    Then ``out = x + sum_d gamma_d m_d`` (gamma_d starts at 1, as in the official code). The
    samples are taken one tap at a time with ``grid_sample`` (no torchvision, no custom op), twice
    (once for the filter conv, once for the message) so that memory stays O(C HW), not the 9x of
    an unfold.

    Args:
        channels: C (divisible by ``groups``).
        groups: G, channel groups sharing a dynamic filter (official: 4).
        dilations: the sampling rates (official: 1, 4, 8, 12).
        variant: ``"paper"`` (every rate uses its own affinity channels) or ``"official"`` (the
            fourth rate's affinity is the last group's filter logits, the official code's slip).

    Shape:
        - x: (B, C, H, W); output: the same.
        - attention (``return_attn``): ``{"dilation_<d>": (B, H, W, 9)}``, the affinities of each
          position over its 9 samples (softmax, rows sum to 1).
    """

    def __init__(
        self,
        channels: int,
        *,
        groups: int = 4,
        dilations: Sequence[int] = (1, 4, 8, 12),
        variant: Variant = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels, groups=groups)
        check_variant(variant)
        if channels % groups:
            raise ValueError(f"groups: expected a divisor of channels ({channels}), got {groups}")
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"dilations: expected positive sampling rates, got {tuple(dilations)}")
        self.channels, self.groups, self.variant = channels, groups, variant
        self.dilations = tuple(int(d) for d in dilations)
        factory = {"device": device, "dtype": dtype}
        self.rates = nn.ModuleList(_Dilation(channels, groups, d, factory) for d in self.dilations)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets zero (a plain dilated grid at init), gamma one (the official value)."""
        for rate in self.rates:
            nn.init.zeros_(rate.offset.weight)
            rate.kernel.reset_parameters()
            nn.init.ones_(rate.gamma)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, groups={self.groups}, dilations={self.dilations}, "
            f"variant={self.variant!r}"
        )

    def _message(self, x: Tensor, index: int, rate: _Dilation) -> tuple[Tensor, Tensor]:
        """m_d for one rate, (B, C, H, W), and its affinities, (B, 9, H, W)."""
        offsets = rate.offset(x)  # (B, 18, H, W)
        # Each tensor read once per tap is unbound (or split) once, never indexed per tap: the
        # backward of unbind stacks the taps' gradients into one buffer, where each index's
        # backward would zero-fill a buffer of the whole tensor of its own.
        # (B, 18, H, W) -> (B, 9, 2, H, W) -> 9 x (B, 2, H, W): each tap's (dy, dx)
        tap_offsets = offsets.unflatten(1, (_TAPS, 2)).unbind(1)
        # deformable conv: sum over the taps of a 1x1 conv of each tap's samples, (B, G*9 + 9, H, W)
        logits = rate.kernel(lambda k: deformed_tap(x, tap_offsets[k], rate.dilation, k))
        n_filters = self.groups * _TAPS
        filter_logits, own_affinity_logits = logits.split([n_filters, _TAPS], 1)
        filters = filter_logits.unflatten(1, (self.groups, _TAPS))  # (B, G, 9, H, W)
        if self.variant == "official" and index == 3:
            # NOTE: deviates from the paper on purpose: the official code slices the fourth
            # branch's affinity from its filter logits (the last group's), not its own channels
            affinity_logits = filter_logits[:, n_filters - _TAPS :]
        else:
            affinity_logits = own_affinity_logits
        affinity = masked_softmax(affinity_logits, dim=1)  # over the 9 samples, float32 for half
        weights = filters * affinity.unsqueeze(1).to(filters.dtype)  # (B, G, 9, H, W)
        message = sum(
            # (B, C, H, W) -> (B, G, C/G, H, W), scaled by the group's weight of tap k, (B, G, 1, H, W)
            deformed_tap(x, tap_offsets[k], rate.dilation, k).unflatten(1, (self.groups, -1))
            * tap_weights.unsqueeze(2)
            for k, tap_weights in enumerate(weights.unbind(2))
        )
        return message.flatten(1, 2), affinity  # (B, G, C/G, H, W) -> (B, C, H, W)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        out, maps = x, {}
        for index, rate in enumerate(self.rates):
            message, affinity = self._message(x, index, rate)
            out = out + rate.gamma * message
            maps[f"dilation_{rate.dilation}"] = affinity.permute(0, 2, 3, 1)  # (B, 9, H, W) -> (B, H, W, 9)
        return (out, maps) if return_attn else out
