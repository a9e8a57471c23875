"""Cluttered digits: scikit-learn's bundled handwritten digits placed on a larger canvas among
fragments of other digits, so that a classifier has to find the digit (where attention helps).

Built deterministically from a seed; nothing is downloaded (the 8 x 8 digits ship with
scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ClutteredDigits", "cluttered_digits"]


@dataclass(frozen=True)
class ClutteredDigits:
    """Images (N, 1, S, S) in [0, 1], labels (N,), and where each digit was placed (N, 2: top, left)."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    train_positions: Tensor
    test_positions: Tensor
    digit_size: int

    @property
    def num_classes(self) -> int:
        return 10


def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the digits demo needs scikit-learn: pip install 'attnzoo[demo]'") from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    return images, torch.tensor(digits.target, dtype=torch.int64)


def _compose(
    digits: Tensor, labels: Tensor, size: int, scale: int, clutter: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Place each digit (upscaled ``scale`` x) at a random position with ``clutter`` fragments."""
    n = digits.shape[0]
    # (N, 8, 8) -> (N, 1, 8s, 8s): bilinear upscaling keeps strokes smooth
    big = F.interpolate(digits[:, None], scale_factor=scale, mode="bilinear", align_corners=False).clamp(0, 1)
    d = big.shape[-1]
    canvas = torch.zeros(n, 1, size, size)
    # clutter: a quarter-size crop of another random digit at a random place, under the digit
    frag = d // 2
    for _ in range(clutter):
        source = torch.randint(0, n, (n,), generator=generator)
        top = torch.randint(0, d - frag + 1, (n,), generator=generator)
        left = torch.randint(0, d - frag + 1, (n,), generator=generator)
        ys = torch.randint(0, size - frag + 1, (n,), generator=generator)
        xs = torch.randint(0, size - frag + 1, (n,), generator=generator)
        rows = torch.arange(frag)
        # gather the fragments: one (frag, frag) crop of image source[i] at (top[i], left[i])
        patch = big[
            source[:, None, None], 0, (top[:, None] + rows)[:, :, None], (left[:, None] + rows)[:, None, :]
        ]  # (N, frag, frag)
        index_y = (ys[:, None] + rows)[:, :, None].expand(n, frag, frag)
        index_x = (xs[:, None] + rows)[:, None, :].expand(n, frag, frag)
        batch = torch.arange(n)[:, None, None].expand(n, frag, frag)
        canvas[batch, 0, index_y, index_x] = torch.maximum(canvas[batch, 0, index_y, index_x], patch)
    positions = torch.stack(
        [torch.randint(0, size - d + 1, (n,), generator=generator) for _ in range(2)], dim=1
    )  # (N, 2): top, left
    rows = torch.arange(d)
    index_y = (positions[:, 0, None] + rows)[:, :, None].expand(n, d, d)
    index_x = (positions[:, 1, None] + rows)[:, None, :].expand(n, d, d)
    batch = torch.arange(n)[:, None, None].expand(n, d, d)
    canvas[batch, 0, index_y, index_x] = torch.maximum(canvas[batch, 0, index_y, index_x], big[:, 0])
    return canvas, positions


def cluttered_digits(
    size: int = 32, *, scale: int = 2, clutter: int = 3, test_fraction: float = 0.25, seed: int = 0
) -> ClutteredDigits:
    """Build the cluttered-digits task.

    Args:
        size: canvas side S (the digit is 8 * scale pixels).
        scale: upscaling of the 8 x 8 digits.
        clutter: fragments of other digits per image.
        test_fraction: share of the 1797 digits held out.
        seed: everything (split, positions, clutter) follows from it.
    """
    if size < 8 * scale:
        raise ValueError(f"size: expected at least 8 * scale = {8 * scale}, got {size}")
    images, labels = _load_digits()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=generator)
    images, labels = images[order], labels[order]
    canvas, positions = _compose(images, labels, size, scale, clutter, generator)
    n_test = round(test_fraction * images.shape[0])
    return ClutteredDigits(
        train_images=canvas[n_test:],
        train_labels=labels[n_test:],
        test_images=canvas[:n_test],
        test_labels=labels[:n_test],
        train_positions=positions[n_test:],
        test_positions=positions[:n_test],
        digit_size=8 * scale,
    )
