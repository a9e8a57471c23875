"""Double attention block (A2-Nets): gather global descriptors, distribute them to every position.

Chen, Kalantidis, Li, Yan and Feng 2018, "A^2-Nets: Double Attention Networks" (NeurIPS 2018),
https://arxiv.org/abs/1810.11579. No official code was released.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.global_reasoning import double_attention
from attnzoo.layers import reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._spatial import SPATIAL_LAYOUTS

__all__ = ["DoubleAttention"]


@register(
    "double_attention",
    family="non_local",
    paper=Paper("A^2-Nets: Double Attention Networks", "1810.11579"),
    equation="G = A softmax_N(B)^T (m x n, gather: each of the n maps softmaxed over positions); "
    "Z = G softmax_n(V) (distribute: softmax over the n descriptors at each position); "
    "Y = X + W_o Z; A, B, V 1x1 convs to m, n, n (C/4 each)",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B N C (m + 2n) + B N m n + B N m C); memory O(B N (m + 2n)): no N x N matrix",
    placement="stage",
    linear_memory=True,
    map_kind="mixed",
    samples=(
        Sample("widths", kwargs={"attn_channels": 8, "num_descriptors": 4}, description="m != n"),
        Sample(
            "video",
            inputs=lambda s: (torch.randn(s.batch, s.width, 3, s.extent, s.extent).to(s.device, s.dtype),),
            description="a (B, C, T, H, W) clip, as in the paper's video networks",
        ),
    ),
    notes="The popular fightingcv copy softmaxes over the batch (F.softmax without dim on 3-D "
    "tensors) and drops the residual; here both softmaxes have their axes and the residual is kept.",
)
class DoubleAttention(nn.Module):
    """A2 block: second-order attention pooling to n descriptors, then attention distribution.

    With X the input as a (C, N) matrix (N = all positions, any number of spatial dims) and three
    1x1 convolutions A = phi(X) (m x N), B = theta(X) (n x N), V = rho(X) (n x N)::

        gather:      G = A softmax_N(B)^T            (m x n; map i is softmax over the N positions)
        distribute:  z_j = G softmax_n(v_j)          (the n weights at position j sum to 1)
        block:       Y = X + W_o Z                   (1x1 conv m -> C, residual)

    The products are taken left to right, so the N x N matrix ``softmax(B)^T softmax(V)`` of the
    equivalent non-local form is never formed: cost O(N m n), memory O(N (m + 2n)). theta has no
    bias: a constant per map cancels in its softmax over positions. The softmaxes run in float32
    for half-precision inputs.

    Args:
        channels: C.
        attn_channels: m, the width of the gathered descriptors (default C/4).
        num_descriptors: n, the number of attention maps and descriptors (default C/4).

    Shape:
        - x: (B, C, L), (B, C, H, W) or (B, C, T, H, W); output: the same.
        - attention (``return_attn``): ``{"gather": (B, n, *S) summing to 1 over the positions,
          "distribute": (B, n, *S) summing to 1 over the n descriptors}``.
    """

    def __init__(
        self,
        channels: int,
        attn_channels: int | None = None,
        num_descriptors: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        check_positive(attn_channels=attn_channels, num_descriptors=num_descriptors)
        self.channels = channels
        self.attn_channels = attn_channels or reduced_width(channels, 1 / 4)
        self.num_descriptors = num_descriptors or reduced_width(channels, 1 / 4)
        factory = {"device": device, "dtype": dtype}
        # 1x1 convolutions over the flattened positions (B, C, N): one code path for 1-3 spatial dims
        self.features = nn.Conv1d(channels, self.attn_channels, 1, **factory)  # phi -> A
        self.maps = nn.Conv1d(channels, self.num_descriptors, 1, bias=False, **factory)  # theta -> B
        self.vectors = nn.Conv1d(channels, self.num_descriptors, 1, **factory)  # rho -> V
        self.out_proj = nn.Conv1d(self.attn_channels, channels, 1, **factory)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, attn_channels={self.attn_channels}, "
            f"num_descriptors={self.num_descriptors}"
        )

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        check_input(x, "x", SPATIAL_LAYOUTS, C=self.channels, dtype=parameter_dtype(self))
        flat = x.flatten(2)  # (B, C, *S) -> (B, C, N)
        a, b, v = self.features(flat), self.maps(flat), self.vectors(flat)
        if return_attn:
            z, gather, distribute = double_attention(a, b, v, return_weights=True)
        else:
            z = double_attention(a, b, v)
        out = x + self.out_proj(z).view_as(x)  # (B, C, N) -> (B, C, *S)
        if return_attn:
            spatial = x.shape[2:]
            # (B, n, N) -> (B, n, *S)
            maps = {"gather": gather.unflatten(2, spatial), "distribute": distribute.unflatten(2, spatial)}
            return out, maps
        return out
