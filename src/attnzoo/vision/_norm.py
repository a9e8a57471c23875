"""Injectable normalisation layers for the vision mechanisms (``norm_layer=`` arguments).

A ``norm_layer`` is a callable ``(num_features, device=..., dtype=...) -> nn.Module`` applied to
(B, C, H, W) maps: ``nn.BatchNorm2d`` (the papers' default), ``functools.partial(nn.GroupNorm,
32)`` (small batches, detection), ``nn.SyncBatchNorm``, or None for no normalisation.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from attnzoo.layers import NormLayer, create_norm

__all__ = ["NormSpec", "check_batch_statistics", "create_norm"]

#: A normalisation layer factory taking the channel count; None for no normalisation.
#: (One helper for the whole package: ``attnzoo.layers.NormLayer`` and ``create_norm``.)
NormSpec = NormLayer


def check_batch_statistics(norm: nn.Module, x: Tensor, where: str) -> None:
    """A clear error where a BatchNorm on a pooled (B, d) vector would see one value per channel.

    In training mode BatchNorm normalises with the batch's statistics, which one sample does not
    have; torch's own message ("Expected more than 1 value per channel") names no argument.
    Other norms (GroupNorm, LayerNorm, none) and eval mode pass.

    Args:
        norm: the normalisation layer of the pooled vector.
        x: the input; only its batch size is read.
        where: which layer normalises the pooled vector, for the message.
    """
    if isinstance(norm, _BatchNorm) and norm.training and isinstance(x, Tensor) and x.shape[0] == 1:
        raise ValueError(
            f"x: {where} needs a batch of more than 1 in training mode, got shape {tuple(x.shape)} "
            "(use eval() for single images, or a norm_layer without batch statistics such as "
            "functools.partial(nn.GroupNorm, 1))"
        )
