"""Input validation with messages that name the argument, what was expected and what came."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SPATIAL_LAYOUTS", "check_device", "check_input", "check_mask", "check_variant"]

#: Feature maps with 1, 2 or 3 spatial dims: sequences of features, images, videos (T, H, W).
SPATIAL_LAYOUTS = ("B C L", "B C H W", "B C T H W")


def _describe(layout: str) -> str:
    dims = layout.split()
    return f"{len(dims)}-D tensor ({', '.join(dims)})"


def check_input(
    x: object,
    name: str,
    layout: str | Sequence[str],
    **expected: int | None,
) -> None:
    """Check that ``x`` is a floating tensor laid out as ``layout`` with the ``expected`` sizes.

    Args:
        x: the argument to check.
        name: its name in the caller's signature, used in messages.
        layout: space-separated dimension names such as ``"B C H W"``, or several alternatives
            (``("B C L", "B C H W")``); the one whose rank matches is used. ``B`` is the batch:
            it may be empty (a batch of zero items passes through, as elsewhere in PyTorch);
            every other dimension must be non-empty.
        **expected: required sizes by dimension name, e.g. ``C=64``; None skips the check.

    Raises:
        TypeError: ``x`` is not a tensor, or not floating point.
        ValueError: wrong rank, an empty non-batch dimension, or a size other than expected.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}"
        )
    layouts = [layout] if isinstance(layout, str) else list(layout)
    matching = [lay for lay in layouts if len(lay.split()) == x.dim()]
    if not matching:
        wanted = " or ".join(_describe(lay) for lay in layouts)
        raise ValueError(f"{name}: expected a {wanted}, got shape {tuple(x.shape)}")
    dims = matching[0].split()
    for i, dim in enumerate(dims):
        size = x.shape[i]
        if dim != "B" and size == 0:
            raise ValueError(f"{name}: dimension {dim} (dim {i}) is empty, shape {tuple(x.shape)}")
        want = expected.get(dim)
        if want is not None and size != want:
            raise ValueError(
                f"{name}: expected {dim}={want} at dim {i} of {matching[0]!r}, got {size} "
                f"(shape {tuple(x.shape)})"
            )


def check_device(t: torch.Tensor, name: str, device: torch.device | None) -> None:
    """Check that ``t`` lives on ``device`` (the input's), or raise naming both; None skips."""
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the input's device), got one on {t.device}")


def check_mask(
    mask: object, name: str, target: Sequence[int], device: torch.device | None = None
) -> None:
    """Check that ``mask`` is boolean (True = may attend) or floating (additive), broadcasts to
    ``target`` and, when ``device`` is given, lives on that device.

    Raises:
        TypeError: ``mask`` is not a tensor, or neither bool nor floating.
        ValueError: ``mask`` does not broadcast to ``target``, or is on another device.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    check_device(mask, name, device)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"{name}: expected a bool mask (True = may attend) or a floating additive mask, got {mask.dtype}"
        )
    target = tuple(target)
    ok = mask.dim() <= len(target) and all(
        m in (1, t) for m, t in zip(reversed(mask.shape), reversed(target))
    )
    if not ok:
        raise ValueError(f"{name}: shape {tuple(mask.shape)} does not broadcast to {target}")


def check_variant(variant: object, name: str = "variant") -> None:
    """Check a ``variant`` argument: ``"paper"`` (the default everywhere) or ``"official"``.

    Raises:
        ValueError: any other value, naming the argument.
    """
    if variant not in ("paper", "official"):
        raise ValueError(f"{name}: expected 'paper' or 'official', got {variant!r}")
