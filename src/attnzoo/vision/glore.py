"""Global reasoning unit (GloRe): project positions onto graph nodes, reason with a GCN, project back.

Chen, Rohrbach, Yan, Yan, Feng and Kalantidis 2019, "Graph-Based Global Reasoning Networks"
(CVPR 2019), https://arxiv.org/abs/1811.12814. Official code: facebookresearch/GloRe
(``network/global_reasoning_unit.py``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.global_reasoning import graph_reasoning
from attnzoo.layers import NormLayer, plain_layer, reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._spatial import SPATIAL_LAYOUTS
from attnzoo.vision._token_norm import apply_token_norm, create_token_norm, zero_init_last_norm

__all__ = ["GloRe"]


@register(
    "glore",
    family="non_local",
    paper=Paper("Graph-Based Global Reasoning Networks", "1811.12814"),
    equation="V = phi(X) B^T (S x N node features, B = theta(X) N x L); Z = W_g ReLU(V (A_g + I)^T + b); "
    "Y = X + BN(W_e (Z B)); S = C/2 states, N = C/4 nodes, BN scale zero at init",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B L C (S + N) + B N^2 S + B S^2 N); memory O(B L (S + N)), L = positions: no L x L matrix",
    placement="stage",
    linear_memory=True,
    map_kind="spatial",
    samples=(
        Sample("normalize", kwargs={"normalize": True}, description="node features / L (sizes vary)"),
        Sample("widths", kwargs={"state_channels": 12, "num_nodes": 5}, description="S, N given"),
        Sample(
            "video",
            inputs=lambda s: (torch.randn(s.batch, s.width, 3, s.extent, s.extent).to(s.device, s.dtype),),
            description="a (B, C, T, H, W) clip, as in the official 3D ResNet",
        ),
        Sample(
            "norm_layer=GroupNorm",
            {"norm_layer": lambda s: functools.partial(nn.GroupNorm, 2)},
            description="GroupNorm on the output (trains with a batch of one)",
        ),
        Sample("norm_layer=None", {"norm_layer": None}, description="no norm; W_e zero-initialised"),
    ),
    notes="normalize=True divides the node features by the number of positions L (the official "
    "code's option, off by default there; turn it on when input sizes vary, else the node features "
    "grow with L and overflow). The GCN is the official (A_g + I) with a bias and a ReLU before W_g.",
)
class GloRe(nn.Module):
    """GloRe unit: coordinate space -> interaction space (graph) -> coordinate space, residual.

    With X the input as C x L (L = all positions)::

        B = theta(X)                N x L    projection (1x1 conv, bias), also the reverse projection
        V = phi(X) B^T (/ L)        S x N    node features (phi: 1x1 conv C -> S, bias)
        H = ReLU(V (A_g + I)^T + b)          node-wise graph convolution with the identity
        Z = W_g H                   S x N    state update (bias-free)
        Y = X + BN(W_e (Z B))                W_e: 1x1 conv S -> C, bias-free; BN scale zero at init

    The paper writes the graph convolution as ``Z = ((I - A_g) V) W_g``; the official code learns
    A_g with the sign absorbed, adds a bias and a ReLU, as here. Defaults follow the official
    networks: S = C/2 states, N = C/4 nodes, BN eps 1e-4 with its weight zeroed so the unit
    starts as the identity. All sums over positions run in float32 for half-precision inputs.

    Args:
        channels: C.
        state_channels: S (default C/2).
        num_nodes: N (default C/4).
        normalize: divide the node features by L. Off in the official code ("not necessary if
            the input size is fixed"); turn it on when input sizes vary.
        norm_layer: the output normalisation, called as ``norm_layer(C)`` on the (B, C, L)
            positions of every input rank viewed as (B, C, L, 1) (default ``nn.BatchNorm2d``, built
            with the official eps 1e-4: the statistics of the official BatchNorm2d/3d and the
            state_dict keys of earlier releases; e.g. ``functools.partial(nn.GroupNorm, 32)``;
            norms that reject 4-D maps are refused). Its weight, when it has one, is
            zero-initialised (Y = X at init). None: no norm, and W_e is zero-initialised instead.

    Shape:
        - x: (B, C, L), (B, C, H, W) or (B, C, T, H, W); output: the same.
        - attention (``return_attn``): the projection B, (B, N, *S): how much each position
          contributes to each node (unnormalised, any sign).
    """

    def __init__(
        self,
        channels: int,
        state_channels: int | None = None,
        num_nodes: int | None = None,
        *,
        normalize: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels, state_channels=state_channels, num_nodes=num_nodes)
        self.channels, self.normalize = channels, normalize
        self.state_channels = state_channels or reduced_width(channels, 1 / 2)
        self.num_nodes = num_nodes or reduced_width(channels, 1 / 4)
        factory = {"device": device, "dtype": dtype}
        # 1x1 convolutions over the flattened positions (B, C, L): one path for 1-3 spatial dims
        self.state = nn.Conv1d(channels, self.state_channels, 1, **factory)
        self.projection = nn.Conv1d(channels, self.num_nodes, 1, **factory)
        self.node_conv = nn.Conv1d(self.num_nodes, self.num_nodes, 1, **factory)  # A_g, b
        self.state_conv = nn.Conv1d(self.state_channels, self.state_channels, 1, bias=False, **factory)
        self.extend = nn.Conv1d(self.state_channels, channels, 1, bias=False, **factory)
        # the official BatchNorm has eps 1e-4; over (B, C, L, 1) it has the statistics of
        # BatchNorm2d/3d over (B, C, *S)
        official_eps = norm_layer is nn.BatchNorm2d
        norm_layer = functools.partial(nn.BatchNorm2d, eps=1e-4) if official_eps else norm_layer
        self.norm = create_token_norm(norm_layer, channels, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation of the output norm: weight zero (or W_e's), so Y = X at init."""
        zero_init_last_norm(self.norm, self.extend)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, state_channels={self.state_channels}, "
            f"num_nodes={self.num_nodes}, normalize={self.normalize}"
        )

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", SPATIAL_LAYOUTS, C=self.channels, dtype=parameter_dtype(self))
        flat = x.flatten(2)  # (B, C, *S) -> (B, C, L)
        projection = self.projection(flat)  # (B, N, L)
        state = self.state(flat)  # (B, S, L)
        if plain_layer(self.node_conv, nn.Conv1d) and plain_layer(self.state_conv, nn.Conv1d):
            reasoned = graph_reasoning(
                state,
                projection,
                self.node_conv.weight[..., 0],  # (N, N, 1) -> (N, N)
                self.node_conv.bias,
                self.state_conv.weight[..., 0],  # (S, S, 1) -> (S, S)
                normalize=self.normalize,
            )
        else:
            # a hooked or replaced graph convolution runs as itself (pruning's pre-hook recomputes
            # its weight, an adapter or a feature tap sees its call), as in the official code
            reasoned = graph_reasoning(
                state,
                projection,
                normalize=self.normalize,
                node_layer=self.node_conv,
                state_layer=self.state_conv,
            )
        out = x + apply_token_norm(self.norm, self.extend(reasoned)).view_as(x)  # (B, C, L) -> (B, C, *S)
        if return_attn:
            return out, projection.unflatten(2, x.shape[2:])  # (B, N, L) -> (B, N, *S)
        return out
