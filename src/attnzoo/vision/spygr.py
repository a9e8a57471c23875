"""Spatial pyramid based graph reasoning (SpyGR): a GCN over the pixels themselves, at several scales.

Li, Yang, Zhao, Shen, Lin and Liu 2020, "Spatial Pyramid Based Graph Reasoning for Semantic
Segmentation" (CVPR 2020), https://arxiv.org/abs/2003.10211. No official code was released.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.global_reasoning import normalized_laplacian_apply
from attnzoo.layers import reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._spatial import from_tokens, to_tokens

__all__ = ["GraphReasoningLayer", "SpatialPyramidGraphReasoning"]


class GraphReasoningLayer(nn.Module):
    """One SpyGR graph convolution in the feature space: ``Y = ReLU(L X Theta)``.

    ``A = Phi(X) Lambda(X) Phi(X)^T`` with ``Phi(X) = ReLU(X W_phi)`` (N x M) and the "attention
    diagonal matrix" ``Lambda(X) = diag(sigmoid(W_lambda GAP(X)))`` (M x M); both non-negative,
    so every degree is positive. ``L = I - D^-1/2 A D^-1/2`` is applied by associativity
    (:func:`attnzoo.functional.global_reasoning.normalized_laplacian_apply`): O(N M C), never N x N.

    Shape:
        - tokens: (B, N, C); output: (B, N, C); adjacency (``return_attn``): (B, N, N).
    """

    def __init__(
        self,
        channels: int,
        graph_channels: int,
        *,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.eps = eps
        self.phi = nn.Linear(channels, graph_channels, **factory)
        self.diagonal = nn.Linear(channels, graph_channels, **factory)
        self.theta = nn.Linear(channels, channels, **factory)

    def forward(self, tokens: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        phi = torch.relu(self.phi(tokens))  # (B, N, M), >= 0
        diagonal = torch.sigmoid(self.diagonal(tokens.mean(dim=1)))  # (B, C) -> (B, M), > 0
        if return_attn:
            lx, adjacency = normalized_laplacian_apply(
                tokens, phi, diagonal, eps=self.eps, return_adjacency=True
            )
            return torch.relu(self.theta(lx)), adjacency
        lx = normalized_laplacian_apply(tokens, phi, diagonal, eps=self.eps)
        return torch.relu(self.theta(lx))


@register(
    "spygr",
    family="non_local",
    paper=Paper("Spatial Pyramid Based Graph Reasoning for Semantic Segmentation", "2003.10211"),
    equation="per scale s: A = Phi(X_s) Lambda(X_s) Phi(X_s)^T, Lambda = diag(sigmoid(W GAP(X_s))); "
    "L = I - D^-1/2 A D^-1/2; Y_s = ReLU(L X_s Theta_s); out = X + sum_s up(Y_s), X_s max-pooled by s",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B HW M C + B HW C^2) per scale; memory O(B HW (M + C)): L is applied by "
    "associativity, no HW x HW matrix (O(B (HW)^2) per scale with return_attn)",
    placement="head",
    map_kind="mixed",
    linear_memory=True,
    samples=(
        Sample("single_scale", kwargs={"scales": (1,)}, description="no pyramid"),
        Sample("graph_channels", kwargs={"graph_channels": 5}, description="M given"),
    ),
    notes="No official code. The paper's (abstract, introduction): graph reasoning on every pixel "
    "with no projection, a data-dependent Laplacian with an attention diagonal matrix, a spatial "
    "pyramid of scales. Ours, not verified against the paper's method and implementation sections: "
    "M = C/4, Phi = ReLU(1x1 conv), Lambda = sigmoid(1x1 conv of the global average), Theta C -> C "
    "per scale, scales (1, 2, 4) by max-pooling, a sum of the bilinearly upsampled outputs with a "
    "residual (see the docs page).",
)
class SpatialPyramidGraphReasoning(nn.Module):
    """SpyGR: graph reasoning directly in the feature space, on a spatial pyramid.

    Every pixel is a node; there is no projection to a small graph. At each scale s the input is
    max-pooled by s and one :class:`GraphReasoningLayer` (its own weights) computes
    ``Y_s = ReLU(L X_s Theta)`` with the data-dependent normalised Laplacian
    ``L = I - D^-1/2 Phi Lambda Phi^T D^-1/2``; the outputs are upsampled (bilinear) and summed
    onto the input: ``out = X + sum_s up(Y_s)``.

    What is the paper's and what is ours. The paper's text that could be checked (abstract and
    introduction of arXiv 2003.10211; no official code was released) fixes the structure: graph
    reasoning directly in the original feature space (every pixel a node, no projection and
    re-projection), a data-dependent Laplacian whose similarity carries an "attention diagonal
    matrix" Lambda, and a spatial pyramid over which several long-range context patterns are
    captured. The equations above (``A = Phi Lambda Phi^T``, the normalised Laplacian, one
    first-order graph convolution with Theta) follow its method as summarised in the project's
    research notes, marked there as to be checked. NOT verified against the paper's method and
    implementation sections, and our choices: the widths (M = C/4 by default, the graph keeps all
    C channels: Theta is C -> C; an unofficial module uses M = 64 and a 3x3 conv for Phi), the
    non-negativity maps (ReLU for Phi, sigmoid for Lambda: they keep every degree positive), the
    pyramid (scales (1, 2, 4) by max-pooling, each with its own weights) and the fusion (bilinear
    upsampling, the scales summed onto the input). A channel reduction before the head (the
    usual 2048 -> 512 of segmentation heads) is left to the network, as for the other heads.

    Args:
        channels: C.
        graph_channels: M, the width of Phi (default C/4).
        scales: pooling factors of the pyramid (default (1, 2, 4)).
        eps: added to the degrees before the inverse square root.

    Shape:
        - x: (B, C, H, W); output: the same.
        - attention (``return_attn``): ``{"scale_<s>": D^-1/2 A D^-1/2 (B, N_s, N_s)}`` for every
          scale, N_s the positions after pooling by s (formed only then).
    """

    def __init__(
        self,
        channels: int,
        graph_channels: int | None = None,
        *,
        scales: Sequence[int] = (1, 2, 4),
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels, graph_channels=graph_channels)
        if not scales or any(int(s) < 1 for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"scales: expected distinct positive pooling factors, got {tuple(scales)}")
        if eps <= 0:
            raise ValueError(f"eps: expected a positive value, got {eps}")
        self.channels = channels
        self.graph_channels = graph_channels or reduced_width(channels, 1 / 4)
        self.scales = tuple(int(s) for s in scales)
        self.layers = nn.ModuleList(
            GraphReasoningLayer(channels, self.graph_channels, eps=eps, device=device, dtype=dtype)
            for _ in self.scales
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, graph_channels={self.graph_channels}, scales={self.scales}"

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        out = x
        maps: dict[str, Tensor] = {}
        for scale, layer in zip(self.scales, self.layers):
            # ceil_mode: a side smaller than the factor still pools to one position
            pooled = x if scale == 1 else F.max_pool2d(x, scale, scale, ceil_mode=True)
            tokens = to_tokens(pooled)  # (B, C, h, w) -> (B, hw, C)
            if return_attn:
                y, maps[f"scale_{scale}"] = layer(tokens, return_attn=True)
            else:
                y = layer(tokens)
            y = from_tokens(y, pooled.shape[2:])  # (B, hw, C) -> (B, C, h, w)
            if scale != 1:
                y = F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)
            out = out + y
        return (out, maps) if return_attn else out
