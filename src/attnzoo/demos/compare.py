"""`attnzoo compare`: which attention mechanism should I put in my network?

The same small ResNet is trained with each chosen mechanism on the same data, with the same seeds,
and the results are reported as in the papers' tables: accuracy (mean and spread over seeds),
parameters, FLOPs, latency, peak memory, and the change against the plain network; plus plots
(accuracy against cost, training curves) and each mechanism's attention maps on the same test
images.

The default data is the embedded cluttered-digits task (:mod:`attnzoo.demos.digits`); ``data=PATH``
takes an image folder with one sub-folder per class. Under ``torchrun`` training is data-parallel
(:mod:`attnzoo.demos.distributed`) with the single-process result.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._progress import Progress
from attnzoo.bench.measure import compare_calls, count_flops, peak_memory
from attnzoo.demos.distributed import (
    DistInfo,
    cleanup_distributed,
    init_distributed,
    prepare_model,
    train_epoch,
)
from attnzoo.demos.parallel import ProgressSink, plan_workers, run_jobs
from attnzoo.inspect import capture

__all__ = [
    "DEFAULT_MECHANISMS",
    "CompareConfig",
    "MechanismResult",
    "comparison_table",
    "load_images",
    "run_compare",
    "write_report",
]

DEFAULT_MECHANISMS: tuple[str, ...] = ("none", "se", "eca", "cbam", "bam", "gc", "sk", "non_local")


def _default_attention_kwargs() -> dict[str, dict[str, Any]]:
    # The non-local paper's sub-sampling trick (section 3.3; on in the official video code): phi and
    # g max-pooled 2x2, so each position attends to N/4 others. Halves the block's training time
    # at 32 x 32 without changing what it computes in kind.
    return {"non_local": {"sub_sample": True}}


@dataclass
class CompareConfig:
    """Everything that decides a comparison; the same config and seed give the same report."""

    mechanisms: Sequence[str] = DEFAULT_MECHANISMS
    epochs: int = 8
    seeds: Sequence[int] = (0, 1)
    image_size: int = 32
    depth: int = 8
    width: int = 16
    batch_size: int = 32
    lr: float = 5e-3
    weight_decay: float = 5e-4
    data: str | None = None
    limit: int | None = None  # at most this many training images (smoke runs, tests)
    output: str = "reports/compare"
    threads: int | None = None  # torch threads in all (default: torch's choice, one per core)
    workers: int | None = None  # parallel training processes (default: one per thread, CPU only)
    attention_kwargs: dict[str, dict[str, Any]] = field(default_factory=_default_attention_kwargs)
    device: str = "cpu"
    latency_batch: int = 32
    sample_images: int = 6
    progress: bool = True


@dataclass
class Dataset:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    name: str

    @property
    def in_chans(self) -> int:
        return self.train_x.shape[1]


@dataclass
class MechanismResult:
    """One mechanism's outcome over all seeds."""

    name: str
    accuracies: list[float] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)  # test accuracy after each epoch, per seed
    losses: list[list[float]] = field(default_factory=list)  # mean training loss per epoch, per seed
    params: int = 0
    mflops: float = 0.0
    latency_ms: float = 0.0
    peak_mib: float = 0.0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def load_images(path: str | Path, size: int, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """An image folder (one sub-folder per class) as tensors of side ``size``, split by ``seed``."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data: {root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise ValueError(f"data: expected at least two class sub-folders in {root}, found {classes}")
    images, labels = [], []
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in suffixes:
                with Image.open(file) as img:
                    rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
                # (H, W, 3) bytes -> (3, H, W) in [0, 1]
                pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3)
                images.append(pixels.permute(2, 0, 1).float() / 255.0)
                labels.append(label)
    if not images:
        raise ValueError(f"data: no images ({', '.join(sorted(suffixes))}) under {root}")
    x, y = torch.stack(images), torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = max(1, round(test_fraction * len(y)))
    return Dataset(x[n_test:], y[n_test:], x[:n_test], y[:n_test], classes, root.name)


def load_dataset(config: CompareConfig) -> Dataset:
    if config.data:
        data = load_images(config.data, config.image_size)
    else:
        from attnzoo.demos.digits import cluttered_digits

        digits = cluttered_digits(config.image_size)
        data = Dataset(
            digits.train_images,
            digits.train_labels,
            digits.test_images,
            digits.test_labels,
            [str(i) for i in range(10)],
            f"cluttered digits {config.image_size}x{config.image_size}",
        )
    if config.limit is not None:
        data.train_x, data.train_y = data.train_x[: config.limit], data.train_y[: config.limit]
    # normalise with the training set's statistics, per channel
    mean = data.train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = data.train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    data.train_x = (data.train_x - mean) / std
    data.test_x = (data.test_x - mean) / std
    return data


def build_model(name: str, config: CompareConfig, data: Dataset) -> nn.Module:
    from attnzoo.models.resnet import resnet

    return resnet(
        config.depth,
        None if name == "none" else name,
        num_classes=len(data.classes),
        in_chans=data.in_chans,
        width=config.width,
        **({} if name == "none" else config.attention_kwargs.get(name, {})),
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    return correct / len(y)


def train_model(
    model: nn.Module,
    data: Dataset,
    config: CompareConfig,
    seed: int,
    info: DistInfo,
    progress: ProgressSink,
    label: str = "",
) -> tuple[nn.Module, list[float], list[float]]:
    """Train ``model``; returns the trained (unwrapped) model, test accuracy and mean loss per epoch."""
    # channels-last is oneDNN's preferred layout on CPU: about 25% faster steps for this ResNet
    model = prepare_model(model.to(memory_format=torch.channels_last), info)
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    # the fused kernel updates every parameter in one call: the per-tensor loop of the default
    # implementation is a few percent of these small networks' steps
    fused = info.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused
    )
    steps_per_epoch = math.ceil(len(data.train_y) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.2
    )
    order_generator = torch.Generator().manual_seed(seed)
    train_x = data.train_x.to(info.device).contiguous(memory_format=torch.channels_last)
    train_y = data.train_y.to(info.device)
    curve, losses = [], []
    for epoch in range(config.epochs):
        loss = train_epoch(
            model,
            optimizer,
            scheduler,
            len(train_y),
            config.batch_size,
            order_generator,
            lambda idx: F.cross_entropy(model(train_x[idx]), train_y[idx]),
            info,
        )
        losses.append(loss)
        curve.append(evaluate(core, data.test_x.to(info.device), data.test_y.to(info.device)))
        progress.update(f"{label}seed {seed} epoch {epoch + 1}/{config.epochs}: test acc {curve[-1]:.3f}")
    return core, curve, losses


def _forward(model: nn.Module, x: Tensor) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            model(x)

    return call


def measure_cost(model: nn.Module, data: Dataset, config: CompareConfig) -> tuple[int, float, float]:
    """Parameters, MFLOPs per image and forward peak memory (MiB) at ``latency_batch``."""
    model = model.eval()
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    flops = count_flops(_forward(model, data.test_x[:1].to(device)))
    forward = _forward(model, data.test_x[: config.latency_batch].to(device))
    forward()  # warm-up: the first call's one-off allocations (kernel caches) are not the network's
    peak = peak_memory(forward, device=device)
    return params, flops / 1e6, peak / 2**20


def measure_latency(models: dict[str, nn.Module], data: Dataset, config: CompareConfig) -> dict[str, float]:
    """Forward latency (ms) of a batch of ``latency_batch``: the median of 7 after warm-up, every
    network's repeats interleaved with the others' so that the machine's load changes hit all alike
    (the Δ against the plain network is a ratio within one run)."""
    calls = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        calls[name] = _forward(model.eval(), data.test_x[: config.latency_batch].to(device))
    device = next(next(iter(models.values())).parameters()).device
    return {name: t.ms for name, t in compare_calls(calls, warmup=2, repeats=7, device=device).items()}


def spatial_map(maps: Any, image_size: int) -> Tensor | None:
    """One (B, S, S) map in [0, 1] per image from a module's maps, or None if they have no layout.

    Understands (B, C, h, w) maps (C averaged), dicts (their first spatial entry, e.g. CBAM's
    "spatial"), pairwise (B, N_q, N_k) maps whose N_k keys lie on a square grid (the attention each
    key position receives, averaged over queries), and (B, N) / (B, 1, N) / (B, N, 1) pooling weights. Channel
    gates (B, C, 1, 1) have no spatial layout.
    """
    if isinstance(maps, dict):
        for value in maps.values():
            found = spatial_map(value, image_size)
            if found is not None:
                return found
        return None
    if not isinstance(maps, Tensor) or maps.dim() < 2:
        return None
    maps = maps.detach().float()
    batch = maps.shape[0]
    if maps.dim() == 4 and maps.shape[-2:].numel() > 1:
        grid = maps.mean(dim=1).reshape(batch, -1)  # (B, C, h, w) -> (B, h*w), channels averaged
    elif maps.dim() == 2 or (maps.dim() == 3 and 1 in maps.shape[1:]):
        grid = maps.reshape(batch, -1)  # pooling weights (B, N), (B, 1, N) or (B, N, 1)
    elif maps.dim() == 3:
        # pairwise (B, N_q, N_k): the attention each key position receives, averaged over queries;
        # N_k < N_q when keys are sub-sampled (non-local's max-pooled phi), drawn on their own grid
        grid = maps.mean(dim=1)  # (B, N_k)
    else:
        return None
    side = math.isqrt(grid.shape[-1])
    if side * side != grid.shape[-1] or side < 2:
        return None
    heat = grid.view(batch, 1, side, side)
    heat = F.interpolate(heat, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
    low = heat.flatten(1).min(dim=1).values.view(batch, 1, 1)
    high = heat.flatten(1).max(dim=1).values.view(batch, 1, 1)
    return (heat - low) / (high - low).clamp_min(1e-12)


def attention_heatmaps(model: nn.Module, images: Tensor) -> Tensor | None:
    """The mean of every spatial map the model's attention modules produce for ``images``."""
    model.eval()
    with capture(model) as maps, torch.no_grad():
        model(images)
    heats = [h for h in (spatial_map(maps[name], images.shape[-1]) for name in maps) if h is not None]
    if not heats:
        return None
    return torch.stack(heats).mean(dim=0)  # (B, S, S)


@dataclass
class _Run:
    """What one training run (a mechanism and a seed) hands back."""

    curve: list[float]
    losses: list[float]
    state: dict[str, Tensor] | None  # the trained weights, kept for the first seed only


def _train_run(
    name: str, seed: int, shared: tuple[CompareConfig, Dataset, DistInfo], progress: ProgressSink
) -> _Run:
    """Build and train one network; a module-level function so that worker processes can run it."""
    config, data, info = shared
    torch.manual_seed(seed)
    model = build_model(name, config, data)
    model, curve, losses = train_model(model, data, config, seed, info, progress, label=f"{name} ")
    keep = seed == config.seeds[0]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if keep else None
    return _Run(curve, losses, state)


def run_compare(config: CompareConfig) -> tuple[list[MechanismResult], Dataset, dict[str, Tensor | None]]:
    """Train and measure every mechanism; returns the results, the data and the sample heatmaps.

    The runs (mechanism x seed) train in parallel worker processes on the CPU (``config.workers``,
    :mod:`attnzoo.demos.parallel`), or data-parallel under torchrun; the costs and maps are then
    measured here, one network at a time, on all ``config.threads`` threads.
    """
    import attnzoo

    for name in config.mechanisms:
        if name != "none":
            attnzoo.get_spec(name)  # unknown names fail before any training
    if config.threads:
        torch.set_num_threads(config.threads)
    info = init_distributed(config.device)
    try:
        data = load_dataset(config)
        samples = data.test_x[: config.sample_images]
        jobs = [(name, seed) for name in config.mechanisms for seed in config.seeds]
        parallel = not info.distributed and info.device.type == "cpu"
        workers, threads = plan_workers(len(jobs), torch.get_num_threads(), config.workers if parallel else 1)
        progress = Progress(len(jobs) * config.epochs, enabled=config.progress and info.is_main)
        runs = run_jobs(
            _train_run, jobs, shared=(config, data, info), workers=workers, threads=threads, progress=progress
        )
        progress.close()

        results, heatmaps, trained = [], {}, {}
        for name in config.mechanisms:
            result = MechanismResult(name)
            for seed in config.seeds:
                run = runs[jobs.index((name, seed))]
                result.accuracies.append(run.curve[-1])
                result.curves.append(run.curve)
                result.losses.append(run.losses)
                if run.state is not None:
                    torch.manual_seed(seed)
                    model = build_model(name, config, data)
                    model.load_state_dict(run.state)
                    trained[name] = model
                    result.params, result.mflops, result.peak_mib = measure_cost(model, data, config)
                    heatmaps[name] = attention_heatmaps(model, samples)
            results.append(result)
        latencies = measure_latency(trained, data, config)
        for result in results:
            result.latency_ms = latencies[result.name]
        return results, data, heatmaps
    finally:
        cleanup_distributed(info)


def comparison_table(results: Sequence[MechanismResult], seeds: int) -> str:
    base = next((r for r in results if r.name == "none"), None)
    rows = [
        f"| mechanism | top-1 accuracy (mean ± sd, {seeds} seeds) | Δ acc | params | Δ params | MFLOPs "
        "| latency ms | Δ latency | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if base is not None and r is not base:
            d_acc = f"{100 * (r.mean - base.mean):+.2f} pt"
            d_params = f"{r.params - base.params:+,}"
            d_lat = f"{100 * (r.latency_ms / base.latency_ms - 1):+.0f}%"
        else:
            d_acc = d_params = d_lat = "-"
        rows.append(
            f"| {r.name} | {100 * r.mean:.2f} ± {100 * r.spread:.2f} | {d_acc} | {r.params:,} | {d_params} "
            f"| {r.mflops:.1f} | {r.latency_ms:.2f} | {d_lat} | {r.peak_mib:.1f} |"
        )
    return "\n".join(rows)


def _options_text(config: CompareConfig) -> str:
    """The non-default constructor options of the compared mechanisms, e.g. ``non_local(sub_sample=True)``."""
    return ", ".join(
        f"{name}({', '.join(f'{k}={v!r}' for k, v in options.items())})"
        for name, options in config.attention_kwargs.items()
        if name in config.mechanisms and options
    )


def write_report(
    results: Sequence[MechanismResult],
    data: Dataset,
    heatmaps: dict[str, Tensor | None],
    config: CompareConfig,
) -> Path:
    """Write report.md, results.json and the PNG plots under ``config.output``; returns report.md."""
    from attnzoo import viz

    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    plt = viz._pyplot()

    # accuracy against cost
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, (("mflops", "MFLOPs per image"), ("latency_ms", "latency (ms)"))):
        for r in results:
            ax.errorbar(getattr(r, key), 100 * r.mean, yerr=100 * r.spread, fmt="o", capsize=3)
            ax.annotate(r.name, (getattr(r, key), 100 * r.mean), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"accuracy against cost: ResNet-{config.depth} on {data.name}")
    fig.tight_layout()
    viz._save(fig, out / "accuracy_vs_cost.png", 100)

    # training curves
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, config.epochs + 1)
    for r in results:
        axes[0].plot(epochs, [100 * statistics.fmean(c) for c in zip(*r.curves)], marker="o", label=r.name)
        axes[1].plot(epochs, [statistics.fmean(c) for c in zip(*r.losses)], marker="o", label=r.name)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_ylabel("training loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    viz._save(fig, out / "training_curves.png", 100)

    samples = list(data.test_x[: config.sample_images])
    rows = {
        r.name: (list(h) if (h := heatmaps.get(r.name)) is not None else [None] * len(samples))
        for r in results
    }
    viz.overlay_grid(samples, rows, out / "attention_maps.png")

    (out / "results.json").write_text(
        json.dumps({"config": asdict(config), "results": [asdict(r) for r in results]}, indent=2, default=str)
    )
    channel_only = [r.name for r in results if heatmaps.get(r.name) is None and r.name != "none"]
    text = [
        "# Which attention mechanism? A comparison on your machine",
        "",
        f"ResNet-{config.depth} (width {config.width}) trained on **{data.name}** "
        f"({len(data.train_y)} training and {len(data.test_y)} test images, {len(data.classes)} classes), "
        f"{config.epochs} epochs, seeds {list(config.seeds)}, AdamW lr {config.lr}, "
        f"batch {config.batch_size}. Latency: forward of a batch of {config.latency_batch} "
        f"({torch.get_num_threads()} threads), median of 7 after warm-up, the networks' repeats "
        "interleaved; peak memory: the forward pass's resident-set peak.",
        "",
        *(
            [f"Mechanism options: {options}. Each mechanism otherwise has its paper's defaults.", ""]
            if (options := _options_text(config))
            else []
        ),
        comparison_table(results, len(config.seeds)),
        "",
        f"A short training budget ({config.epochs} epochs) favours the plain network: gates start half "
        "closed (sigmoid(0) = 0.5 scales the residual branch) and need epochs to open. Rerun with "
        "`--epochs 20 --seeds 0,1,2` (or your own data with `--data`) before drawing conclusions.",
        "",
        "![accuracy against cost](accuracy_vs_cost.png)",
        "",
        "![training curves](training_curves.png)",
        "",
        "## Where each mechanism looks",
        "",
        "The same test images; each row overlays the mean of the spatial attention maps of every "
        "attention module in the network (seed "
        f"{config.seeds[0]}). "
        + (
            f"Channel-only mechanisms ({', '.join(channel_only)}) gate channels, not positions: "
            "their rows show the image alone."
            if channel_only
            else ""
        ),
        "",
        "![attention maps](attention_maps.png)",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(text))
    return report
