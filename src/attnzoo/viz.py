"""Plots of attention: heatmap overlays on images, alignment matrices, per-head grids (PNG files).

Every heatmap has its colour scale drawn beside it, so that a gate ranging over 0.51-0.54 does not
look as sharp as one ranging over 0-1. Needs matplotlib (``pip install attnzoo[demo]``); the Agg
backend is used, so no display is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MapRow",
    "alignment",
    "attention_to_heatmap",
    "head_grid",
    "overlay",
    "overlay_grid",
    "pyplot",
    "save_figure",
]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
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


def attention_to_heatmap(attn: Tensor, size: tuple[int, int], *, normalize: bool = True) -> Tensor:
    """Reduce a spatial attention map to one (H, W) heatmap at ``size``: rescaled to [0, 1] with
    ``normalize`` (which hides the map's own range: draw its colour scale), else its own values.

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
    if not normalize:
        return heat
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
    """Draw ``attn`` as a heatmap over ``image``, with its colour scale (the map's own values), and
    save a PNG."""
    plt = pyplot()
    picture = _image_array(image)
    heat = attention_to_heatmap(attn, picture.shape[:2], normalize=False)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
    shown = ax.imshow(heat.numpy(), cmap="jet", alpha=alpha)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return save_figure(fig, path, dpi)


@dataclass(frozen=True)
class MapRow:
    """One row of :func:`overlay_grid`: a map per image on one colour scale.

    ``kind`` "spatial": (h, w) maps drawn over the images; "channel": (C,) channel weights drawn
    as bars beside each image. ``vmin``/``vmax``: the row's scale (None: the row's own range);
    ``label``: what the values mean, written on the colour bar.
    """

    maps: Sequence[Tensor | None]
    kind: str = "spatial"
    vmin: float | None = None
    vmax: float | None = None
    label: str = ""


def overlay_grid(
    images: Sequence[Tensor],
    rows: dict[str, Sequence[Tensor | None] | MapRow],
    path: str | Path,
    *,
    column_labels: Sequence[str] | None = None,
    alpha: float = 0.5,
    dpi: int = 100,
    cell: float = 1.6,
) -> Path:
    """A grid: the images in the first row, then one row per entry of ``rows``.

    ``rows`` maps a label (a mechanism's name) to a :class:`MapRow`, or to one spatial map per
    image (None where there is none: the cell says so). Each row has one colour scale, drawn as a
    colour bar at its end, so maps compare within a row and their range is visible; channel rows
    are bar charts on a shared y axis. ``column_labels`` titles the columns.
    """
    plt = pyplot()
    rows = {k: (v if isinstance(v, MapRow) else MapRow(v)) for k, v in rows.items()}
    n_rows, n_cols = 1 + len(rows), len(images)
    fig = plt.figure(figsize=(cell * n_cols + 2.4, cell * n_rows + 0.3))
    grid = fig.add_gridspec(n_rows, n_cols + 1, width_ratios=[1] * n_cols + [0.08], wspace=0.08, hspace=0.15)
    pictures = [_image_array(img) for img in images]
    for c, picture in enumerate(pictures):
        ax = fig.add_subplot(grid[0, c])
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
        ax.set_xticks([])
        ax.set_yticks([])
        if column_labels is not None:
            ax.set_title(column_labels[c], fontsize=8)
        if c == 0:
            ax.set_ylabel("input", rotation=0, ha="right", va="center")
    for r, (label, row) in enumerate(rows.items(), start=1):
        present = [m.detach().float().cpu() for m in row.maps if m is not None]
        vmin = row.vmin if row.vmin is not None else min((float(m.min()) for m in present), default=0.0)
        vmax = row.vmax if row.vmax is not None else max((float(m.max()) for m in present), default=1.0)
        vmax = vmax if vmax > vmin else vmin + 1e-6
        shown = None
        for c, picture in enumerate(pictures):
            ax = fig.add_subplot(grid[r, c])
            attn = row.maps[c]
            if row.kind == "channel" and attn is not None:
                weights = attn.detach().float().cpu().flatten()
                ax.bar(range(len(weights)), weights.numpy(), width=1.0, color="tab:blue")
                ax.set_ylim(vmin, vmax)
                ax.set_xlim(-0.5, len(weights) - 0.5)
                ax.set_xticks([])
                ax.tick_params(labelsize=6)
                if c > 0:
                    ax.set_yticklabels([])
                ax.set_xlabel(f"{len(weights)} channels", fontsize=6, labelpad=1)
            else:
                ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
                if attn is not None:
                    heat = attention_to_heatmap(attn, picture.shape[:2], normalize=False)
                    shown = ax.imshow(heat.numpy(), cmap="jet", alpha=alpha, vmin=vmin, vmax=vmax)
                else:
                    ax.text(0.5, 0.5, "no map", ha="center", va="center", transform=ax.transAxes, color="w")
                ax.set_xticks([])
                ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(
                    label, rotation=0, ha="right", va="center", labelpad=12 if row.kind == "channel" else 4
                )
        bar_ax = fig.add_subplot(grid[r, n_cols])
        if shown is not None:
            bar = fig.colorbar(shown, cax=bar_ax)
            bar.ax.tick_params(labelsize=6)
            bar.set_label(row.label, fontsize=6)
        else:
            bar_ax.set_axis_off()
            if row.label:
                bar_ax.text(
                    0.0, 0.5, row.label, rotation=90, va="center", fontsize=6, transform=bar_ax.transAxes
                )
    return save_figure(fig, path, dpi, tight=True)


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
    plt = pyplot()
    weights = weights.detach().float().cpu()
    if weights.dim() != 2 or weights.shape != (len(target), len(source)):
        raise ValueError(
            f"weights: expected ({len(target)}, {len(source)}) = (target, source) tokens, "
            f"got {tuple(weights.shape)}"
        )
    fig, ax = plt.subplots(figsize=(0.35 * len(source) + 1.5, 0.35 * len(target) + 1.5))
    shown = ax.imshow(weights.numpy(), cmap="gray", vmin=0.0, vmax=max(float(weights.max()), 1e-6))
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    ax.set_xticks(range(len(source)), labels=list(source), rotation=90)
    ax.set_yticks(range(len(target)), labels=list(target))
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def head_grid(maps: Tensor, path: str | Path, *, titles: Sequence[str] | None = None, dpi: int = 100) -> Path:
    """One heatmap per head of (h, N_q, N_k) maps, in a grid, on one colour scale (drawn)."""
    plt = pyplot()
    maps = maps.detach().float().cpu()
    if maps.dim() != 3:
        raise ValueError(f"maps: expected (heads, N_q, N_k), got {tuple(maps.shape)}")
    heads = maps.shape[0]
    cols = min(heads, 4)
    rows = (heads + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.8, 2.6 * rows), squeeze=False)
    vmax = max(float(maps.max()), 1e-6)
    shown = None
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < heads:
            shown = ax.imshow(maps[i].numpy(), cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_title(titles[i] if titles else f"head {i}", fontsize=9)
    fig.tight_layout()
    if shown is not None:
        fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02, label="attention weight")
    return save_figure(fig, path, dpi)


def save_figure(fig: Any, path: str | Path, dpi: int = 100, *, tight: bool = False) -> Path:
    """Save ``fig`` as a PNG at ``path`` (its folder created) and close it; returns the path."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return path
