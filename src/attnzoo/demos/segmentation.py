"""`attnzoo compare --task segmentation`: which context module should my segmentation head have?

The segmentation papers (non-local, DNL, DANet, CCNet, APNB, PSA, APCNet, GloRe, SpyGR, DGMN, A2,
CGNL, GC) measure their modules by mIoU on a dilated ResNet with a segmentation head. This runs
that comparison on your machine: the same small network (:class:`attnzoo.models.SegmentationNet`,
a dilated ResNet-18 of output stride 8 with an FCN head) is trained with each mechanism placed as
its paper places it, on the same data with the same seeds, and the report gives mIoU and pixel
accuracy (every seed and the mean), parameters, FLOPs (the attention core included), latency
(median and spread of interleaved repeats), the memory a forward pass adds, the predicted masks
against the ground truth on a few test images, and where each head attends from a query pixel on
the same images.

The default data is generated here, deterministically, from scikit-learn's shipped digits
(:func:`digit_scenes`): several digits per image among fragments of other digits, every pixel
labelled background or the digit whose stroke covers it. ``data=FOLDER`` takes ``images/`` and
``masks/`` (PNG label maps with the same file stems) instead (:func:`load_segmentation_folder`).

The pieces of the classification compare are reused (:mod:`attnzoo.demos.compare`): the option
checks, the training loop, the cost and latency measurements, the worker processes
(:mod:`attnzoo.demos.parallel`) and torchrun data parallelism (:mod:`attnzoo.demos.distributed`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._progress import Progress
from attnzoo.demos.compare import (
    LATENCY_REPEATS,
    PEAK_MEMORY_NOTE,
    Dataset,
    MechanismResult,
    _check_options,
    _latency_change,
    check_names,
    measure_cost,
    measure_latency,
    module_views,
    prepare_output,
    train_model,
)
from attnzoo.demos.distributed import DistInfo, cleanup_distributed, init_distributed
from attnzoo.demos.maps import entries
from attnzoo.demos.parallel import ProgressSink, plan_workers, refuse_worker_bootstrap, run_jobs
from attnzoo.inspect import capture

__all__ = [
    "ALL_SEGMENTATION_MECHANISMS",
    "DEFAULT_SEGMENTATION_MECHANISMS",
    "DigitScenes",
    "QueryRow",
    "SegmentationConfig",
    "SegmentationResult",
    "check_config",
    "compare_from_args",
    "confusion_matrix",
    "digit_scenes",
    "load_segmentation_folder",
    "load_trained",
    "run_segmentation",
    "scores",
    "segmentation_table",
    "write_report",
]

#: ``--mechanisms all``: the plain FCN and every segmentation head of the catalog, and GC.
ALL_SEGMENTATION_MECHANISMS: tuple[str, ...] = (
    "none",
    "non_local",
    "dnl",
    "danet",
    "criss_cross",
    "asymmetric_non_local",
    "psa",
    "adaptive_context",
    "glore",
    "spygr",
    "dgmn",
    "double_attention",
    "cgnl",
    "gc",
)

#: What runs without ``--mechanisms``: the plain FCN and seven heads, what fits 15 minutes on two
#: cores (the full set, ``--mechanisms all``, trains about twice as long: PSA and DGMN alone cost
#: as much as five of these).
DEFAULT_SEGMENTATION_MECHANISMS: tuple[str, ...] = (
    "none",
    "non_local",
    "dnl",
    "danet",
    "criss_cross",
    "glore",
    "cgnl",
    "gc",
)

#: Mask value of pixels that count for nothing (the VOC convention in the PNGs; -100 in tensors,
#: what ``F.cross_entropy`` ignores).
IGNORE_PNG, IGNORE = 255, -100

#: A digit's stroke: its upscaled pixels at least this bright; its region: the stroke widened by
#: DILATION pixels (a square of side 2 * DILATION + 1 around every stroke pixel).
STROKE_THRESHOLD, DILATION = 0.5, 2


@dataclass
class SegmentationConfig:
    """Everything that decides a segmentation comparison; the same config gives the same report."""

    mechanisms: Sequence[str] = DEFAULT_SEGMENTATION_MECHANISMS
    epochs: int = 16
    seeds: Sequence[int] = (0, 1)
    image_size: int = 48
    depth: int = 18
    width: int = 8
    batch_size: int = 16
    lr: float = 1e-2
    weight_decay: float = 5e-4
    upsample: str = "bilinear"
    train_scenes: int = 800  # generated data: training and test scenes, digits per scene,
    test_scenes: int = 200  # clutter fragments per scene, digit upscaling (see digit_scenes)
    digits_per_image: int = 3
    clutter: int = 4
    digit_scale: int = 2
    data: str | None = None
    limit: int | None = None  # at most this many training images (smoke runs, tests)
    output: str = "reports/compare-segmentation"
    threads: int | None = None
    workers: int | None = None
    attention_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "cpu"
    latency_batch: int = 16
    sample_images: int = 4
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class DigitScenes:
    """Generated scenes: images (N, 1, S, S) in [0, 1], masks (N, S, S) with 0 for background and
    1 + d for digit d, and what was drawn: labels (N, k) and top-left positions (N, k, 2)."""

    images: Tensor
    masks: Tensor
    labels: Tensor
    positions: Tensor


def _window(p: int, tops: Tensor, lefts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Index tensors of one (p, p) window per image at (top, left): batch, rows, columns, each
    (N, p, p), for reading and writing ``canvas[batch, rows, cols]`` without a loop."""
    n = tops.shape[0]
    offsets = torch.arange(p)
    rows = (tops[:, None] + offsets)[:, :, None].expand(n, p, p)
    cols = (lefts[:, None] + offsets)[:, None, :].expand(n, p, p)
    batch = torch.arange(n)[:, None, None].expand(n, p, p)
    return batch, rows, cols


