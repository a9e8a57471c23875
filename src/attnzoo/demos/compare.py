"""`attnzoo compare`: which attention mechanism should I put in my network?

The same small ResNet is trained with each chosen mechanism on the same data, with the same seeds,
and the results are reported as in the papers' tables: accuracy (the mean and every seed's result),
parameters, FLOPs (forward, and forward + backward), latency (median and spread of interleaved
repeats, with the change against the plain network marked when it lies inside the noise), the
memory a forward pass adds, plus plots (accuracy against cost, training curves) and what each
mechanism computes on the same test images. The trained networks are kept (``models/NAME.pt``,
loadable with ``torch.load(..., weights_only=True)``) for ``attnzoo show NAME --from REPORT_DIR``.

Every option is checked before any training starts (:func:`check_config`): mechanism names, that
each is a block for a CNN, constructor options and their types, the network's depth, the device.

The default data is the embedded cluttered-digits task (:mod:`attnzoo.demos.digits`); ``data=PATH``
takes an image folder with one sub-folder per class. Under ``torchrun`` training is data-parallel
(:mod:`attnzoo.demos.distributed`) with the single-process result.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import statistics
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._progress import Progress
from attnzoo.bench.measure import Timing, compare_calls, count_flops, paired_ratio, peak_memory
from attnzoo.demos import DEFAULT_MECHANISMS
from attnzoo.demos.distributed import (
    DistInfo,
    cleanup_distributed,
    init_distributed,
    one_cycle,
    prepare_model,
    train_epoch,
)
from attnzoo.demos.maps import entries, is_distribution, received_attention, square_grid, value_scale
from attnzoo.demos.parallel import ProgressSink, plan_workers, refuse_worker_bootstrap, run_jobs
from attnzoo.inspect import attention_modules, capture
from attnzoo.registry import ModuleSpec

__all__ = [
    "DEFAULT_MECHANISMS",
    "CompareConfig",
    "MapRow",
    "MechanismResult",
    "check_config",
    "check_names",
    "cnn_mechanisms",
    "comparison_table",
    "load_images",
    "load_trained",
    "prepare_output",
    "run_compare",
    "write_report",
]

#: What "peak MiB" measures, in the report and the docs.
PEAK_MEMORY_NOTE = (
    "peak MiB is the memory a forward pass of the batch adds over the idle process (the "
    "resident-set high-water mark during the call minus the resident set before it; on CUDA the "
    "allocator's peak), activations and output included, weights not"
)


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
    mean: Tensor | None = None  # the per-channel normalisation applied to both splits
    std: Tensor | None = None

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
    mflops: float = 0.0  # forward, per image, the fused attention kernel included
    train_mflops: float = 0.0  # forward + backward of one training step, per image
    latency_ms: float = 0.0  # median of the interleaved repeats
    latency_samples_ms: list[float] = field(default_factory=list)  # every repeat, in order
    peak_mib: float = 0.0
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # trained, first seed

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    @property
    def latency(self) -> Timing:
        return Timing.of([t / 1e3 for t in self.latency_samples_ms])

    def to_json(self) -> dict[str, Any]:
        """Every field but the model."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}


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
    data.mean, data.std = mean, std
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


def cnn_mechanisms() -> list[str]:
    """The registered mechanisms that ``compare`` can put in its ResNet: one (B, C, H, W) input.

    Read from each spec's ``placement`` (image mechanisms declare where they go); a spec that does
    not declare it yet counts when it takes one image-shaped input.
    """
    import attnzoo

    return [name for name in attnzoo.list_modules() if _fits_a_cnn(attnzoo.get_spec(name))]


def _fits_a_cnn(spec: ModuleSpec) -> bool:
    placement = getattr(spec, "placement", None)
    if placement is not None:
        return placement in ("residual", "stage", "conv")
    return spec.channel_dim == 1 and spec.batch_dim == 0 and spec.num_inputs == 1


