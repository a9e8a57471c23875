"""`attnzoo show NAME`: draw what a mechanism computes on an image.

The image (scikit-learn's bundled photo by default, centre-cropped to a square) goes through a
small fixed convolutional stem (seeded, so every run is the same) to a feature map; the mechanism
runs on it with ``return_attn=True`` (a sequence mechanism on the map's cells as tokens, every
further input made from the same map), and each map is drawn as its spec's ``map_kind`` says:
spatial maps (gates, pooling weights) over the image; pairwise maps (non-local, multi-head,
alignments ...) as the attention of one query cell (the centre, or ``query=(y, x)``) over the keys;
criss-cross and local-window weights placed where they lie; channel weights as bars. Every heatmap
has its colour scale. Per-edge weights of a graph have no layout on an image and are refused with
the reason.

Without ``report``, the weights are the mechanism's initialisation (seeded), and the picture says
so: it shows the computation, not what a trained network learns. With ``report=REPORT_DIR`` (a
folder written by ``attnzoo compare``), the trained network saved there is drawn instead: every
attention module on the report's sample images (or ``image``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo.demos.maps import Entry, entries, square_grid
from attnzoo.registry import ModuleSpec, get_spec

__all__ = ["load_image", "show"]

#: Side of the square the image is resized to; the stem's stride 4 makes a 32 x 32 feature map.
IMAGE_SIDE = 128


def load_image(path: str | Path | None, side: int = IMAGE_SIDE) -> Tensor:
    """(3, side, side) in [0, 1]: the image centre-cropped to a square and resized; None:
    scikit-learn's china.jpg.

    Raises:
        ValueError: no file at ``path``, or not an image that Pillow can read.
    """
    from PIL import Image, UnidentifiedImageError

    if path is None:
        from sklearn.datasets import load_sample_image

        picture = Image.fromarray(load_sample_image("china.jpg"))
    else:
        if not Path(path).is_file():
            raise ValueError(f"image: no file at {path}")
        try:
            with Image.open(path) as opened:
                picture = opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"image: {path} is not an image Pillow can read ({error})") from None
    crop = min(picture.width, picture.height)
    left, top = (picture.width - crop) // 2, (picture.height - crop) // 2
    picture = picture.crop((left, top, left + crop, top + crop)).resize((side, side), Image.BILINEAR)
    pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).view(side, side, 3)
    return pixels.permute(2, 0, 1).float() / 255.0  # (H, W, 3) -> (3, H, W)


def _stem(channels: int) -> nn.Module:
    """A fixed conv stem: 3 -> channels, stride 4 overall, seeded."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    stem = nn.Sequential(
        nn.Conv2d(3, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
    ).eval()
    torch.random.set_rng_state(generator_state)
    return stem


def _project(x: Tensor, width: int, seed: int) -> Tensor:
    """A fixed random projection of the last dimension to ``width`` (identity when it fits)."""
    if x.shape[-1] == width:
        return x
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(x.shape[-1], width, generator=generator) / math.sqrt(x.shape[-1])
    return x @ weight


def _inputs(spec: ModuleSpec, features: Tensor) -> tuple[tuple[Tensor, ...], int]:
    """The mechanism's inputs made from the (1, C, s, s) feature map, and the extent to build it at.

    Image inputs are the map (its channels projected where the mechanism wants another width);
    sequence inputs are the map's s * s cells as tokens, projected the same way.
    """
    _, channels, side, _ = features.shape
    tokens = features.flatten(2).transpose(1, 2)  # (1, C, s, s) -> (1, s*s, C)
    probe = spec.example_inputs(spec.sizes(batch=1, width=channels, extent=side))
    if any(x.is_floating_point() and x.dim() == 2 for x in probe):
        raise ValueError(
            f"name: {spec.name!r} works on graphs (node features and edges): its per-edge weights "
            f"have no layout on an image; see docs/mechanisms/{spec.name}.md"
        )
    has_image = any(x.is_floating_point() and x.dim() == 4 for x in probe)
    extent = side if has_image else side * side
    examples = spec.example_inputs(spec.sizes(batch=1, width=channels, extent=extent))
    inputs = []
    for i, x in enumerate(examples):
        if x.is_floating_point() and x.dim() == 4:
            # (1, C, s, s) -> (1, s, s, C) -> projected -> (1, C', s, s)
            inputs.append(_project(features.permute(0, 2, 3, 1), x.shape[1], seed=i).permute(0, 3, 1, 2))
        elif x.is_floating_point() and x.dim() == 3:
            inputs.append(_project(tokens, x.shape[-1], seed=i))
        else:
            inputs.append(x)
    return tuple(t.contiguous() for t in inputs), extent