def _scenes(
    digits: Tensor,
    labels: Tensor,
    n: int,
    size: int,
    per_image: int,
    clutter: int,
    generator: torch.Generator,
) -> DigitScenes:
    """``n`` scenes from the (P, d, d) pool ``digits``: clutter fragments first, then the digits."""
    pool, d = digits.shape[0], digits.shape[-1]
    canvas = torch.zeros(n, size, size)
    masks = torch.zeros(n, size, size, dtype=torch.int64)
    frag = d // 2
    for _ in range(clutter):
        # a quarter of another digit: ink that looks like a digit's part but is background
        source = torch.randint(0, pool, (n,), generator=generator)
        top, left = (torch.randint(0, d - frag + 1, (n,), generator=generator) for _ in range(2))
        _, crop_rows, crop_cols = _window(frag, top, left)
        patch = digits[source[:, None, None], crop_rows, crop_cols]  # (N, frag, frag)
        at = _window(frag, *(torch.randint(0, size - frag + 1, (n,), generator=generator) for _ in range(2)))
        canvas[at] = torch.maximum(canvas[at], patch)
    drawn, places = [], []
    for _ in range(per_image):
        source = torch.randint(0, pool, (n,), generator=generator)
        position = torch.randint(0, size - d + 1, (n, 2), generator=generator)  # (N, 2): top, left
        patch = digits[source]  # (N, d, d)
        at = _window(d, position[:, 0], position[:, 1])
        canvas[at] = torch.maximum(canvas[at], patch)
        # the digit's region: its stroke widened by DILATION pixels (a stroke alone is 2-4 pixels
        # wide, thinner than a cell of the network's output grid); a later digit covers an
        # earlier one
        stroke = (patch >= STROKE_THRESHOLD).float()[:, None]  # (N, 1, d, d)
        region = F.max_pool2d(stroke, 2 * DILATION + 1, stride=1, padding=DILATION)[:, 0] > 0
        masks[at] = torch.where(region, labels[source, None, None] + 1, masks[at])
        drawn.append(labels[source])
        places.append(position)
    return DigitScenes(canvas[:, None], masks, torch.stack(drawn, dim=1), torch.stack(places, dim=1))


def digit_scenes(
    size: int = 48,
    *,
    train: int = 800,
    test: int = 200,
    per_image: int = 3,
    clutter: int = 4,
    scale: int = 2,
    seed: int = 0,
) -> tuple[DigitScenes, DigitScenes]:
    """The cluttered-digits segmentation task: (training scenes, test scenes).

    scikit-learn's 1797 handwritten 8 x 8 digits (shipped with it: nothing is downloaded) are split
    into a training and a test pool (3:1), upscaled ``scale`` x, and ``per_image`` of them are
    drawn at random positions on an ``size`` x ``size`` canvas over ``clutter`` fragments (a
    quarter-size crop) of other digits. A pixel is labelled ``1 + digit`` within :data:`DILATION`
    pixels of the stroke (the pixels at least :data:`STROKE_THRESHOLD` bright) of the last digit
    drawn over it, else background 0 (the fragments are background: telling a digit from a part
    of one takes context). Everything
    follows from ``seed``.
    """
    from attnzoo.demos.digits import _load_digits

    d = 8 * scale
    if size < d:
        raise ValueError(f"size: expected at least 8 * scale = {d}, got {size}")
    images, labels = _load_digits()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=generator)
    images, labels = images[order], labels[order]
    # (P, 8, 8) -> (P, d, d): bilinear upscaling keeps the strokes smooth
    big = F.interpolate(images[:, None], scale_factor=scale, mode="bilinear", align_corners=False)[
        :, 0
    ].clamp(0, 1)
    n_test = images.shape[0] // 4
    test_set = _scenes(big[:n_test], labels[:n_test], test, size, per_image, clutter, generator)
    train_set = _scenes(big[n_test:], labels[n_test:], train, size, per_image, clutter, generator)
    return train_set, test_set


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_LABEL_MODES = ("L", "P", "I", "I;16")