#: Constructor arguments that the network sets itself, never a --set option.
_SET_BY_THE_NETWORK = {"self", "device", "dtype", "stride", "out_channels", "in_channels", "channels"}


def _option_names(cls: type) -> tuple[list[str], bool]:
    """The constructor options a user may set (all but the width and the factory kwargs), and
    whether the constructor takes arbitrary ``**kwargs``."""
    params = list(inspect.signature(cls).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    width = positional[0].name if positional else None  # the first positional argument is the width
    names = [
        p.name
        for p in params
        if p.name not in _SET_BY_THE_NETWORK
        and p.name != width
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` (a Python literal from the command line) fits the type ``hint``; None when
    the hint cannot be judged here (the trial build decides)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_matches(value, arg) for arg in typing.get_args(hint)]
        return True if True in verdicts else (None if None in verdicts else False)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        return isinstance(value, (tuple, list))
    return None


def _hint_text(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
    return text or str(hint).replace("typing.", "")


def _check_options(name: str, options: dict[str, Any]) -> None:
    import attnzoo

    cls = attnzoo.get_spec(name).cls
    allowed, takes_any = _option_names(cls)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve here: judge by the defaults alone
        hints = {}
    params = inspect.signature(cls).parameters
    for key, value in options.items():
        if key not in allowed:
            if takes_any and key not in _SET_BY_THE_NETWORK:
                continue
            why = "is set by the network" if key in params else "is not an option"
            raise ValueError(
                f"--set {name}.{key}: {key!r} {why} of {name} ({cls.__name__}); "
                f"options: {', '.join(allowed) or 'none'}"
            )
        hint = hints.get(key, inspect.Parameter.empty)
        verdict = _matches(value, hint)
        default = params[key].default
        if verdict is None and default is not inspect.Parameter.empty and default is not None:
            verdict = _matches(value, type(default))
            hint = type(default)
        if verdict is False:
            raise ValueError(
                f"--set {name}.{key}={value!r}: expected {_hint_text(hint)}, got {type(value).__name__}"
            )


def check_names(mechanisms: Sequence[str], *, example: str) -> list[str]:
    """The mechanism list of a comparison (every task): not empty, no name twice; returns it."""
    names = list(mechanisms)
    if not names:
        raise ValueError(f"mechanisms: expected at least one name (e.g. {example})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"mechanisms: {', '.join(twice)} listed more than once")
    return names


def check_config(config: CompareConfig, data: Dataset | None = None) -> None:
    """Reject a configuration that could not train, before any training: in a second rather than
    after the first runs.

    Checks the mechanism list (known names, each a block for a CNN, none twice, not empty), every
    constructor option (a known option of a compared mechanism, of the right type), the device,
    and then builds every network and runs two images through it, which catches what only the
    constructors know (a reduction wider than the layer, an unknown depth).

    Raises:
        ValueError: what is wrong, naming the valid choices.
    """
    import attnzoo

    names = check_names(config.mechanisms, example="none,se,cbam")
    for name in names:
        if name == "none":
            continue
        try:
            spec = attnzoo.get_spec(name)
        except KeyError as error:
            raise ValueError(str(error.args[0])) from None
        if not _fits_a_cnn(spec):
            raise ValueError(
                f"mechanisms: {name!r} is not a block for a CNN (it takes "
                f"{'sequences' if spec.channel_dim != 1 else f'{spec.num_inputs} inputs'}, family "
                f"{spec.family}); compare trains a ResNet and can use: none, {', '.join(cnn_mechanisms())}"
            )
    for name, options in config.attention_kwargs.items():
        if name in names and options:
            _check_options(name, options)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {config.device!r}, but CUDA is not available here")
    if config.seeds is not None and not list(config.seeds):
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
                f"{name}{f' with {options}' if options else ''} cannot be built into "
                f"ResNet-{config.depth}: {reason.splitlines()[0] if reason else type(error).__name__}"
            ) from None


def prepare_output(folder: str | Path) -> Path:
    """Create the report folder and make sure that it can be written, before any training.

    Raises:
        ValueError: the folder cannot be created or written (names the path and the reason).
    """
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".attnzoo-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"output: cannot write the report to {str(out)!r}: {error.strerror or error}"
        ) from None
    return out


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
    score: Callable[[nn.Module, Tensor, Tensor], float] | None = None,
    metric: str = "acc",
) -> tuple[nn.Module, list[float], list[float]]:
    """Train ``model``; returns the trained (unwrapped) model, the test score (``score(model, x,
    y)``, accuracy by default; named ``metric`` in the progress line) and mean loss per epoch."""
    # channels-last is oneDNN's preferred layout on CPU: about 25% faster steps for this ResNet.
    # NOTE: not below 8 channels: torch 2.13's CPU kernels corrupt memory on channels-last maps of
    # 4 channels in the backward (double free, segfault; seen with width 4 on the 2-core machine)
    layout = torch.channels_last if config.width >= 8 else torch.contiguous_format
    model = prepare_model(model.to(memory_format=layout), info)
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    # the fused kernel updates every parameter in one call: the per-tensor loop of the default
    # implementation is a few percent of these small networks' steps
    fused = info.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused
    )
    steps_per_epoch = math.ceil(len(data.train_y) / config.batch_size)
    scheduler = one_cycle(optimizer, config.lr, config.epochs * steps_per_epoch)
    order_generator = torch.Generator().manual_seed(seed)
    train_x = data.train_x.to(info.device).contiguous(memory_format=layout)
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
        curve.append((score or evaluate)(core, data.test_x.to(info.device), data.test_y.to(info.device)))
        progress.update(
            f"{label}seed {seed} epoch {epoch + 1}/{config.epochs}: test {metric} {curve[-1]:.3f}"
        )
    return core, curve, losses


def _forward(model: nn.Module, x: Tensor) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            model(x)

    return call


def measure_cost(model: nn.Module, data: Dataset, config: CompareConfig) -> tuple[int, float, float, float]:
    """Parameters, MFLOPs per image of the forward pass and of a training step (forward and
    backward, the fused attention kernel counted in both), and the memory (MiB) that a forward pass
    of ``latency_batch`` images adds over the idle process."""
    model = model.eval()
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    flops = count_flops(_forward(model, data.test_x[:1].to(device)))
    # a copy trains, so that the BatchNorm statistics of the measured network stay as trained;
    # two images, so that BatchNorm has more than one value per channel at every resolution
    trainee = copy.deepcopy(model).train()
    pair = data.test_x[:2].to(device)
    train_flops = count_flops(lambda: F.cross_entropy(trainee(pair), data.test_y[:2].to(device)).backward())
    forward = _forward(model, data.test_x[: config.latency_batch].to(device))
    forward()  # warm-up: the first call's one-off allocations (kernel caches) are not the network's
    peak = peak_memory(forward, device=device)
    return params, flops / 1e6, train_flops / 2 / 1e6, peak / 2**20


LATENCY_REPEATS = 7


def measure_latency(models: dict[str, nn.Module], data: Dataset, config: CompareConfig) -> dict[str, Timing]:
    """Forward latency of a batch of ``latency_batch``: 7 repeats after warm-up, every network's
    repeats interleaved with the others' so that the machine's load changes hit all alike (the
    change against the plain network is a per-round ratio within one run)."""
    calls = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        calls[name] = _forward(model.eval(), data.test_x[: config.latency_batch].to(device))
    device = next(next(iter(models.values())).parameters()).device
    return compare_calls(calls, warmup=2, repeats=LATENCY_REPEATS, device=device)


@dataclass
class MapRow:
    """What one mechanism's row of ``attention_maps.png`` shows for the sample images.

    ``kind`` "spatial": ``values`` (B, S, S) over the image (the mean over the network's attention
    modules); "channel": (B, C) channel weights of the network's last attention module. ``label``
    says what the values mean and ``vmin``/``vmax`` is the row's colour (or bar) scale.
    """

    kind: str
    values: Tensor
    label: str
    vmin: float
    vmax: float
    source: str = ""  # which maps: e.g. "spatial map of 3 modules"


def _spatial_values(kind: str | None, maps: Tensor) -> tuple[Tensor, bool] | None:
    """(B, s, s) values of one map and whether they are attention relative to uniform."""
    if kind in ("pairwise", "alignment") and maps.dim() in (3, 4):
        grid = square_grid(received_attention(maps))
        return (grid, True) if grid is not None else None
    if kind == "spatial":
        if maps.dim() == 4:
            grid = maps.mean(dim=1)  # (B, k, h, w) -> (B, h, w): maps or channels averaged
        elif maps.dim() == 3 and maps.shape[1] == 1:
            grid = square_grid(maps[:, 0])  # (B, 1, N) -> (B, s, s)
        elif maps.dim() == 3:
            grid = maps
        else:
            grid = square_grid(maps)  # (B, N) pooling weights
        if grid is None:
            return None
        if is_distribution(grid):
            return grid * grid[0].numel(), True  # pooling weights: 1 = uniform
        return grid, False
    return None


@dataclass
class ModuleView:
    """What one attention module of a network computes on a batch: ``kind`` "spatial" with
    ``values`` (B, s, s) on the module's grid, or "channel" with (B, C) channel weights."""

    name: str
    kind: str
    values: Tensor
    relative: bool  # spatial values are attention received relative to uniform (1 = uniform)
    label: str


def module_views(model: nn.Module, images: Tensor) -> list[ModuleView]:
    """One view per attention module of ``model`` run on ``images``, in the network's order; the
    maps are read by the spec's ``map_kind`` (the shape against the module's input for the
    entries of a mixed dict)."""
    import attnzoo

    model.eval()
    modules = dict(model.named_modules())
    grids: dict[str, tuple[int, int]] = {}  # each attention module's input (h, w), to read its maps

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor) and args[0].dim() == 4:
                grids[name] = (args[0].shape[-2], args[0].shape[-1])

        return hook

    handles = [modules[name].register_forward_pre_hook(record(name)) for name in attention_modules(model)]
    try:
        with capture(model) as captured, torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    views = []
    for name in captured:
        module = modules.get(name)
        spec = attnzoo.get_spec(module.registry_name) if hasattr(module, "registry_name") else None
        spatial: ModuleView | None = None
        channel: ModuleView | None = None
        for entry in entries(spec, captured[name], *grids.get(name, (0, 0))):
            if entry.kind == "channel" and channel is None:
                weights = entry.maps.flatten(2) if entry.maps.dim() == 5 else entry.maps.flatten(1)
                label = "channel gate"
                if weights.dim() == 3:  # SK's (B, M, C): the share of the last branch per channel
                    weights, label = weights[:, -1], f"weight of branch {weights.shape[1]}"
                channel = ModuleView(name, "channel", weights, False, label)
            elif entry.kind != "channel" and spatial is None:
                found = _spatial_values(entry.kind, entry.maps)
                # logits before a sigmoid are skipped: the entry that gates is drawn instead
                if found is not None and (found[1] or float(found[0].min()) >= 0):
                    label = "received / uniform" if found[1] else "gate (0-1)"
                    spatial = ModuleView(name, "spatial", found[0], found[1], label)
        if spatial is not None or channel is not None:
            views.append(spatial if spatial is not None else channel)
    return views


def map_row(model: nn.Module, images: Tensor) -> MapRow | None:
    """What the network's attention modules compute on ``images``: their spatial maps (averaged
    over modules, each resized to the image), or, for channel-only mechanisms, the channel weights
    of the last module; None for a network without attention maps."""
    views = module_views(model, images)
    spatial = [v for v in views if v.kind == "spatial"]
    if spatial:
        same = [v.values for v in spatial if v.relative == spatial[0].relative]
        resized = [
            F.interpolate(grid[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            for grid in same
        ]  # (B, s, s) -> (B, S, S)
        values = torch.stack(resized).mean(dim=0)
        scale = value_scale(values, distribution=spatial[0].relative)
        source = f"mean of {len(same)} module{'s' if len(same) > 1 else ''}' maps"
        return MapRow("spatial", values, scale.label, scale.vmin, scale.vmax, source)
    if views:
        last = views[-1]
        scale = value_scale(last.values)
        return MapRow("channel", last.values, last.label, scale.vmin, scale.vmax, "last module")
    return None


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


def run_compare(config: CompareConfig) -> tuple[list[MechanismResult], Dataset, dict[str, MapRow | None]]:
    """Train and measure every mechanism; returns the results (the trained networks of the first
    seed in ``result.model``), the data and what each network's attention computes on the sample
    images.

    The configuration is checked first (:func:`check_config`). The runs (mechanism x seed) train in
    parallel worker processes on the CPU (``config.workers``, :mod:`attnzoo.demos.parallel`), or
    data-parallel under torchrun; the costs and maps are then measured here, one network at a
    time, on all ``config.threads`` threads. A script that calls this needs an
    ``if __name__ == "__main__":`` guard: the worker processes import it again (without it, each
    worker stops at once with one line saying so).
    """
    refuse_worker_bootstrap()
    check_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    info = init_distributed(config.device)
    try:
        data = load_dataset(config)
        check_config(config, data)
        samples = data.test_x[: config.sample_images]
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

        results, maps, trained = [], {}, {}
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
                    trained[name] = result.model = model
                    result.params, result.mflops, result.train_mflops, result.peak_mib = measure_cost(
                        model, data, config
                    )
                    maps[name] = map_row(model, samples)
            results.append(result)
        latencies = measure_latency(trained, data, config)
        for result in results:
            result.latency_ms = latencies[result.name].ms
            result.latency_samples_ms = [t * 1e3 for t in latencies[result.name].samples]
        return results, data, maps
    finally:
        cleanup_distributed(info)


def _latency_change(result: MechanismResult, base: MechanismResult) -> str:
    """``+12% [+3, +20]``: the median and range of the per-round ratios; ``(noise)`` when the
    range includes no change."""
    if len(result.latency_samples_ms) != len(base.latency_samples_ms) or not base.latency_samples_ms:
        return f"{100 * (result.latency_ms / base.latency_ms - 1):+.0f}%"
    median, low, high = paired_ratio(result.latency, base.latency)
    text = f"{100 * (median - 1):+.0f}% [{100 * (low - 1):+.0f}, {100 * (high - 1):+.0f}]"
    return text + (" (noise)" if low <= 1.0 <= high else "")


def comparison_table(results: Sequence[MechanismResult], seeds: int) -> str:
    """The report's table: one row per mechanism, changes against the plain network ``none``."""
    base = next((r for r in results if r.name == "none"), None)
    rows = [
        f"| mechanism | top-1 % (mean of {seeds} seed{'s' if seeds > 1 else ''}) | per seed | Δ acc "
        "| params | Δ params | MFLOPs fwd | MFLOPs fwd+bwd | latency ms [IQR] | Δ latency [range] "
        "| peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if base is not None and r is not base:
            d_acc = f"{100 * (r.mean - base.mean):+.2f} pt"
            d_params = f"{r.params - base.params:+,}"
            d_lat = _latency_change(r, base)
        else:
            d_acc = d_params = d_lat = "-"
        per_seed = " / ".join(f"{100 * a:.2f}" for a in r.accuracies)
        if r.latency_samples_ms:
            q1, q3 = r.latency.quartiles
            latency = f"{r.latency_ms:.2f} [{q1 * 1e3:.2f}-{q3 * 1e3:.2f}]"
        else:
            latency = f"{r.latency_ms:.2f}"
        rows.append(
            f"| {r.name} | {100 * r.mean:.2f} | {per_seed} | {d_acc} | {r.params:,} | {d_params} "
            f"| {r.mflops:.1f} | {r.train_mflops:.1f} | {latency} | {d_lat} | {r.peak_mib:.1f} |"
        )
    return "\n".join(rows)


def _options_text(config: CompareConfig) -> str:
    """The non-default constructor options of the compared mechanisms, e.g. ``non_local(sub_sample=True)``."""
    return ", ".join(
        f"{name}({', '.join(f'{k}={v!r}' for k, v in options.items())})"
        for name, options in config.attention_kwargs.items()
        if name in config.mechanisms and options
    )


CHECKPOINT_FORMAT = "attnzoo.compare/1"


def save_trained(result: MechanismResult, data: Dataset, config: CompareConfig, path: Path) -> Path:
    """Save a trained network with what rebuilds it and its inputs: plain tensors, strings and
    numbers only, so that ``torch.load(path, weights_only=True)`` reads it."""
    assert result.model is not None
    options = config.attention_kwargs.get(result.name, {}) if result.name != "none" else {}
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "mechanism": result.name,
            "seed": int(config.seeds[0]),
            "depth": config.depth,
            "width": config.width,
            "image_size": config.image_size,
            "in_chans": data.in_chans,
            "classes": list(data.classes),
            "data": data.name,
            "attention_kwargs": dict(options),
            "mean": data.mean if data.mean is not None else torch.zeros(1, data.in_chans, 1, 1),
            "std": data.std if data.std is not None else torch.ones(1, data.in_chans, 1, 1),
            "samples": data.test_x[: config.sample_images].clone(),
            "sample_labels": data.test_y[: config.sample_images].clone(),
            "accuracy": result.accuracies[0],
            "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        },
        path,
    )
    return path


def load_trained(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A network saved by ``compare`` (``REPORT_DIR/models/NAME.pt``), rebuilt with its weights, in
    eval mode, and the checkpoint (its data's normalisation, sample images, accuracy ...).

    Raises:
        ValueError: the file is not a compare checkpoint.
    """
    from attnzoo.models.resnet import resnet

    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a network saved by attnzoo compare ({error})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a network saved by attnzoo compare")
    name = checkpoint["mechanism"]
    model = resnet(
        checkpoint["depth"],
        None if name == "none" else name,
        num_classes=len(checkpoint["classes"]),
        in_chans=checkpoint["in_chans"],
        width=checkpoint["width"],
        **checkpoint["attention_kwargs"],
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


def write_report(
    results: Sequence[MechanismResult],
    data: Dataset,
    maps: dict[str, MapRow | None],
    config: CompareConfig,
) -> Path:
    """Write report.md, results.json, the PNG plots and the trained networks (``models/NAME.pt``)
    under ``config.output``; returns report.md."""
    from attnzoo import viz

    out = prepare_output(config.output)
    plt = viz.pyplot()

    # accuracy against cost: every seed's result, and the mean
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(
        axes, (("mflops", "MFLOPs per image (forward)"), ("latency_ms", "latency (ms)"))
    ):
        for r in results:
            x = getattr(r, key)
            points = ax.plot([x] * len(r.accuracies), [100 * a for a in r.accuracies], "o", alpha=0.45)
            ax.plot(x, 100 * r.mean, "D", color=points[0].get_color())
            ax.annotate(r.name, (x, 100 * r.mean), textcoords="offset points", xytext=(5, 3))
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"accuracy against cost: ResNet-{config.depth} on {data.name} "
        f"(dots: each of {len(config.seeds)} seeds; diamond: mean)",
        fontsize=10,
    )
    fig.tight_layout()
    viz.save_figure(fig, out / "accuracy_vs_cost.png")

    # training curves
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, config.epochs + 1)
    for r in results:
        axes[0].plot(epochs, [100 * statistics.fmean(c) for c in zip(*r.curves)], marker="o", label=r.name)
        axes[1].plot(epochs, [statistics.fmean(c) for c in zip(*r.losses)], marker="o", label=r.name)
    axes[0].set_ylabel(f"test accuracy (%), mean of {len(config.seeds)} seeds")
    axes[1].set_ylabel("training loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    viz.save_figure(fig, out / "training_curves.png")

    samples = list(data.test_x[: config.sample_images])
    labels = [f"#{i}: {data.classes[int(y)]}" for i, y in enumerate(data.test_y[: config.sample_images])]
    rows = {}
    for r in results:
        row = maps.get(r.name)
        if row is None:
            continue
        rows[r.name] = viz.MapRow(
            list(row.values), kind=row.kind, vmin=row.vmin, vmax=row.vmax, label=row.label
        )
    viz.overlay_grid(samples, rows, out / "attention_maps.png", column_labels=labels)

    (out / "models").mkdir(exist_ok=True)
    for r in results:
        if r.model is not None:
            save_trained(r, data, config, out / "models" / f"{r.name}.pt")

    (out / "results.json").write_text(
        json.dumps(
            {"config": asdict(config), "results": [r.to_json() for r in results]}, indent=2, default=str
        )
    )
    spatial = [n for n, row in rows.items() if row.kind == "spatial"]
    channel = [n for n, row in rows.items() if row.kind == "channel"]
    without = [r.name for r in results if r.name not in rows]
    text = [
        "# Which attention mechanism? A comparison on your machine",
        "",
        f"ResNet-{config.depth} (width {config.width}) trained on **{data.name}** "
        f"({len(data.train_y)} training and {len(data.test_y)} test images, {len(data.classes)} classes), "
        f"{config.epochs} epochs, {len(config.seeds)} seed{'s' if len(config.seeds) > 1 else ''} "
        f"{list(config.seeds)}, AdamW lr {config.lr}, batch {config.batch_size}.",
        "",
        *(
            [f"Mechanism options: {options}. Each mechanism otherwise has its paper's defaults.", ""]
            if (options := _options_text(config))
            else []
        ),
        comparison_table(results, len(config.seeds)),
        "",
        "- Accuracy: the mean over seeds and every seed's result; with this few seeds, read a "
        "difference smaller than the spread between seeds as no difference.",
        "- MFLOPs: per image, matmuls and convolutions and the fused attention kernel (a "
        "multiply-add is 2); fwd+bwd is one training step.",
        f"- Latency: forward of a batch of {config.latency_batch} ({torch.get_num_threads()} threads), "
        f"median of {LATENCY_REPEATS} repeats after warm-up [interquartile range], the networks' "
        "repeats interleaved. Δ latency is the median of the per-round ratios to the plain network "
        "[their range]; *(noise)* marks a change whose range includes no change.",
        f"- {PEAK_MEMORY_NOTE[0].upper()}{PEAK_MEMORY_NOTE[1:]}.",
        "",
        f"A short training budget ({config.epochs} epochs) favours the plain network: gates start half "
        "closed (sigmoid(0) = 0.5 scales the residual branch) and need epochs to open. Rerun with "
        "`--epochs 20 --seeds 0,1,2` (or your own data with `--data`) before drawing conclusions.",
        "",
        "![accuracy against cost](accuracy_vs_cost.png)",
        "",
        "![training curves](training_curves.png)",
        "",
        "## What each mechanism computes",
        "",
        f"The same test images (columns), each row a trained network (seed {config.seeds[0]}). "
        + (
            f"Spatial rows ({', '.join(spatial)}): the mean of the maps of every attention module in "
            "the network, over the image, on the colour scale beside the row: gates on a fixed 0-1 "
            "scale, attention weights as the attention each position receives relative to uniform "
            "(1 = uniform). "
            if spatial
            else ""
        )
        + (
            f"Channel-only mechanisms ({', '.join(channel)}) weight channels, not positions: their "
            "rows show the channel weights of the network's last attention module for each image. "
            if channel
            else ""
        )
        + (f"No row for {', '.join(without)} (no attention maps)." if without else ""),
        "",
        "![attention maps](attention_maps.png)",
        "",
        "The trained networks are in `models/` (`torch.load(path, weights_only=True)`); "
        f"`attnzoo show NAME --from {out}` draws every attention module of one of them.",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(text))
    return report
