"""Point-wise spatial attention (PSANet): every position predicts its own attention map.

Zhao, Zhang, Liu, Shi, Loy, Lin and Jia 2018, "PSANet: Point-wise Spatial Attention Network for
Scene Parsing" (ECCV 2018). Official code: hszhao/semseg (``model/psanet.py``, ``lib/psa``);
mmcv's ``PSAMask`` and mmsegmentation's ``PSAHead``.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_pair, check_positive, check_variant, parameter_dtype
from attnzoo._tracing import is_eager
from attnzoo.functional.global_reasoning import covers_map, point_wise_attention_, point_wise_logits
from attnzoo.functional.softmax import masked_softmax, softmax_
from attnzoo.layers import NormLayer, create_norm, norm_input, reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._spatial import from_tokens, to_tokens

__all__ = ["PointwiseSpatialAttention"]

Branches = Literal["both", "collect", "distribute"]
Variant = Literal["paper", "official"]


def _conv_bn_relu(
    in_ch: int, out_ch: int, norm_layer: NormLayer, factory: dict, kernel: int = 1
) -> nn.Sequential:
    """Conv (no bias: the norm's shift replaces it) + norm + ReLU; a bias without a norm."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=norm_layer is None, **factory),
        create_norm(norm_layer, out_ch, **factory),
        nn.ReLU(),
    )


class _Branch(nn.Module):
    """One direction: reduce, predict the over-complete maps, re-index, softmax, aggregate."""

    def __init__(
        self, channels: int, inner: int, mask_size: tuple[int, int], norm_layer: NormLayer, factory: dict
    ) -> None:
        super().__init__()
        self.reduce = _conv_bn_relu(channels, inner, norm_layer, factory)
        self.predict = nn.Sequential(
            _conv_bn_relu(inner, inner, norm_layer, factory),
            nn.Conv2d(inner, mask_size[0] * mask_size[1], 1, bias=False, **factory),
        )