def _keys_panel(row: Tensor, side: int, what: str, pooled: bool) -> tuple[str, Tensor, str]:
    """One query's weights over N_k keys: on the image when the keys are its cells (or, for an
    image mechanism, a square grid of pooled cells), else as a profile over the keys (a sequence
    mechanism's fewer keys are projections, not cells: Linformer)."""
    if row.numel() == side * side:
        return what, row.view(side, side), "spatial"
    grid = square_grid(row[None]) if pooled else None
    if grid is not None:
        return f"{what} (keys pooled to {grid.shape[-1]}x{grid.shape[-1]})", grid[0], "spatial"
    return f"{what} over {row.numel()} keys (not image cells)", row, "profile"


def _panels(
    entry: Entry, side: int, channels: int, query: tuple[int, int], pooled: bool = True
) -> list[tuple[str, Tensor, str]]:
    """(title, values, how) for one map: how is "spatial" (h, w), "profile" (N,), "bars" (C,) or
    (M, C), or "matrix" (a C x C channel affinity)."""
    maps, kind, n = entry.maps, entry.kind, side * side
    name = entry.key
    y, x = query
    if kind == "channel":
        weights = maps[0].flatten(1) if maps.dim() == 5 else maps[0].flatten()  # (M, C) or (C,)
        return [(name or "channel weights", weights, "bars")]
    if kind == "criss_cross" and maps.dim() == 4:
        affinity = maps[0, y, x]  # (H + W [- 1],): the column, then the row
        canvas = torch.zeros(side, side)
        canvas[:, x] = affinity[:side]
        canvas[y, :] = canvas[y, :] + affinity[-side:]
        return [(f"{name + ': ' if name else ''}query at {query}", canvas, "spatial")]
    if kind == "local":
        window = maps[0].mean(dim=0) if maps.dim() == 5 else maps[0]  # (H, W, k*k), heads averaged
        k = math.isqrt(window.shape[-1])
        canvas = torch.zeros(side + k, side + k)
        canvas[y : y + k, x : x + k] = window[y, x].view(k, k)  # the k x k window centred on the query
        half = k // 2
        return [
            (
                f"{name + ': ' if name else ''}window of query {query}",
                canvas[half : half + side, half : half + side],
                "spatial",
            )
        ]
    if kind in ("pairwise", "alignment") and maps.dim() in (3, 4):
        maps = maps[0].mean(dim=0) if maps.dim() == 4 else maps[0]  # (N_q, N_k), heads averaged
        if maps.shape[0] == maps.shape[1] == channels and channels != n:
            return [(name or "channel affinity", maps, "matrix")]
        if maps.shape[0] == n:
            row, what = maps[y * side + x], f"query at {query}"
        else:
            row, what = maps.mean(dim=0), f"mean over {maps.shape[0]} queries"
        return [_keys_panel(row, side, f"{name + ': ' if name else ''}{what}", pooled)]
    if kind == "spatial":
        first = maps[0]
        if first.dim() == 3:
            return [(name or "spatial map", first.mean(dim=0), "spatial")]  # (k, h, w) averaged
        if first.dim() == 2 and first.shape == (side, side):
            return [(name or "spatial map", first, "spatial")]
        flat = first.flatten()
        if flat.numel() == n:
            return [(name or "pooling weights", flat.view(side, side), "spatial")]
    return []


