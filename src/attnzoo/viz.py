"""Plots of attention: heatmap overlays on images, alignment matrices, per-head grids (PNG files).

Needs matplotlib (``pip install attnzoo[demo]``); the Agg backend is used, so no display is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["alignment", "attention_to_heatmap", "head_grid", "overlay", "overlay_grid"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("attnzoo.viz needs matplotlib: pip install 'attnzoo[demo]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _image_array(image: Tensor) -> Any:
    """(H, W), (1, H, W) or (3, H, W) tensor -> an (H, W) or (H, W, 3) array in [0, 1]."""
    image = image.detach().float().cpu()
    if image.dim() == 3 and image.shape[0] in (1, 3):
        image = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if image.dim() not in (2, 3):
        raise ValueError(f"image: expected (H, W), (1, H, W) or (3, H, W), got {tuple(image.shape)}")
    low, high = image.min(), image.max()
    return ((image - low) / (high - low).clamp_min(1e-12)).numpy()


def attention_to_heatmap(attn: Tensor, size: tuple[int, int]) -> Tensor:
    """Reduce a spatial attention map to one (H, W) heatmap in [0, 1] at ``size``.

    Accepts (h, w), (1, h, w) or (C, h, w) (averaged over C) maps; channel gates (C, 1, 1) carry
    no spatial information and are rejected.
    """
    attn = attn.detach().float().cpu()
    if attn.dim() == 3:
        attn = attn.mean(dim=0)  # (C, h, w) -> (h, w)
    if attn.dim() != 2:
        raise ValueError(f"attn: expected a spatial map (h, w) or (C, h, w), got {tuple(attn.shape)}")
    if attn.shape == (1, 1):
        raise ValueError("attn: a (1, 1) map is a channel gate with no spatial layout")
    # (h, w) -> (1, 1, h, w) for interpolate, and back
    heat = F.interpolate(attn[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    low, high = heat.min(), heat.max()
    return (heat - low) / (high - low).clamp_min(1e-12)


def overlay(
    image: Tensor,
    attn: Tensor,
    path: str | Path,
    *,
    title: str | None = None,
    alpha: float = 0.5,
    dpi: int = 100,
) -> Path:
    """Draw ``attn`` as a heatmap over ``image`` and save a PNG."""
    plt = _pyplot()
    picture = _image_array(image)
    heat = attention_to_heatmap(attn, picture.shape[:2])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
    ax.imshow(heat.numpy(), cmap="jet", alpha=alpha)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)


def overlay_grid(
    images: Sequence[Tensor],
    rows: dict[str, Sequence[Tensor | None]],
    path: str | Path,
    *,
    alpha: float = 0.5,
    dpi: int = 100,
    cell: float = 1.6,
) -> Path:
    """A grid: the images in the first row, then one row of overlays per entry of ``rows``.

    ``rows`` maps a label (a mechanism's name) to one map per image, or None where that
    mechanism has no spatial map (the cell then shows the image alone).
    """
    plt = _pyplot()
    n_rows, n_cols = 1 + len(rows), len(images)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols + 1.2, cell * n_rows), squeeze=False)
    pictures = [_image_array(img) for img in images]
    labels = ["input", *rows]
    for r, label in enumerate(labels):
        for c, picture in enumerate(pictures):
            ax = axes[r][c]
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            if r > 0:
                attn = rows[label][c]
                if attn is not None:
                    ax.imshow(attention_to_heatmap(attn, picture.shape[:2]).numpy(), cmap="jet", alpha=alpha)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return _save(fig, path, dpi)


def alignment(
    weights: Tensor,
    source: Sequence[str],
    target: Sequence[str],
    path: str | Path,
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """An alignment matrix (target rows x source columns) with the tokens on the axes, as in the
    RNNsearch paper's figure 3."""
    plt = _pyplot()
    weights = weights.detach().float().cpu()
    if weights.dim() != 2 or weights.shape != (len(target), len(source)):
        raise ValueError(
            f"weights: expected ({len(target)}, {len(source)}) = (target, source) tokens, "
            f"got {tuple(weights.shape)}"
        )
    fig, ax = plt.subplots(figsize=(0.35 * len(source) + 1.5, 0.35 * len(target) + 1.5))
    ax.imshow(weights.numpy(), cmap="gray", vmin=0.0, vmax=max(float(weights.max()), 1e-6))
    ax.set_xticks(range(len(source)), labels=list(source), rotation=90)
    ax.set_yticks(range(len(target)), labels=list(target))
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, dpi)


def head_grid(maps: Tensor, path: str | Path, *, titles: Sequence[str] | None = None, dpi: int = 100) -> Path:
    """One heatmap per head of (h, N_q, N_k) maps, in a grid."""
    plt = _pyplot()
    maps = maps.detach().float().cpu()
    if maps.dim() != 3:
        raise ValueError(f"maps: expected (heads, N_q, N_k), got {tuple(maps.shape)}")
    heads = maps.shape[0]
    cols = min(heads, 4)
    rows = (heads + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < heads:
            ax.imshow(maps[i].numpy(), cmap="viridis")
            ax.set_title(titles[i] if titles else f"head {i}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def _save(fig: Any, path: str | Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
