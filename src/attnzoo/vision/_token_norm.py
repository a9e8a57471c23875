"""The output normalisation of the residual token blocks (non_local, dnl, glore).

These blocks compute ``z = norm(W_z y)`` on flattened (B, C, N) tokens, for 1-D, 2-D and 3-D inputs
alike, and add z to the input. Two rules, shared:

- the norm is a vision ``norm_layer`` like every other (``norm_layer(C)`` applied to (B, C, H, W)
  maps, default ``nn.BatchNorm2d``): it runs on the tokens viewed as a (B, C, 1, N) map. There
  BatchNorm2d has exactly the statistics of the papers' BatchNorm1d/2d/3d on the input (mean and
  variance over the batch and every position, per channel), and the parameter and buffer names
  of the BatchNorm1d of earlier releases, so their checkpoints load. Norm classes that reject a
  4-D map (``nn.BatchNorm1d``, ``nn.BatchNorm3d``, ``nn.LayerNorm``, ...) are refused at
  construction with a message naming the fix, not at the first call with torch's rank message;
- the block starts as the identity (the non-local paper's init, kept by GloRe and DNL): the
  norm's scale is zero when it has one, else the last projection itself is zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo.layers import NormLayer, create_norm, norm_input

__all__ = ["apply_token_norm", "create_token_norm", "zero_init_last_norm"]

#: norm classes that reject a (B, C, 1, N) map
_NOT_FOR_MAPS = (
    nn.BatchNorm1d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
)


def create_token_norm(
    norm_layer: NormLayer,
    channels: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    argument: str = "norm_layer",
) -> nn.Module:
    """``norm_layer(channels)`` for the tokens viewed as (B, C, 1, N); None gives ``nn.Identity``.

    Raises:
        ValueError: the norm does not take 4-D maps (``nn.BatchNorm1d``, ``nn.LayerNorm``, ...).
    """
    layer = create_norm(norm_layer, channels, device=device, dtype=dtype, argument=argument)
    if isinstance(layer, _NOT_FOR_MAPS):
        raise ValueError(
            f"{argument}: the norm runs on (B, C, H, W) maps like every vision norm_layer (here the "
            f"tokens of any input rank viewed as (B, C, 1, N)), expected a layer taking them such as "
            f"nn.BatchNorm2d (the statistics of BatchNorm1d/3d on the input), nn.GroupNorm or "
            f"nn.SyncBatchNorm, got {type(layer).__name__}"
        )
    return layer


def apply_token_norm(norm: nn.Module, tokens: Tensor) -> Tensor:
    """``norm`` on (B, C, N) tokens through a (B, C, 1, N) view; (B, C, N) back.

    (B, C, 1, N), not (B, C, N, 1): the blocks' tokens are the transpose of a (B, N, C) product,
    and ``unsqueeze(-1)`` of that gives a map whose strides are neither contiguous nor canonical
    channels-last (the size-1 W gets stride 1, not C). Given such a map and a gradient of another
    layout, torch 2.13's CPU BatchNorm backward returns wrong gradients for the input, the weight
    and the bias (the bias's was 1/N of the true one), in training and in eval; the forward is
    right. non_local and dnl met it on contiguous inputs, glore on channels-last ones.
    ``unsqueeze(2)`` gives the canonical channels-last strides (N C, 1, N C, C), which every
    kernel reads correctly, and the same statistics (a norm over (B, H W) or per (C, H W) group).
    Under forward-mode AD the map is made contiguous (:func:`~attnzoo.layers.norm_input`).
    """
    return norm(norm_input(tokens.unsqueeze(2))).squeeze(2)  # (B, C, N) -> (B, C, 1, N) -> (B, C, N)


def zero_init_last_norm(norm: nn.Module, projection: nn.Module) -> None:
    """Start the residual block as the identity: zero the norm's weight, or the projection's.

    The norm's statistics and shift are reset too (a BatchNorm's bias is 0), so the branch
    outputs exactly zero at init for any norm with an affine weight; without one (None,
    ``affine=False``) ``projection.weight`` is zeroed instead.
    """
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor):
        if hasattr(norm, "reset_parameters"):
            norm.reset_parameters()
        nn.init.zeros_(weight)
    else:
        nn.init.zeros_(projection.weight)