@register(
    "psa",
    family="non_local",
    paper=Paper("PSANet: Point-wise Spatial Attention Network for Scene Parsing", venue="ECCV 2018"),
    equation="collect: z_i = sum_j softmax_j(a^c_i[j - i]) x_j; "
    "distribute: z_j = sum_i softmax_i(a^d_i[j - i]) x_i; a_i = the (2H-1)x(2W-1) map predicted "
    "at i; out = fuse(cat[x, proj(cat[z^c, z^d])])",
    make_kwargs=lambda s: {"channels": s.width, "mask_size": 2 * s.extent - 1},
    make_inputs=image_input,
    cost="time O(B HW C C' + B (HW) m_h m_w C' + B (HW)^2 C'); memory O(B HW m_h m_w) for the "
    "predicted maps (about 4 (HW)^2 at full coverage), re-indexed in their own storage in inference "
    "when the window covers the map; otherwise plus the (HW)^2 re-indexed logits",
    placement="head",
    map_kind="mixed",
    samples=(
        Sample(
            "partial_window",
            kwargs={"mask_size": lambda s: (s.extent - 1) | 1},
            description="a mask window smaller than the map: far positions masked",
            thorough=True,
        ),
        Sample(
            "official",
            kwargs={"mask_size": lambda s: (s.extent - 1) | 1, "variant": "official"},
            description="the psa_mask op's logit 0 for out-of-window positions",
        ),
        Sample("collect", kwargs={"branches": "collect"}, description="the collect branch alone"),
        Sample("distribute", kwargs={"branches": "distribute"}, description="the distribute branch alone"),
        Sample(
            "shrink",
            kwargs={"shrink_factor": 2, "mask_size": lambda s: s.extent - 1 | 1},
            description="the official 2x resampling around the attention",
        ),
        Sample(
            "norm_layer=GroupNorm",
            {"norm_layer": lambda s: functools.partial(nn.GroupNorm, 2)},
            description="GroupNorm in every conv block (trains with a batch of one)",
        ),
    ),
    notes="variant='official': positions outside a mask window smaller than the map get logit 0 "
    "(the semseg/mmcv psa_mask op writes only in-window entries of a zero buffer), not -inf; the "
    "two agree when the window covers the map (mask = 2H-1 x 2W-1). shrink_factor=2 is the "
    "official resampling (bilinear, align_corners=True) around the attention.",
)
class PointwiseSpatialAttention(nn.Module):
    """PSANet head: collect and distribute branches of point-wise spatial attention.

    Each branch reduces the input to C' channels, and at every position i predicts (1x1 convs) an
    over-complete map ``a_i`` of mask_h x mask_w logits centred on i, whose entry at offset
    ``j - i`` concerns position j. Re-indexed to absolute positions (an index gather,
    :func:`attnzoo.functional.global_reasoning.point_wise_logits`)::

        collect:     z_i = sum_j softmax_j(a_i[j - i]) x_j     i gathers what it predicted
        distribute:  z_j = sum_i softmax_i(a_i[j - i]) x_i     i spreads what it predicted

    With the full mask (2H-1) x (2W-1) every pair is covered; with a smaller window the pairs
    outside it are masked (``variant="paper"``) or get logit 0 (``variant="official"``, the
    psa_mask op of semseg and mmcv). The two contexts are concatenated, projected back to C
    (1x1 conv + BN + ReLU), concatenated with the input, and fused by the head's 3x3 conv + BN +
    ReLU to ``out_channels``.

    Memory: the predicted maps are quadratic by definition (mask_h mask_w per position, about 4 N
    per position at full coverage). In inference with a window covering the map, nothing else is:
    the last 1x1 conv writes the maps position-major, and
    :func:`~attnzoo.functional.global_reasoning.point_wise_attention_` re-indexes, softmaxes and
    aggregates them in their own storage (one branch at a time). Otherwise (a smaller window,
    training, ``return_attn``) a branch gathers the maps into one (N, N) tensor
    (:func:`~attnzoo.functional.global_reasoning.point_wise_logits`), the predicted map is freed
    once gathered, and the softmax is taken in place (without autograd) or into one new (N, N)
    output (its backward needs it). No index tensor, no mask copy, no attention-kernel workspace
    (an additive float mask through :func:`~attnzoo.functional.attend.attend` would add them, and
    the fused kernel gains nothing when every logit is given).

    Args:
        channels: C.
        inner_channels: C' (default C/4: 512 for 2048).
        out_channels: width of the fusing 3x3 conv (default C).
        mask_size: (mask_h, mask_w) or one int (official: 59 for 465-pixel crops; 2H-1 covers an
            H-high map). Fixed at construction: it is the predicting conv's output width.
        branches: ``"both"`` (the paper's bi-direction), ``"collect"`` or ``"distribute"``.
        shrink_factor: resample the reduced features to (H-1)//s + 1 before the attention and
            back after (official: 2; paper default here: 1, no resampling).
        variant: ``"paper"`` (out-of-window pairs masked) or ``"official"`` (logit 0).
        norm_layer: the norm of every conv block (reduce, predict, projection, fusion), called
            as ``norm_layer(width)`` on (B, width, H, W) maps (default ``nn.BatchNorm2d``, as the
            official code; e.g. ``functools.partial(nn.GroupNorm, 32)``; None: none, the convs
            then have biases).

    Shape:
        - x: (B, C, H, W) (any H, W); output: (B, out_channels, H, W).
        - attention (``return_attn``): ``{"collect": (B, N, N), "distribute": (B, N, N)}`` over
          the (possibly shrunk) N positions; row q holds the weights with which q's context sums
          the positions (each row sums to 1).
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int | None = None,
        out_channels: int | None = None,
        *,
        mask_size: int | tuple[int, int] = 59,
        branches: Branches = "both",
        shrink_factor: int = 1,
        variant: Variant = "paper",
        norm_layer: NormLayer = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(
            channels=channels,
            inner_channels=inner_channels,
            out_channels=out_channels,
            shrink_factor=shrink_factor,
        )
        check_variant(variant)
        size = check_pair("mask_size", mask_size, "(mask_h, mask_w)")
        if branches not in ("both", "collect", "distribute"):
            raise ValueError(f"branches: expected 'both', 'collect' or 'distribute', got {branches!r}")
        self.channels = channels
        self.inner_channels = inner_channels or reduced_width(channels, 1 / 4)
        self.out_channels = out_channels or channels
        self.mask_size = (int(size[0]), int(size[1]))
        self.branches, self.shrink_factor, self.variant = branches, shrink_factor, variant
        factory = {"device": device, "dtype": dtype}
        names = ("collect", "distribute") if branches == "both" else (branches,)
        self.paths = nn.ModuleDict(
            {n: _Branch(channels, self.inner_channels, self.mask_size, norm_layer, factory) for n in names}
        )
        self.proj = _conv_bn_relu(len(names) * self.inner_channels, channels, norm_layer, factory)
        self.fuse = _conv_bn_relu(2 * channels, self.out_channels, norm_layer, factory, kernel=3)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inner_channels={self.inner_channels}, "
            f"out_channels={self.out_channels}, "
            f"mask_size={self.mask_size}, branches={self.branches!r}, shrink_factor={self.shrink_factor}, "
            f"variant={self.variant!r}"
        )

    def _context(self, name: str, reduced: Tensor, return_attn: bool) -> tuple[Tensor, Tensor | None]:
        """One branch's context (B, C', h, w) and, when asked, its weights (B, N, N).

        A method of its own so that the branch's (N, N) buffer dies on return, before the next
        branch forms its predicted map (a loop variable would keep it alive across iterations).
        """
        predict, size = self.paths[name].predict, reduced.shape[2:]
        values = to_tokens(reduced)  # (B, C', h, w) -> (B, N, C')
        if (
            not (return_attn or torch.is_grad_enabled())
            and covers_map(self.mask_size, size)
            and is_eager(reduced)
        ):
            # the last 1x1 conv as a product laid out position-major, (h, w, B, C') @ (C', K) ->
            # (h, w, B, K), which the re-indexing reads as a strided view and overwrites: the
            # predicted map is the only quadratic buffer
            hidden = predict[0](reduced).permute(2, 3, 0, 1)  # (B, C', h, w) -> (h, w, B, C')
            logits = F.linear(hidden, predict[1].weight.flatten(1))
            context = point_wise_attention_(
                logits, values, size, self.mask_size, distribute=name == "distribute"
            )
            return from_tokens(context, size), None  # (B, N, C') -> (B, C', h, w)
        fill = float("-inf") if self.variant == "paper" else 0.0
        logits = point_wise_logits(
            predict(reduced), self.mask_size, distribute=name == "distribute", fill=fill
        )  # (B, N, N): row = the position whose context is formed; the predicted map is freed here
        if return_attn or torch.is_grad_enabled():
            weights = masked_softmax(logits, dim=-1)
        else:
            # the gathered logits become the weights themselves (a window smaller than the map):
            # the re-indexing is the only (N, N) buffer beside the predicted map
            weights = softmax_(logits, dim=-1)
        context = weights.to(values.dtype) @ values  # (B, N, N) @ (B, N, C') -> (B, N, C')
        context = from_tokens(context, size)  # (B, N, C') -> (B, C', h, w)
        return context, (weights if return_attn else None)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        contexts, maps = [], {}
        for name, branch in self.paths.items():
            reduced = branch.reduce(x)  # (B, C', H, W)
            if self.shrink_factor != 1:
                shrunk = [(side - 1) // self.shrink_factor + 1 for side in x.shape[2:]]
                reduced = F.interpolate(reduced, size=shrunk, mode="bilinear", align_corners=True)
            context, weights = self._context(name, reduced, return_attn)
            contexts.append(context)
            if weights is not None:
                maps[name] = weights
        # the contexts are channels-last views of tokens: contiguous for the norm under forward AD
        projected = self.proj(norm_input(torch.cat(contexts, dim=1)))  # (B, C, h, w)
        if self.shrink_factor != 1:
            projected = F.interpolate(projected, size=x.shape[2:], mode="bilinear", align_corners=True)
        out = self.fuse(torch.cat([x, projected], dim=1))
        return (out, maps) if return_attn else out