def _draw_panel(fig: Any, ax: Any, picture: Tensor, title: str, values: Tensor, how: str) -> None:
    """One panel, with its colour scale (heatmaps) or its axes (bars, profiles)."""
    from attnzoo import viz

    values = values.detach().float()
    if how == "spatial":
        heat = viz.attention_to_heatmap(values, tuple(picture.shape[1:]), normalize=False)
        ax.imshow(picture.permute(1, 2, 0).numpy(), cmap="gray" if picture.shape[0] == 1 else None)
        shown = ax.imshow(heat.numpy(), cmap="jet", alpha=0.5)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    elif how == "matrix":
        shown = ax.imshow(values.numpy(), cmap="viridis")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
        ax.set_xlabel("channel (key)")
        ax.set_ylabel("channel (query)")
    elif how == "bars":
        if values.dim() == 2:  # (M, C): one line per branch
            for m, branch in enumerate(values):
                ax.plot(branch.numpy(), label=f"branch {m + 1}")
            ax.legend(fontsize=7)
        else:
            ax.bar(range(values.numel()), values.numpy(), width=1.0)
        ax.set_xlabel("channel")
        ax.set_ylim(0, max(1.0, float(values.max())))
    else:  # profile over keys
        ax.bar(range(values.numel()), values.numpy(), width=1.0)
        ax.set_xlabel("key")
    ax.set_title(title, fontsize=8)


def _run(spec: ModuleSpec, features: Tensor) -> Any:
    """The mechanism's maps on the feature map, built at its size with seeded weights."""
    inputs, extent = _inputs(spec, features)
    torch.manual_seed(0)
    module = spec.build(spec.sizes(batch=1, width=features.shape[1], extent=extent)).eval()
    with torch.no_grad():
        _, maps = module(*inputs, return_attn=True)
    return maps


def _output_path(output: str | Path, name: str) -> Path:
    """``output`` itself when it names a .png file, else ``output/NAME.png``; its folder is created
    and checked before any work."""
    from attnzoo.demos.compare import prepare_output

    path = Path(output)
    target = path if path.suffix.lower() == ".png" else path / f"{name}.png"
    prepare_output(target.parent)
    return target


def show(
    name: str,
    image: str | Path | None = None,
    output: str | Path = "reports/show",
    *,
    channels: int = 64,
    query: tuple[int, int] | None = None,
    report: str | Path | None = None,
) -> Path:
    """Draw the maps of mechanism ``name`` on ``image``; returns the PNG's path.

    Args:
        name: a registered mechanism.
        image: an image file (default: scikit-learn's bundled photo).
        output: a ``.png`` file, or a folder for ``NAME.png``.
        channels: the feature map's width.
        query: the (y, x) cell of the 32 x 32 feature map whose pairwise attention is drawn.
        report: a folder written by ``attnzoo compare``: draw its trained network for ``name``.

    Raises:
        KeyError: unknown name. ValueError: the mechanism returns no maps, or maps without a
        layout on an image (graphs), a query outside the map, a bad image or output.
    """
    if report is not None:
        return _show_trained(name, Path(report), image, output)
    spec = get_spec(name)
    if not spec.returns_attn:
        raise ValueError(f"name: {name!r} returns no attention maps (nothing to draw)")
    if getattr(spec, "map_kind", None) == "edges":
        raise ValueError(
            f"name: {name!r} returns per-edge weights of a graph, which have no layout on an image; "
            f"see docs/mechanisms/{name}.md"
        )
    side = IMAGE_SIDE // 4
    query = query or (side // 2, side // 2)
    if not (0 <= query[0] < side and 0 <= query[1] < side):
        raise ValueError(f"query: expected a cell Y,X inside the {side} x {side} feature map, got {query}")
    target = _output_path(output, name)
    picture = load_image(image)
    with torch.no_grad():
        features = _stem(channels)(picture[None])  # (1, C, s, s)
    try:
        maps = _run(spec, features)
    except ValueError:
        # a mechanism built for small maps (relative-position tables): its default size instead
        small = spec.default_sizes.extent
        if small >= side:
            raise
        features = torch.nn.functional.adaptive_avg_pool2d(features, small)  # (1, C, s', s')
        query = (query[0] * small // side, query[1] * small // side)
        side = small
        maps = _run(spec, features)
    pooled = spec.channel_dim == 1
    panels = [
        panel
        for entry in entries(spec, maps, side, side)
        for panel in _panels(entry, side, channels, query, pooled)
    ]
    if not panels:
        raise ValueError(f"name: the maps of {name!r} have no spatial or sequence layout to draw")

    from attnzoo import viz

    plt = viz.pyplot()
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.9), squeeze=False)
    axes[0][0].imshow(picture.permute(1, 2, 0).numpy())
    axes[0][0].set_title("input", fontsize=8)
    axes[0][0].set_axis_off()
    scale = picture.shape[-1] / side
    for ax, (title, values, how) in zip(axes[0][1:], panels):
        _draw_panel(fig, ax, picture, title, values, how)
        if how == "spatial" and "query" in title:
            ax.plot((query[1] + 0.5) * scale, (query[0] + 0.5) * scale, "w+", markersize=12, mew=2)
    fig.suptitle(
        f"{name}: {spec.paper.cite()}\nUNTRAINED: seeded initial weights on a fixed random stem;\n"
        "this shows what it computes, not what it learns\n"
        "(attnzoo show NAME --from REPORT_DIR draws a network trained by attnzoo compare)",
        fontsize=8,
    )
    fig.tight_layout()
    return viz.save_figure(fig, target)


