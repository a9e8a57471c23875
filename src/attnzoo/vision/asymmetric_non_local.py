"""Asymmetric non-local blocks: APNB (pyramid-sampled self-attention) and AFNB (two-level fusion).

Zhu et al. 2019, "Asymmetric Non-local Neural Networks for Semantic Segmentation",
https://arxiv.org/abs/1908.07678.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, check_variant, parameter_dtype
from attnzoo.functional.attend import attend_with_weights
from attnzoo.layers import NormLayer, create_norm, reduced_width
from attnzoo.registry import Paper, Sample, example_image, image_input, register

__all__ = ["AsymmetricNonLocal", "pyramid_pool"]

Mode = Literal["apnb", "afnb"]
Variant = Literal["paper", "official"]


def pyramid_pool(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """Adaptive average pooling to every s x s grid, flattened and concatenated.

    (B, C, H, W) -> (B, C, S) with S = sum(s^2): 1 + 9 + 36 + 64 = 110 anchors for (1, 3, 6, 8).
    Works for any H, W (bins overlap when a side is smaller than s), as adaptive pooling does.
    """
    # (B, C, s, s) -> (B, C, s^2) per size, then all anchors side by side
    return torch.cat([F.adaptive_avg_pool2d(x, size).flatten(2) for size in sizes], dim=-1)


def _conv_bn_relu(in_ch: int, out_ch: int, norm_layer: NormLayer, factory: dict) -> nn.Sequential:
    conv = nn.Conv2d(in_ch, out_ch, 1, **factory)
    return nn.Sequential(conv, create_norm(norm_layer, out_ch, **factory), nn.ReLU())


@register(
    "asymmetric_non_local",
    placement="stage",
    map_kind="pairwise",
    linear_memory=True,
    family="non_local",
    paper=Paper("Asymmetric Non-local Neural Networks for Semantic Segmentation", "1908.07678"),
    equation="O = softmax(theta(X)^T P(phi(X))) P(gamma(X))^T, P = pyramid pooling to 1+9+36+64 = 110 "
    "anchors; Y = fuse(cat[W_o O, X]) (APNB; AFNB: query from the high level, keys/values from the low)",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B HW S (C_k + C_v) + B HW C^2), S = 110; memory O(B HW (C_k + C_v) + B C HW): "
    "no HW x HW matrix (fused kernel; O(B HW S) with return_attn)",
    notes="mode='afnb' takes (high, low) feature maps; variant='official' scales the logits by "
    "C_k^-1/2 as the authors' code does (the paper's softmax(phi^T theta) is unscaled)",
    samples=(
        Sample(
            "mode=afnb",
            {"mode": "afnb", "low_channels": lambda s: s.width // 2},
            inputs=lambda s: (
                example_image(s),
                example_image(s, channels=s.width // 2, side=2 * s.extent, seed=1),
            ),
            description="AFNB: fuse a higher-resolution lower stage",
        ),
        Sample("variant=official", {"variant": "official"}),
    ),
)
class AsymmetricNonLocal(nn.Module):
    """Asymmetric pyramid non-local block (APNB) or asymmetric fusion non-local block (AFNB).

    Keys and values are sampled by a spatial pyramid P (adaptive average pooling to 1x1, 3x3, 6x6
    and 8x8, S = 110 anchors) instead of using every position, so the affinity is N x S, not N x N::

        APNB: theta = phi = ReLU(BN(W_k X))            (query and key SHARE the transform)
              O = softmax(theta^T P(phi)) P(W_v X)^T    (N x S weights, softmax over the anchors)
              Y = fuse(cat[W_o O, X])
        AFNB: theta = ReLU(BN(W_q X_h)), phi = ReLU(BN(W_k X_l)), values W_v X_l
              (query from the high-level map X_h; keys/values from the low-level map X_l, which may
              have another resolution and width); Y = fuse(cat[W_o O, X_h])

    ``fuse`` is the official code's 1x1 conv over the concatenation + BatchNorm (+ ReLU for APNB;
    none for AFNB) + Dropout2d(0.05); the paper's figure ends at the concatenation, whose next layer
    is that conv. ``W_o`` (1x1 conv) is zero-initialised as in the official code, so at init the
    attention context is zero and ``Y = fuse(cat[0, X])``.

    Args:
        channels: C, width of the (high-level) query input.
        key_channels: C_k (default C/2: the paper's 256 for C = 512).
        value_channels: C_v (default C/2).
        out_channels: output width (default C, so the block preserves the shape).
        mode: ``"apnb"`` (one input) or ``"afnb"`` (two inputs: high then low).
        low_channels: width of the low-level input in AFNB (default C).
        pool_sizes: pyramid grid sides (paper: 1, 3, 6, 8).
        dropout: Dropout2d after the fusion (official: 0.05).
        variant: ``"paper"`` (unscaled logits, the paper's ``softmax(phi^T theta)``) or
            ``"official"`` (logits scaled by C_k^-1/2, as the authors' code does).
        norm_layer: the normalisation of the key/query transforms and of the fusion, called as
            ``norm_layer(channels)`` (default BatchNorm, as the official code; None: none).

    Shape:
        - x: (B, C, H, W); low (AFNB only): (B, C_low, H_l, W_l), any H_l, W_l.
        - output: (B, out_channels, H, W).
        - attention (``return_attn``): (B, HW, S), softmax over the S = 110 anchors (laid out
          size by size, each s x s grid row-major). Float32 for half-precision inputs.
    """

    def __init__(
        self,
        channels: int,
        key_channels: int | None = None,
        value_channels: int | None = None,
        out_channels: int | None = None,
        *,
        mode: Mode = "apnb",
        low_channels: int | None = None,
        pool_sizes: Sequence[int] = (1, 3, 6, 8),
        dropout: float = 0.05,
        variant: Variant = "paper",
        norm_layer: NormLayer = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        if mode not in ("apnb", "afnb"):
            raise ValueError(f"mode: expected 'apnb' or 'afnb', got {mode!r}")
        check_variant(variant)
        if mode == "apnb" and low_channels is not None:
            raise ValueError("low_channels: only AFNB (mode='afnb') has a low-level input")
        if not pool_sizes or any(int(s) < 1 for s in pool_sizes):
            raise ValueError(f"pool_sizes: expected positive grid sides, got {tuple(pool_sizes)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        check_positive(key_channels=key_channels, value_channels=value_channels)
        self.channels, self.mode, self.variant = channels, mode, variant
        self.key_channels = key_channels or reduced_width(channels, 1 / 2)
        self.value_channels = value_channels or reduced_width(channels, 1 / 2)
        check_positive(out_channels=out_channels)  # before `or`: 0 is no default
        self.out_channels = out_channels or channels
        self.low_channels = (low_channels or channels) if mode == "afnb" else None
        self.pool_sizes = tuple(int(s) for s in pool_sizes)
        self.num_anchors = sum(s * s for s in self.pool_sizes)
        factory = {"device": device, "dtype": dtype}
        source = self.low_channels or channels  # where keys and values come from
        self.key = _conv_bn_relu(source, self.key_channels, norm_layer, factory)
        # APNB: theta and phi share one transform; AFNB needs its own for the high-level query
        self.query: nn.Sequential | None = None
        if mode == "afnb":
            self.query = _conv_bn_relu(channels, self.key_channels, norm_layer, factory)
        self.value = nn.Conv2d(source, self.value_channels, 1, **factory)
        self.out_proj = nn.Conv2d(self.value_channels, self.out_channels, 1, **factory)
        fuse: list[nn.Module] = [
            nn.Conv2d(self.out_channels + channels, self.out_channels, 1, **factory),
            create_norm(norm_layer, self.out_channels, **factory),
        ]
        if mode == "apnb":
            fuse.append(nn.ReLU())  # the official AFNB fusion has BN only, APNB has BN + ReLU
        fuse.append(nn.Dropout2d(dropout))
        self.fuse = nn.Sequential(*fuse)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        low = f", low_channels={self.low_channels}" if self.low_channels else ""
        return (
            f"channels={self.channels}, key_channels={self.key_channels}, "
            f"value_channels={self.value_channels}, out_channels={self.out_channels}, "
            f"mode={self.mode!r}{low}, pool_sizes={self.pool_sizes}, variant={self.variant!r}"
        )

    def forward(
        self, x: Tensor, low: Tensor | None = None, *, return_attn: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """APNB: ``forward(x)``. AFNB: ``forward(high, low)``."""
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        batch, _, height, width = x.shape
        if self.mode == "apnb":
            if low is not None:
                raise ValueError("low: APNB (mode='apnb') takes one input; use mode='afnb' to fuse two")
            key_map = self.key(x)  # (B, C_k, H, W)
            query_map, source = key_map, x
        else:
            if low is None:
                raise ValueError("low: AFNB (mode='afnb') needs the low-level map as second input")
            check_input(low, "low", "B C H W", B=batch, C=self.low_channels, dtype=x.dtype, dtype_source="x")
            query_map, key_map, source = self.query(x), self.key(low), low  # type: ignore[misc]

        q = query_map.flatten(2).transpose(1, 2)  # (B, C_k, H, W) -> (B, HW, C_k)
        k = pyramid_pool(key_map, self.pool_sizes).transpose(1, 2)  # (B, C_k, S) -> (B, S, C_k)
        v = pyramid_pool(self.value(source), self.pool_sizes).transpose(1, 2)  # (B, S, C_v)
        scale = 1.0 / math.sqrt(self.key_channels) if self.variant == "official" else 1.0
        context, weights = attend_with_weights(q, k, v, score="dot", scale=scale, return_weights=return_attn)
        # (B, HW, C_v) -> (B, C_v, HW) -> (B, C_v, H, W)
        context = context.transpose(1, 2).reshape(batch, self.value_channels, height, width)
        out = self.fuse(torch.cat([self.out_proj(context), x], dim=1))
        return (out, weights) if return_attn else out