def load_segmentation_folder(
    path: str | Path, size: int, *, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """``FOLDER/images`` and ``FOLDER/masks`` as tensors of side ``size``, split by ``seed``.

    Every image has a mask with the same file stem: a PNG label map (one channel, mode L, P or I)
    whose pixel values are class indices 0..K-1, 255 for pixels to ignore; K is the largest index
    plus one. Images are resized bilinearly, masks by nearest neighbour.

    Raises:
        ValueError: a missing folder, an image without a mask or a mask without an image, a mask
            that is not a label map or not of its image's size, fewer than two classes or images.
    """
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data: {root} is not a directory")
    missing = [name for name in ("images", "masks") if not (root / name).is_dir()]
    if missing:
        raise ValueError(
            f"data: expected {root}/images and {root}/masks (PNG label maps, same file stems), "
            f"{' and '.join(missing)} missing"
        )

    def by_stem(folder: Path, suffixes: set[str]) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in suffixes:
                if file.stem in files:
                    raise ValueError(f"data: two files with the stem {file.stem!r} in {folder}")
                files[file.stem] = file
        return files

    images, masks = by_stem(root / "images", _IMAGE_SUFFIXES), by_stem(root / "masks", {".png"})
    for found, other, what in ((images, masks, "image"), (masks, images, "mask")):
        unmatched = sorted(set(found) - set(other))
        if unmatched:
            shown = ", ".join(unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
            partner = "mask" if what == "image" else "image"
            raise ValueError(
                f"data: {len(unmatched)} {what}(s) without a {partner} of the same stem: {shown}"
            )
    if len(images) < 2:
        raise ValueError(f"data: expected at least two images with masks under {root}, found {len(images)}")
    pictures, labels = [], []
    for stem in sorted(images):
        with Image.open(masks[stem]) as mask_file:
            if mask_file.mode not in _LABEL_MODES:
                raise ValueError(
                    f"data: mask {masks[stem].name} is not a label map (PNG mode {mask_file.mode}): "
                    "expected one channel of class indices (mode L, P or I)"
                )
            mask = mask_file.convert("I") if mask_file.mode != "I" else mask_file.copy()
        with Image.open(images[stem]) as image_file:
            if image_file.size != mask.size:
                raise ValueError(
                    f"data: mask {masks[stem].name} is {mask.size[0]}x{mask.size[1]}, its image "
                    f"{image_file.size[0]}x{image_file.size[1]}"
                )
            rgb = image_file.convert("RGB").resize((size, size), Image.BILINEAR)
        mask = mask.resize((size, size), Image.NEAREST)
        # (H, W, 3) bytes -> (3, H, W) in [0, 1]; the mask's 32-bit indices -> (H, W)
        pictures.append(
            torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            .view(size, size, 3)
            .permute(2, 0, 1)
            .float()
            / 255
        )
        labels.append(torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.int32).view(size, size).long())
    x, y = torch.stack(pictures), torch.stack(labels)
    if bool(((y < 0) | (y > IGNORE_PNG)).any()):
        raise ValueError(
            "data: mask values must be class indices 0..254 (255: ignore), "
            f"found {int(y.min())}..{int(y.max())}"
        )
    y = torch.where(y == IGNORE_PNG, IGNORE, y)
    num_classes = int(y.max()) + 1
    if num_classes < 2:
        raise ValueError(
            f"data: the masks hold {'only class 0' if num_classes == 1 else 'no class'}: "
            "expected at least two classes"
        )
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = max(1, round(test_fraction * len(y)))
    return Dataset(
        x[n_test:], y[n_test:], x[:n_test], y[:n_test], [str(i) for i in range(num_classes)], root.name
    )


def load_dataset(config: SegmentationConfig) -> Dataset:
    """The configured data, normalised per channel with the training set's statistics."""
    if config.data:
        data = load_segmentation_folder(config.data, config.image_size)
    else:
        train, test = digit_scenes(
            config.image_size,
            train=config.train_scenes,
            test=config.test_scenes,
            per_image=config.digits_per_image,
            clutter=config.clutter,
            scale=config.digit_scale,
        )
        data = Dataset(
            train.images,
            train.masks,
            test.images,
            test.masks,
            ["background", *(str(i) for i in range(10))],
            f"cluttered digit scenes {config.image_size}x{config.image_size}",
        )
    if config.limit is not None:
        data.train_x, data.train_y = data.train_x[: config.limit], data.train_y[: config.limit]
    mean = data.train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = data.train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    data.train_x = (data.train_x - mean) / std
    data.test_x = (data.test_x - mean) / std
    data.mean, data.std = mean, std
    return data


# ---------------------------------------------------------------------------------------------
# scores


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(K, K) counts: row = true class, column = predicted class; ignored pixels left out."""
    valid = target != IGNORE
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def scores(confusion: Tensor) -> tuple[float, float]:
    """(mIoU, pixel accuracy) of a confusion matrix. The IoU of a class is TP / (TP + FP + FN);
    the mean is over the classes present in the ground truth or the predictions (a class absent
    from both has no IoU), as mmsegmentation and the VOC/Cityscapes tools average."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    present = union > 0
    miou = float((true_positive[present] / union[present]).mean()) if bool(present.any()) else 0.0
    total = float(confusion.sum())
    return miou, (float(true_positive.sum()) / total if total else 0.0)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, num_classes: int, batch_size: int = 64
) -> tuple[float, float]:
    """(mIoU, pixel accuracy) of ``model`` on images ``x`` and masks ``y``."""
    model.eval()
    total = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=y.device)
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        total += confusion_matrix(logits.argmax(dim=1), y[start : start + batch_size], num_classes)
    return scores(total)