def _show_trained(name: str, report: Path, image: str | Path | None, output: str | Path) -> Path:
    """Every attention module of the network that ``attnzoo compare`` trained with ``name``."""
    import torch.nn.functional as F

    from attnzoo import viz
    from attnzoo.demos.compare import load_trained, module_views

    models = report / "models"
    path = models / f"{name}.pt"
    if not path.is_file():
        saved = sorted(p.stem for p in models.glob("*.pt")) if models.is_dir() else []
        raise ValueError(
            f"from: no trained {name!r} network in {report}"
            + (f" (it has: {', '.join(saved)})" if saved else " (not a report folder of attnzoo compare)")
        )
    target = _output_path(output, name)
    model, checkpoint = load_trained(path)
    size = checkpoint["image_size"]
    if image is None:
        images = checkpoint["samples"][:4]
        titles = [
            f"test #{i}: {checkpoint['classes'][int(y)]}"
            for i, y in enumerate(checkpoint["sample_labels"][:4])
        ]
    else:
        picture = load_image(image, side=size)
        if checkpoint["in_chans"] == 1:
            picture = picture.mean(dim=0, keepdim=True)  # (3, S, S) -> (1, S, S), grey like the data
        images = ((picture[None] - checkpoint["mean"]) / checkpoint["std"]).float()
        titles = [Path(image).name]
    views = module_views(model, images)
    if not views:
        raise ValueError(f"name: the trained {name!r} network has no attention maps to draw")
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    cols = len(views) + 1
    plt = viz.pyplot()
    fig, axes = plt.subplots(len(images), cols, figsize=(2.9 * cols, 2.5 * len(images)), squeeze=False)
    for r, picture in enumerate(images):
        shown = (picture - picture.min()) / (picture.max() - picture.min()).clamp_min(1e-12)
        ax = axes[r][0]
        ax.imshow(shown[0].numpy() if shown.shape[0] == 1 else shown.permute(1, 2, 0).numpy(), cmap="gray")
        ax.set_title(f"{titles[r]} (predicted {checkpoint['classes'][int(predicted[r])]})", fontsize=7)
        ax.set_axis_off()
        for ax, view in zip(axes[r][1:], views):
            if view.kind == "channel":
                _draw_panel(fig, ax, shown, f"{view.name}: {view.label}", view.values[r], "bars")
                continue
            grid = view.values[r][None, None]  # (s, s) -> (1, 1, s, s)
            heat = F.interpolate(grid, size=shown.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
            ax.imshow(
                shown[0].numpy() if shown.shape[0] == 1 else shown.permute(1, 2, 0).numpy(), cmap="gray"
            )
            vmax = max(1.0, float(view.values.max())) if view.relative else 1.0
            drawn = ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=vmax)
            bar = fig.colorbar(drawn, ax=ax, fraction=0.046, pad=0.03)
            bar.ax.tick_params(labelsize=6)
            ax.set_title(
                f"{view.name} ({view.values.shape[-1]}x{view.values.shape[-1]}): {view.label}", fontsize=7
            )
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"{name}: TRAINED by attnzoo compare (ResNet-{checkpoint['depth']}, seed {checkpoint['seed']}, "
        f"test accuracy {100 * checkpoint['accuracy']:.1f}%) on {checkpoint['data']}",
        fontsize=9,
    )
    fig.tight_layout()
    return viz.save_figure(fig, target)
