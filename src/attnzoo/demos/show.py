"""`attnzoo show NAME`: draw what a mechanism computes on an image.

The image (scikit-learn's bundled photo by default) goes through a small fixed convolutional stem
(seeded, so every run is the same) to a feature map, the mechanism runs on it with
``return_attn=True``, and each map is drawn over the image: spatial maps (gates, pooling weights)
as they are; pairwise maps (non-local, criss-cross, multi-head ...) as the attention of one query
position (the centre, or ``query=(y, x)`` in feature-map cells), so their structure is visible: a
full-image footprint for non-local, a cross for criss-cross. Channel gates have no spatial layout
and are drawn as a bar chart. The mechanism's weights are its initialisation (seeded): this shows
the computation, not what a trained network learns (``attnzoo compare`` shows that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo.registry import get_spec

__all__ = ["load_image", "show"]


def load_image(path: str | Path | None, width: int = 160) -> Tensor:
    """(3, H, W) in [0, 1], resized to ``width`` pixels wide; None: scikit-learn's china.jpg."""
    from PIL import Image

    if path is None:
        from sklearn.datasets import load_sample_image

        picture = Image.fromarray(load_sample_image("china.jpg"))
    else:
        if not Path(path).is_file():
            raise ValueError(f"image: no file at {path}")
        picture = Image.open(path).convert("RGB")
    height = max(8, round(picture.height * width / picture.width))
    picture = picture.resize((width, height), Image.BILINEAR)
    pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return pixels.permute(2, 0, 1).float() / 255.0  # (H, W, 3) -> (3, H, W)


def _stem(channels: int) -> nn.Module:
    """A fixed conv stem: 3 -> channels, stride 4 overall, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
    ).eval()


def _pairwise_row(maps: Tensor, h: int, w: int, query: tuple[int, int]) -> Tensor | None:
    """The (h, w) map of one query from (B, [heads,] N_q, N_k) maps with N_q = N_k = h*w."""
    if maps.dim() == 4 and maps.shape[-1] == maps.shape[-2] == h * w:
        maps = maps.mean(dim=1)  # heads averaged
    if maps.dim() == 3 and maps.shape[-1] == maps.shape[-2] == h * w:
        return maps[0, query[0] * w + query[1]].view(h, w)
    return None


def _criss_cross_row(maps: Tensor, h: int, w: int, query: tuple[int, int]) -> Tensor | None:
    """(B, H, W, H + W) criss-cross affinities -> the (h, w) map of one query (column then row)."""
    if maps.dim() == 4 and tuple(maps.shape[1:3]) == (h, w) and maps.shape[-1] in (h + w, h + w - 1):
        y, x = query
        affinity = maps[0, y, x]
        canvas = torch.zeros(h, w)
        canvas[:, x] = affinity[:h]
        canvas[y, :] = canvas[y, :] + affinity[-w:]
        return canvas
    return None


def _to_grid(maps: Any, h: int, w: int, query: tuple[int, int]) -> list[tuple[str, Tensor, str]]:
    """(label, map, kind) for every drawable map: kind is 'spatial' (h, w) or 'channel' (C,)."""
    if isinstance(maps, dict):
        return [
            item
            for key, value in maps.items()
            for item in [
                (f"{key}: {lab}" if lab else key, m, kind) for lab, m, kind in _to_grid(value, h, w, query)
            ]
        ]
    if not isinstance(maps, Tensor):
        return []
    maps = maps.detach().float()
    for pick in (_pairwise_row, _criss_cross_row):
        row = pick(maps, h, w, query)
        if row is not None:
            return [(f"query at {query}", row, "spatial")]
    if maps.dim() == 4 and maps.shape[-2:] == (1, 1):
        return [("", maps[0, :, 0, 0], "channel")]
    if maps.dim() >= 3 and maps.shape[-2:] == (h, w):
        return [("", maps[0].reshape(-1, h, w).mean(dim=0), "spatial")]
    if maps.shape[-1] == h * w and maps[0].numel() == h * w:
        return [("", maps[0].reshape(h, w), "spatial")]
    return []


def show(
    name: str,
    image: str | Path | None = None,
    output: str | Path = "reports/show",
    *,
    channels: int = 64,
    query: tuple[int, int] | None = None,
) -> Path:
    """Draw the maps of mechanism ``name`` on ``image``; returns the PNG's path.

    Raises:
        KeyError: unknown name. ValueError: the mechanism returns no maps, or none drawable.
    """
    from attnzoo import viz

    spec = get_spec(name)
    if not spec.returns_attn:
        raise ValueError(f"name: {name!r} returns no attention maps")
    picture = load_image(image)
    with torch.no_grad():
        features = _stem(channels)(picture[None])  # (1, C, h, w)
    _, c, h, w = features.shape
    query = query or (h // 2, w // 2)
    if not (0 <= query[0] < h and 0 <= query[1] < w):
        raise ValueError(f"query: expected a cell inside the {h} x {w} feature map, got {query}")
    sizes = spec.sizes(batch=1, width=c, extent=min(h, w))
    torch.manual_seed(0)
    module = spec.build(sizes).eval()
    if spec.channel_dim == 1:
        inputs: list[Tensor] = [features] * spec.num_inputs
    else:
        sequence = features.flatten(2).transpose(1, 2).contiguous()  # (1, C, h, w) -> (1, hw, C)
        inputs = [sequence] * spec.num_inputs
    with torch.no_grad():
        _, maps = module(*inputs, return_attn=True)
    drawable = _to_grid(maps, h, w, query)
    if not drawable:
        raise ValueError(f"name: the maps of {name!r} have no spatial layout to draw")
    plt = viz._pyplot()
    fig, axes = plt.subplots(1, len(drawable) + 1, figsize=(4 * (len(drawable) + 1), 3.4), squeeze=False)
    axes[0][0].imshow(picture.permute(1, 2, 0).numpy())
    axes[0][0].set_title("input")
    for ax, (label, grid, kind) in zip(axes[0][1:], drawable):
        if kind == "channel":
            ax.bar(range(len(grid)), grid.numpy())
            ax.set_xlabel("channel")
            ax.set_title(f"{label or 'channel gate'}")
            continue
        heat = viz.attention_to_heatmap(grid, tuple(picture.shape[1:]))
        ax.imshow(picture.permute(1, 2, 0).numpy())
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.5)
        if label.startswith("query"):
            scale_y, scale_x = picture.shape[1] / h, picture.shape[2] / w
            ax.plot((query[1] + 0.5) * scale_x, (query[0] + 0.5) * scale_y, "w+", markersize=12, mew=2)
        ax.set_title(label or "map")
    for ax in axes[0]:
        if not ax.get_xlabel():
            ax.set_axis_off()
    fig.suptitle(f"{name}: {spec.paper.cite()}", fontsize=9)
    fig.tight_layout()
    return viz._save(fig, Path(output) / f"{name}.png", 100)
