"""Reading a mechanism's attention maps for drawing: what kind they are and where they lie.

The kind comes from the mechanism's spec (``spec.map_kind``, one of
:data:`attnzoo.registry.MAP_KINDS`). The entries of a ``"mixed"`` dict, and the maps of a spec that
does not declare its kind yet, are read from their shapes against the feature map they came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnzoo.registry import ModuleSpec

__all__ = ["Entry", "entries", "received_attention", "value_scale"]

#: Kinds drawn over the image's positions.
SPATIAL_KINDS = ("pairwise", "spatial", "criss_cross", "local", "alignment")


@dataclass(frozen=True)
class Entry:
    """One map of a mechanism: its name in the maps dict ("" for a lone tensor), kind and tensor."""

    key: str
    kind: str | None
    maps: Tensor


def _shape_kind(maps: Tensor, h: int, w: int) -> str | None:
    """The kind of a map tensor from its shape, for a (B, C, h, w) input's maps (the fallback)."""
    shape = tuple(maps.shape)
    if maps.dim() >= 4 and shape[-2:] == (1, 1):
        return "channel"  # (B, C, 1, 1) or SK's (B, M, C, 1, 1)
    if maps.dim() == 4 and shape[1:3] == (h, w) and shape[-1] in (h + w - 1, h + w):
        return "criss_cross"
    if maps.dim() in (3, 4) and shape[-2:] == (h, w):
        return "spatial"
    if maps.dim() == 2 and shape[-1] == h * w:
        return "spatial"  # pooling weights (B, N)
    if maps.dim() == 3 and shape[-1] == h * w and shape[1] == 1:
        return "spatial"  # (B, 1, N)
    if maps.dim() in (3, 4) and shape[-1] > 1:
        return "pairwise"  # (B, [h,] N_q, N_k)
    return None


def entries(spec: ModuleSpec | None, maps: Any, h: int, w: int) -> list[Entry]:
    """Every map tensor in ``maps`` with its kind: the spec's ``map_kind`` for a lone tensor, the
    shape's for the entries of a dict (or where the spec declares no kind)."""
    declared = getattr(spec, "map_kind", None) if spec is not None else None
    if isinstance(maps, dict):
        return [
            Entry(f"{key}: {e.key}" if e.key else str(key), e.kind, e.maps)
            for key, value in maps.items()
            for e in entries(None, value, h, w)
        ]
    if not isinstance(maps, Tensor):
        return []
    maps = maps.detach().float()
    kind = declared if declared not in (None, "mixed") else _shape_kind(maps, h, w)
    return [Entry("", kind, maps)]


def received_attention(maps: Tensor) -> Tensor:
    """(B, [h,] N_q, N_k) pairwise weights -> (B, N_k): the attention each key receives, averaged
    over heads and queries and scaled by N_k, so that 1 is what every key gets under uniform
    attention (the same reading at every resolution)."""
    if maps.dim() == 4:
        maps = maps.mean(dim=1)  # (B, h, N_q, N_k) -> (B, N_q, N_k), heads averaged
    return maps.mean(dim=1) * maps.shape[-1]  # (B, N_q, N_k) -> (B, N_k)


def square_grid(values: Tensor) -> Tensor | None:
    """(B, N) -> (B, s, s) when N = s * s with s > 1, else None (keys without a square layout)."""
    side = math.isqrt(values.shape[-1])
    if side < 2 or side * side != values.shape[-1]:
        return None
    return values.reshape(values.shape[0], side, side)  # (B, N) -> (B, s, s)


@dataclass(frozen=True)
class Scale:
    """A colour scale: its range and what its values mean."""

    vmin: float
    vmax: float
    label: str


def value_scale(values: Tensor, *, distribution: bool = False) -> Scale:
    """One colour scale for maps that are drawn together.

    ``distribution``: the values are attention received relative to uniform (1 = uniform), scaled
    from 0. Otherwise gates within [0, 1] get the fixed [0, 1] scale, so that a gate ranging over
    0.51-0.54 looks as flat as it is; anything else (logits) its own range.
    """
    low, high = float(values.min()), float(values.max())
    if distribution:
        return Scale(0.0, max(high, 1.0), "received / uniform")
    if low >= 0.0 and high <= 1.0:
        return Scale(0.0, 1.0, "gate (0-1)")
    return Scale(low, high if high > low else low + 1e-6, "value")


def is_distribution(values: Tensor) -> bool:
    """Non-negative maps that sum to 1 over their positions, per image: softmax pooling weights."""
    flat = values.flatten(1)
    return bool((flat >= 0).all()) and torch.allclose(flat.sum(dim=1), torch.ones(len(flat)), atol=1e-3)
