"""NCHW <-> token helpers for the pairwise (non-local) family.

Every module in this family compares all positions of a feature map. The fused attention kernel
wants (B, N, D) operands whose last dimension has unit stride; a view taken straight from an NCHW
map has stride N there, and ``scaled_dot_product_attention`` then silently takes its quadratic
math path. So the input is laid out ONCE as contiguous tokens (B, N, C), every 1x1 projection is
a ``Linear`` on those tokens (its output is contiguous (B, N, C') as the kernel wants), and the
result goes back to (B, C, *S) only at the end.

Private: not auto-imported as a mechanism, shared by the non-local family's files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from attnzoo._checks import SPATIAL_LAYOUTS

__all__ = [
    "SPATIAL_LAYOUTS",
    "check_poolable",
    "from_tokens",
    "max_pool_tokens",
    "subsample_kernel",
    "to_tokens",
]


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, *S) -> (B, N, C), contiguous, N = prod(S): the layout the fused kernel needs."""
    return x.flatten(2).transpose(1, 2).contiguous()  # (B, C, *S) -> (B, C, N) -> (B, N, C)


def from_tokens(tokens: Tensor, spatial: Sequence[int]) -> Tensor:
    """(B, N, C) -> (B, C, *S), a view (channels-last strides; no copy)."""
    return tokens.transpose(1, 2).unflatten(2, tuple(spatial))  # (B, N, C) -> (B, C, N) -> (B, C, *S)


def subsample_kernel(rank: int) -> tuple[int, ...]:
    """The sub-sampling max-pool window of the non-local papers for 1, 2 or 3 spatial dims.

    2 for sequences, 2 x 2 for images and 1 x 2 x 2 for videos (space only, never time, as in
    the official video code and mmcv's ``NonLocal3d``).
    """
    return {1: (2,), 2: (2, 2), 3: (1, 2, 2)}[rank]


def check_poolable(x: Tensor, name: str, kernel: Sequence[int]) -> None:
    """Raise a clear error when a spatial dim is smaller than the sub-sampling window."""
    spatial = tuple(x.shape[2:])
    if any(s < k for s, k in zip(spatial, kernel)):
        raise ValueError(
            f"{name}: sub-sampling max-pools the keys and values by {tuple(kernel)}, which expected "
            f"every spatial dim to be at least that large, got spatial shape {spatial} "
            f"(pass sub_sample=False for such small maps)"
        )


def max_pool_tokens(tokens: Tensor, spatial: Sequence[int], kernel: Sequence[int]) -> Tensor:
    """Max-pool (B, N, C) tokens that lie on the grid ``spatial``: returns (B, N', C).

    Pooling happens after the projection (``phi = maxpool(W_phi x)``), as in the papers' code;
    max-pooling does not commute with a linear map, so the order matters.
    """
    grid = from_tokens(tokens, spatial)  # (B, N, C) -> (B, C, *S)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(spatial)]
    pooled = pool(grid, tuple(kernel))  # (B, C, *S')
    # (B, C, *S') -> (B, C, N') -> (B, N', C); contiguous for the fused kernel
    return pooled.flatten(2).transpose(1, 2).contiguous()