def miou(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """mIoU on (x, y), the classes read from the model: the score of the training curves."""
    return evaluate(model, x, y, model.num_classes)[0]


# ---------------------------------------------------------------------------------------------
# configuration


def build_model(name: str, config: SegmentationConfig, data: Dataset) -> nn.Module:
    from attnzoo.models.segmentation import SegmentationNet

    return SegmentationNet(
        len(data.classes),
        data.in_chans,
        attention=None if name == "none" else name,
        depth=config.depth,
        width=config.width,
        upsample=config.upsample,  # type: ignore[arg-type]
        # no dropout: its random masks differ between torchrun's ranks and one process, and the
        # data-parallel run is to give the single-process result
        dropout=0.0,
        **({} if name == "none" else config.attention_kwargs.get(name, {})),
    )


def _placement(name: str) -> str:
    from attnzoo.models.segmentation import segmentation_placement

    return "-" if name == "none" else segmentation_placement(name)


def check_config(config: SegmentationConfig, data: Dataset | None = None) -> None:
    """Reject a configuration that could not train, before any training.

    Checks the mechanism list (known names, each one a segmentation network can hold, none twice),
    every constructor option, the upsampling, depth, width, image size, device and seeds; with
    ``data``, builds every network and runs two images through it.

    Raises:
        ValueError: what is wrong, naming the valid choices.
    """
    import attnzoo
    from attnzoo.models.resnet import IMAGENET_DEPTHS

    names = check_names(config.mechanisms, example="none,non_local,danet")
    for name in names:
        if name == "none":
            continue
        try:
            attnzoo.get_spec(name)
            _placement(name)
        except KeyError as error:
            raise ValueError(str(error.args[0])) from None
        except ValueError as error:
            raise ValueError(
                f"mechanisms: {error} (the set: {', '.join(ALL_SEGMENTATION_MECHANISMS)})"
            ) from None
    for name, options in config.attention_kwargs.items():
        if name in names and options:
            _check_options(name, options)
    if config.upsample not in ("bilinear", "carafe"):
        raise ValueError(f"upsample: expected 'bilinear' or 'carafe', got {config.upsample!r}")
    if config.depth not in IMAGENET_DEPTHS:
        raise ValueError(
            f"depth: expected one of {sorted(IMAGENET_DEPTHS)} (a dilated ImageNet ResNet), "
            f"got {config.depth}"
        )
    if config.image_size % 8 or config.image_size < 16:
        raise ValueError(
            f"image_size: expected a multiple of the output stride 8, at least 16, got {config.image_size}"
        )
    if config.width < 1:
        raise ValueError(f"width: expected a positive width, got {config.width}")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {config.device!r}, but CUDA is not available here")
    if not list(config.seeds):
        raise ValueError("seeds: expected at least one seed")
    if data is None:
        return
    images = data.train_x[:2]
    for name in names:
        try:
            model = build_model(name, config, data).eval()
            with torch.no_grad():
                model(images)
        except (ValueError, TypeError, RuntimeError, KeyError) as error:
            reason = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
            options = config.attention_kwargs.get(name) if name != "none" else None
            raise ValueError(
                f"{name}{f' with {options}' if options else ''} cannot be built into the segmentation "
                f"network: {reason.splitlines()[0] if reason else type(error).__name__}"
            ) from None


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class SegmentationResult(MechanismResult):
    """One mechanism's outcome over all seeds; ``accuracies`` holds each seed's mIoU (the score
    the table ranks by, ``mean``/``spread`` are over it) and ``curves`` the mIoU per epoch."""

    pixel_accuracies: list[float] = field(default_factory=list)
    placement: str = "-"


@dataclass
class _Run:
    curve: list[float]
    losses: list[float]
    pixel_accuracy: float
    state: dict[str, Tensor] | None  # the trained weights, kept for the first seed only


def _train_run(
    name: str, seed: int, shared: tuple[SegmentationConfig, Dataset, DistInfo], progress: ProgressSink
) -> _Run:
    """Build and train one network; a module-level function so that worker processes can run it."""
    config, data, info = shared
    torch.manual_seed(seed)
    model = build_model(name, config, data)
    model, curve, losses = train_model(
        model,
        data,
        config,
        seed,
        info,
        progress,
        label=f"{name} ",
        score=miou,
        metric="mIoU",  # type: ignore[arg-type]
    )
    _, pixel_accuracy = evaluate(
        model, data.test_x.to(info.device), data.test_y.to(info.device), len(data.classes)
    )
    keep = seed == config.seeds[0]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if keep else None
    return _Run(curve, losses, pixel_accuracy, state)


def run_segmentation(
    config: SegmentationConfig,
) -> tuple[list[SegmentationResult], Dataset, dict[str, QueryRow | None]]:
    """Train and measure every mechanism; returns the results (the first seed's networks in
    ``result.model``), the data and where each network attends on the sample images.

    The runs (mechanism x seed) train side by side in worker processes on the CPU, or
    data-parallel under torchrun, as in :func:`attnzoo.demos.compare.run_compare`; costs, latency
    and maps are measured here afterwards. Scripts need an ``if __name__ == "__main__":`` guard.
    """
    refuse_worker_bootstrap()
    check_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    info = init_distributed(config.device)
    try:
        data = load_dataset(config)
        check_config(config, data)
        jobs = [(name, seed) for name in config.mechanisms for seed in config.seeds]
        parallel = not info.distributed and info.device.type == "cpu"
        workers, threads = plan_workers(len(jobs), torch.get_num_threads(), config.workers if parallel else 1)
        progress = Progress(len(jobs) * config.epochs, enabled=config.progress and info.is_main)
        try:
            runs = run_jobs(
                _train_run,
                jobs,
                shared=(config, data, info),
                workers=workers,
                threads=threads,
                progress=progress,
            )
        finally:
            progress.close()
        samples = data.test_x[: config.sample_images]
        queries = query_pixels(data.test_y[: config.sample_images])
        results, maps, trained = [], {}, {}
        for name in config.mechanisms:
            result = SegmentationResult(name, placement=_placement(name))
            for seed in config.seeds:
                run = runs[jobs.index((name, seed))]
                result.accuracies.append(run.curve[-1])
                result.pixel_accuracies.append(run.pixel_accuracy)
                result.curves.append(run.curve)
                result.losses.append(run.losses)
                if run.state is not None:
                    torch.manual_seed(seed)
                    model = build_model(name, config, data)
                    model.load_state_dict(run.state)
                    trained[name] = result.model = model
                    result.params, result.mflops, result.train_mflops, result.peak_mib = measure_cost(
                        model,
                        data,
                        config,  # type: ignore[arg-type]
                    )
                    maps[name] = query_row(model, samples, queries)
            results.append(result)
        latencies = measure_latency(trained, data, config)  # type: ignore[arg-type]
        for result in results:
            result.latency_ms = latencies[result.name].ms
            result.latency_samples_ms = [t * 1e3 for t in latencies[result.name].samples]
        return results, data, maps
    finally:
        cleanup_distributed(info)


# ---------------------------------------------------------------------------------------------
# where a head attends


def query_pixels(masks: Tensor) -> list[tuple[int, int]]:
    """One query pixel (row, column) per mask: inside its largest class other than 0 (the
    background of the digit scenes), the pixel nearest that class's centroid; the image centre
    when there is none."""
    queries = []
    for mask in masks:
        classes, counts = torch.unique(mask[(mask != 0) & (mask != IGNORE)], return_counts=True)
        if len(classes) == 0:
            queries.append((mask.shape[0] // 2, mask.shape[1] // 2))
            continue
        where = (mask == classes[counts.argmax()]).nonzero().float()  # (P, 2)
        nearest = (where - where.mean(dim=0)).square().sum(dim=1).argmin()
        queries.append((int(where[nearest, 0]), int(where[nearest, 1])))
    return queries


@dataclass
class QueryRow:
    """What one network's row of ``attention.png`` shows: ``values`` (B, S, S) over the image,
    ``what`` says what they are ("query": the attention of the query pixel, 1 = uniform; else a
    map that does not depend on the query, named), ``module`` which module drew them."""

    values: Tensor
    what: str
    module: str
    query_specific: bool


def _query_values(
    kind: str | None, maps: Tensor, query: list[tuple[int, int]], h: int, w: int
) -> Tensor | None:
    """(B, h', w') weights of each image's query position from one map tensor, scaled so that
    1 is uniform attention; None when the map has no per-query layout over positions."""
    batch = torch.arange(maps.shape[0])
    rows = torch.tensor([q[0] for q in query])
    cols = torch.tensor([q[1] for q in query])
    if kind == "pairwise" and maps.dim() in (3, 4) and maps.shape[-1] == h * w and maps.shape[-2] == h * w:
        if maps.dim() == 4:
            maps = maps.mean(dim=1)  # (B, heads, N, N) -> (B, N, N)
        weights = maps[batch, rows * w + cols]  # (B, N): the query's row
        return (weights * h * w).view(-1, h, w)  # (B, N) -> (B, h, w)
    if kind == "criss_cross" and maps.dim() == 4 and maps.shape[1:3] == (h, w):
        weights = maps[batch, rows, cols]  # (B, H + W): the column's keys, then the row's
        grid = torch.zeros(maps.shape[0], h, w)
        grid[batch[:, None], torch.arange(h)[None, :], cols[:, None]] = weights[:, :h]
        grid[batch[:, None], rows[:, None], torch.arange(w)[None, :]] += weights[:, h:]
        return grid * (h + w - 1)
    if kind == "spatial" and maps.dim() == 4 and maps.shape[-2:] == (h, w):
        regions = maps.shape[1]
        side = math.isqrt(regions)
        if side > 1 and side * side == regions:
            # APCNet's affinities of each pixel to the s x s pooled regions: the query's s x s grid
            return maps[batch, :, rows, cols].view(-1, side, side)  # (B, s*s) -> (B, s, s)
    return None


def query_row(model: nn.Module, images: Tensor, queries: list[tuple[int, int]]) -> QueryRow | None:
    """Where ``model``'s head attends from each image's query pixel, on the images' grid.

    Read from the head module's captured maps (by its spec's ``map_kind``; the entry of the
    highest resolution when it gives several): a pairwise map's query row, a criss-cross map's
    row and column, APCNet's region affinities. A network whose maps do not depend on the query
    (GC's pooling weights, the backbone's gates) gets its mean map from
    :func:`attnzoo.demos.compare.module_views`, labelled as such; None without maps.
    """
    import attnzoo

    size = images.shape[-2:]
    head = getattr(model, "context", None)
    if head is not None and attnzoo.get_spec(head.registry_name).returns_attn:
        grid: dict[str, tuple[int, int]] = {}
        handle = head.register_forward_pre_hook(
            lambda module, args: grid.update(hw=tuple(args[0].shape[-2:]))
        )
        try:
            with capture(model) as captured, torch.no_grad():
                model.eval()(images)
        finally:
            handle.remove()
        h, w = grid["hw"]
        feature_query = [(r * h // size[0], c * w // size[1]) for r, c in queries]
        spec = attnzoo.get_spec(head.registry_name)
        found = []
        for entry in entries(spec, captured["context"], h, w):
            values = _query_values(entry.kind, entry.maps, feature_query, h, w)
            if values is not None:
                found.append((values.shape[-1] * values.shape[-2], entry.key, values))
        if found:
            _, key, values = max(found, key=lambda item: item[0])
            # (B, h', w') -> (B, S, S): nearest, so that each cell of the grid stays visible
            upsampled = F.interpolate(values[:, None], size=size, mode="nearest")[:, 0]
            return QueryRow(upsampled, "query", f"head{f' ({key})' if key else ''}", True)
    views = [v for v in module_views(model, images) if v.kind == "spatial"]
    if not views:
        return None
    view = views[-1]  # the module nearest the classifier
    upsampled = F.interpolate(view.values[:, None], size=size, mode="nearest")[:, 0]
    return QueryRow(upsampled, view.label, view.name, False)


# ---------------------------------------------------------------------------------------------
# report


def segmentation_table(results: Sequence[SegmentationResult], seeds: int) -> str:
    """The report's table: one row per mechanism, changes against the plain FCN ``none``."""
    base = next((r for r in results if r.name == "none"), None)
    plural = "s" if seeds > 1 else ""
    rows = [
        f"| mechanism | placed in | mIoU % (mean of {seeds} seed{plural}) | per seed | Δ mIoU "
        f"| pixel acc % (mean) | per seed | params | Δ params | MFLOPs fwd | MFLOPs fwd+bwd "
        "| latency ms [IQR] | Δ latency [range] | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if base is not None and r is not base:
            d_miou = f"{100 * (r.mean - base.mean):+.2f} pt"
            d_params = f"{r.params - base.params:+,}"
            d_lat = _latency_change(r, base)
        else:
            d_miou = d_params = d_lat = "-"
        q1, q3 = r.latency.quartiles if r.latency_samples_ms else (r.latency_ms / 1e3,) * 2
        rows.append(
            f"| {r.name} | {r.placement} | {100 * r.mean:.2f} "
            f"| {' / '.join(f'{100 * a:.2f}' for a in r.accuracies)} "
            f"| {d_miou} | {100 * statistics.fmean(r.pixel_accuracies):.2f} "
            f"| {' / '.join(f'{100 * a:.2f}' for a in r.pixel_accuracies)} | {r.params:,} | {d_params} "
            f"| {r.mflops:.1f} | {r.train_mflops:.1f} | {r.latency_ms:.2f} [{q1 * 1e3:.2f}-{q3 * 1e3:.2f}] "
            f"| {d_lat} | {r.peak_mib:.1f} |"
        )
    return "\n".join(rows)


def _class_colours(num_classes: int) -> Any:
    """A colour map of ``num_classes`` distinct colours, class 0 black (the background)."""
    import matplotlib.colors

    plt_colours = ["#000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4",
                   "#46f0f0", "#f032e6", "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324",
                   "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1", "#000075"]  # fmt: skip
    colours = [plt_colours[i % len(plt_colours)] for i in range(num_classes)]
    return matplotlib.colors.ListedColormap(colours)


def _draw_masks(
    results: Sequence[SegmentationResult], data: Dataset, config: SegmentationConfig, path: Path
) -> Path:
    """Input, ground truth, then each trained network's predicted mask, for the sample images."""
    from attnzoo import viz

    plt = viz.pyplot()
    samples = data.test_x[: config.sample_images]
    truth = data.test_y[: config.sample_images]
    k = len(data.classes)
    cmap = _class_colours(k)
    rows: list[tuple[str, Tensor, list[str]]] = [("ground truth", truth, [""] * len(truth))]
    for r in results:
        if r.model is None:
            continue
        with torch.no_grad():
            predicted = r.model.eval()(samples).argmax(dim=1)
        titles = [f"mIoU {100 * scores(confusion_matrix(p, t, k))[0]:.0f}%" for p, t in zip(predicted, truth)]
        rows.append((r.name, predicted, titles))
    n_cols = len(samples)
    fig, axes = plt.subplots(
        len(rows) + 1, n_cols, figsize=(1.9 * n_cols + 1.6, 1.75 * (len(rows) + 1) + 0.8), squeeze=False
    )
    for c in range(n_cols):
        axes[0, c].imshow(viz._image_array(samples[c]), cmap="gray")
        axes[0, c].set_title(f"test image {c}", fontsize=8)
    for r_index, (label, masks, titles) in enumerate(rows, start=1):
        for c in range(n_cols):
            shown = masks[c].masked_fill(masks[c] == IGNORE, 0)
            axes[r_index, c].imshow(shown, cmap=cmap, vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
            if titles[c]:
                axes[r_index, c].set_title(titles[c], fontsize=7)
        axes[r_index, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    axes[0, 0].set_ylabel("input", rotation=0, ha="right", va="center", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(k)]
    fig.legend(handles, data.classes, loc="lower center", ncol=min(k, 11), fontsize=8, frameon=False)
    fig.suptitle(
        f"predicted masks (seed {config.seeds[0]}) against the ground truth; titles: the image's mIoU",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.98))
    return viz.save_figure(fig, path)


def _draw_attention(rows: dict[str, QueryRow], data: Dataset, config: SegmentationConfig, path: Path) -> Path:
    """Each network's query map over the sample images, the query pixel marked."""
    from attnzoo import viz

    plt = viz.pyplot()
    samples = data.test_x[: config.sample_images]
    queries = query_pixels(data.test_y[: config.sample_images])
    n_cols = len(samples)
    fig, axes = plt.subplots(
        len(rows) + 1,
        n_cols + 1,
        figsize=(1.9 * n_cols + 2.6, 1.75 * (len(rows) + 1) + 0.5),
        squeeze=False,
        gridspec_kw={"width_ratios": [1] * n_cols + [0.08]},  # the last column: colour bars
    )
    for c in range(n_cols):
        axes[0, c].imshow(viz._image_array(samples[c]), cmap="gray")
        axes[0, c].plot(queries[c][1], queries[c][0], "x", color="red", markersize=8, mew=2)
        axes[0, c].set_title(f"test image {c}", fontsize=8)
    axes[0, 0].set_ylabel("input,\nquery ×", rotation=0, ha="right", va="center", fontsize=9)
    axes[0, -1].axis("off")
    for r_index, (name, row) in enumerate(rows.items(), start=1):
        vmax = max(float(row.values.max()), 1.0) if row.query_specific else float(row.values.max())
        vmin = 0.0 if row.query_specific else float(row.values.min())
        for c in range(n_cols):
            ax = axes[r_index, c]
            ax.imshow(viz._image_array(samples[c]), cmap="gray")
            shown = ax.imshow(
                row.values[c],
                cmap="inferno",
                alpha=0.6,
                vmin=vmin,
                vmax=max(vmax, vmin + 1e-6),
                interpolation="nearest",
            )
            ax.plot(queries[c][1], queries[c][0], "x", color="cyan", markersize=7, mew=2)
        what = "query's attention\n(1 = uniform)" if row.query_specific else f"{row.what}\n(not per query)"
        axes[r_index, 0].set_ylabel(f"{name}\n{row.module}", rotation=0, ha="right", va="center", fontsize=8)
        fig.colorbar(shown, cax=axes[r_index, -1]).set_label(what, fontsize=7)
    for ax in axes[:, :n_cols].ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"where each head attends from the query pixel × (seed {config.seeds[0]})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return viz.save_figure(fig, path)


CHECKPOINT_FORMAT = "attnzoo.compare-segmentation/1"


def _save_trained(result: SegmentationResult, data: Dataset, config: SegmentationConfig, path: Path) -> Path:
    """A trained network with what rebuilds it: plain tensors, strings and numbers only, so that
    ``torch.load(path, weights_only=True)`` reads it."""
    assert result.model is not None
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "mechanism": result.name,
            "seed": int(config.seeds[0]),
            "depth": config.depth,
            "width": config.width,
            "upsample": config.upsample,
            "image_size": config.image_size,
            "in_chans": data.in_chans,
            "classes": list(data.classes),
            "data": data.name,
            "attention_kwargs": dict(
                config.attention_kwargs.get(result.name, {}) if result.name != "none" else {}
            ),
            "mean": data.mean,
            "std": data.std,
            "samples": data.test_x[: config.sample_images].clone(),
            "sample_masks": data.test_y[: config.sample_images].clone(),
            "miou": result.accuracies[0],
            "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        },
        path,
    )
    return path


def load_trained(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A network saved by ``compare --task segmentation`` (``REPORT_DIR/models/NAME.pt``), rebuilt
    with its weights, in eval mode, and the checkpoint.

    Raises:
        ValueError: the file is not such a checkpoint.
    """
    from attnzoo.models.segmentation import SegmentationNet

    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"{path}: not a network saved by attnzoo compare --task segmentation ({error})"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a network saved by attnzoo compare --task segmentation")
    name = checkpoint["mechanism"]
    model = SegmentationNet(
        len(checkpoint["classes"]),
        checkpoint["in_chans"],
        attention=None if name == "none" else name,
        depth=checkpoint["depth"],
        width=checkpoint["width"],
        upsample=checkpoint["upsample"],
        **checkpoint["attention_kwargs"],
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


def write_report(
    results: Sequence[SegmentationResult],
    data: Dataset,
    maps: dict[str, QueryRow | None],
    config: SegmentationConfig,
) -> Path:
    """Write report.md, results.json, masks.png, attention.png, training_curves.png and the trained
    networks (``models/NAME.pt``) under ``config.output``; returns report.md."""
    from attnzoo import viz

    out = prepare_output(config.output)
    plt = viz.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, config.epochs + 1)
    for r in results:
        axes[0].plot(epochs, [100 * statistics.fmean(c) for c in zip(*r.curves)], marker="o", label=r.name)
        axes[1].plot(epochs, [statistics.fmean(c) for c in zip(*r.losses)], marker="o", label=r.name)
    axes[0].set_ylabel(f"test mIoU (%), mean of {len(config.seeds)} seeds")
    axes[1].set_ylabel("training loss (per-pixel cross-entropy)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    viz.save_figure(fig, out / "training_curves.png")
    _draw_masks(results, data, config, out / "masks.png")
    rows = {name: row for name, row in maps.items() if row is not None}
    if rows:
        _draw_attention(rows, data, config, out / "attention.png")
    (out / "models").mkdir(exist_ok=True)
    for r in results:
        if r.model is not None:
            _save_trained(r, data, config, out / "models" / f"{r.name}.pt")
    (out / "results.json").write_text(
        json.dumps(
            {"config": asdict(config), "results": [r.to_json() for r in results]}, indent=2, default=str
        )
    )
    # the score of a network that predicts the most frequent class everywhere: what "learned
    # nothing" reads as in the table
    labels = data.test_y[data.test_y != IGNORE]
    majority = int(torch.bincount(labels, minlength=len(data.classes)).argmax())
    floor = scores(confusion_matrix(torch.full_like(labels, majority), labels, len(data.classes)))
    per_query = [n for n, row in rows.items() if row.query_specific]
    global_maps = [n for n, row in rows.items() if not row.query_specific]
    without = [r.name for r in results if r.name not in rows]
    options = ", ".join(
        f"{name}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"
        for name, opts in config.attention_kwargs.items()
        if name in config.mechanisms and opts
    )
    text = [
        "# Which context module? A segmentation comparison on your machine",
        "",
        f"Dilated ResNet-{config.depth} (width {config.width}, output stride 8) with an FCN head "
        f"({config.upsample} upsampling), trained on **{data.name}** ({len(data.train_y)} training "
        f"and {len(data.test_y)} test images, {len(data.classes)} classes per pixel), {config.epochs} "
        f"epochs, {len(config.seeds)} seed{'s' if len(config.seeds) > 1 else ''} {list(config.seeds)}, "
        f"AdamW lr {config.lr}, batch {config.batch_size}. Each mechanism has its paper's defaults"
        + (f", except: {options}." if options else "."),
        "",
        segmentation_table(results, len(config.seeds)),
        "",
        f"- Chance: predicting the most frequent class ({data.classes[majority]}) everywhere scores "
        f"mIoU {100 * floor[0]:.2f} % and pixel accuracy {100 * floor[1]:.2f} % on this test set.",
        "- mIoU: the intersection over union of every class (background included) on the whole test "
        "set, averaged over the classes present; the mean over seeds and every seed's value. With "
        "this few seeds, read a difference smaller than the spread between seeds as no difference.",
        "- placed in: `head` between the FCN head's two convolutions, on the last stage's features "
        "(the segmentation heads); `backbone` in the ResNet's blocks (gating modules).",
        "- MFLOPs: per image, matmuls, convolutions and the attention kernels (a multiply-add is 2); "
        "fwd+bwd is one training step.",
        f"- Latency: forward of a batch of {config.latency_batch} ({torch.get_num_threads()} threads), "
        f"median of {LATENCY_REPEATS} interleaved repeats after warm-up [interquartile range]; Δ latency "
        "is the median of the per-round ratios to the plain FCN [their range], *(noise)* where the "
        "range includes no change.",
        f"- {PEAK_MEMORY_NOTE[0].upper()}{PEAK_MEMORY_NOTE[1:]}.",
        "",
        f"A short budget ({config.epochs} epochs on small images) ranks what learns fast; rerun with "
        "more `--epochs` and `--seeds`, or on your own data (`--data`), before drawing conclusions.",
        "",
        "![training curves](training_curves.png)",
        "",
        "## Predicted masks",
        "",
        "The first test images (columns): the input, the ground truth, then each trained network's "
        f"prediction (seed {config.seeds[0]}), titled with the image's own mIoU.",
        "",
        "![predicted masks](masks.png)",
        "",
        "## Where each head attends",
        "",
        "The same images; the query pixel (×) is the centre of the largest labelled region. "
        + (
            f"Rows {', '.join(per_query)}: the attention of the query pixel over the head's grid "
            "(1/8 of the image's side, each cell drawn as a block), scaled so that 1 is uniform "
            "attention (criss-cross: its row and column; APCNet: its affinity to the pooled regions "
            "of the finest scale). "
            if per_query
            else ""
        )
        + (
            f"Rows {', '.join(global_maps)}: these maps do not depend on the query (pooling weights, "
            "gates, received attention), drawn for what they are, as the colour bar says. "
            if global_maps
            else ""
        )
        + (
            f"No row for {', '.join(without)} (no map over positions that this picture can draw)."
            if without
            else ""
        ),
        "",
        "![where each head attends](attention.png)" if rows else "",
        "",
        "The trained networks are in `models/` (`attnzoo.demos.segmentation.load_trained(path)`).",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(text))
    return report


# ---------------------------------------------------------------------------------------------
# command line


def config_from_args(args: argparse.Namespace) -> SegmentationConfig:
    """The configuration of ``attnzoo compare --task segmentation`` (options left None get the
    segmentation defaults)."""
    defaults = SegmentationConfig()
    mechanisms = args.mechanisms or list(DEFAULT_SEGMENTATION_MECHANISMS)
    if mechanisms == ["all"]:
        mechanisms = list(ALL_SEGMENTATION_MECHANISMS)
    config = SegmentationConfig(
        mechanisms=mechanisms,
        epochs=args.epochs or defaults.epochs,
        seeds=args.seeds,
        image_size=args.image_size or defaults.image_size,
        depth=defaults.depth if args.depth is None else args.depth,
        width=args.width or defaults.width,
        batch_size=args.batch_size or defaults.batch_size,
        lr=defaults.lr if args.lr is None else args.lr,
        upsample=getattr(args, "upsample", None) or defaults.upsample,
        data=args.data,
        limit=args.limit,
        output=args.output or defaults.output,
        threads=args.threads,
        workers=args.workers,
        device=args.device,
        progress=not args.quiet,
    )
    for name, options in args.set:
        if name not in config.mechanisms:
            import attnzoo

            try:
                attnzoo.get_spec(name)
            except KeyError as error:
                raise ValueError(f"--set {name}: {error.args[0]}") from None
            raise ValueError(
                f"--set {name}: {name!r} is not among the compared mechanisms "
                f"({', '.join(config.mechanisms)})"
            )
        config.attention_kwargs.setdefault(name, {}).update(options)
    return config


def compare_from_args(args: argparse.Namespace) -> int:
    """``attnzoo compare --task segmentation``: check everything (the data folder included), train,
    report; returns the exit status. User errors raise ValueError with one line."""
    import os

    config = config_from_args(args)
    check_config(config)
    prepare_output(config.output)
    results, data, maps = run_segmentation(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    report = write_report(results, data, maps, config)
    print(segmentation_table(results, len(config.seeds)))
    print(f"\nreport: {report}")
    return 0
