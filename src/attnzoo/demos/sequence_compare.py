"""`attnzoo compare --task sequence`: which sequence attention should I use, and what does it cost?

The same small Transformer encoder classifier (:class:`attnzoo.models.encoder.SequenceClassifier`)
is trained with each mechanism as its attention layer, on generated tasks where long-range
attention matters and the answer is known (:mod:`attnzoo.demos.sequence_tasks`: retrieval and
ListOps), or on a user's own token sequences (``data=FILE``, :func:`read_sequences`). The report
gives what the papers' tables give (Linformer, Synthesizer, BP-Transformer): accuracy per seed at
each trained length, parameters, FLOPs, and the cost of a training step (time and peak memory)
against the length up to thousands of tokens, with the log-log slopes measured (about 2 for a
quadratic mechanism, about 1 for a linear one), plus every mechanism's attention on one example
and, for ``gated_mha``, the heads kept by ``prune()`` and the accuracy before and after it.

Accuracy and cost are measured at different lengths on purpose: training every mechanism to
convergence at 4096 tokens takes hours on a CPU, while the cost of one step does not depend on
what the weights have learnt. ``lengths`` are trained, ``cost_lengths`` are measured; the report
says which is which.

Every option is checked before any work (:func:`check_config`). The runs (mechanism x task x
length x seed, and the cost sweep of each mechanism) go to worker processes side by side
(:mod:`attnzoo.demos.parallel`); under ``torchrun`` the training runs are data-parallel
(:mod:`attnzoo.demos.distributed`) and rank 0 measures the costs.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo._progress import Progress
from attnzoo.bench.measure import count_flops, peak_memory, time_call
from attnzoo.demos.compare import _check_options, check_names, evaluate, prepare_output
from attnzoo.demos.distributed import (
    DistInfo,
    cleanup_distributed,
    init_distributed,
    one_cycle,
    prepare_model,
    train_epoch,
)
from attnzoo.demos.parallel import ProgressSink, plan_workers, refuse_worker_bootstrap, run_jobs
from attnzoo.demos.sequence_tasks import TASKS, SequenceTask, make_task, read_sequences
from attnzoo.inspect import capture
from attnzoo.models.encoder import ENCODER_MECHANISMS, SequenceClassifier

__all__ = [
    "SEQUENCE_MECHANISMS",
    "CostPoint",
    "Outcome",
    "SequenceConfig",
    "accuracy_table",
    "check_config",
    "compare_from_args",
    "cost_table",
    "loglog_slope",
    "run_sequence_compare",
    "write_sequence_report",
]

#: The mechanisms compared by default, each the encoder's attention layer.
SEQUENCE_MECHANISMS: tuple[str, ...] = (
    "mha",
    "linformer",
    "synthesizer",
    "sha",
    "gated_mha",
    "graph_self_attention",
)

#: Constructor arguments that the encoder sets itself (the width, heads, length, graph), never --set.
_SET_BY_THE_ENCODER = {"embed_dim", "num_heads", "max_seq_len", "max_len", "num_edge_types", "batch_first",
                       "kdim", "vdim", "shared_projection"}  # fmt: skip


@dataclass
class SequenceConfig:
    """Everything that decides a sequence comparison; the same config gives the same report."""

    mechanisms: Sequence[str] = SEQUENCE_MECHANISMS
    tasks: Sequence[str] = ("retrieval", "listops")
    lengths: Sequence[int] = (64,)  # trained: accuracy at each
    cost_lengths: Sequence[int] = (256, 512, 1024, 2048, 4096)  # measured: step time, memory, FLOPs
    epochs: int = 15
    seeds: Sequence[int] = (0, 1)
    n_train: int = 2000  # generated training sequences per task and length
    n_test: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    embed_dim: int = 32
    num_heads: int = 2
    num_layers: int = 2
    ffn_dim: int = 128
    l0_weight: float = 0.05  # gated_mha: loss + l0_weight * (expected open heads), Voita et al.'s lambda
    data: str | None = None  # a file of LABEL<TAB>TOKENS lines instead of the generated tasks
    limit: int | None = None  # at most this many training sequences
    output: str = "reports/compare-sequence"
    threads: int | None = None
    workers: int | None = None
    attention_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "cpu"
    cost_batch: int = 1  # sequences per measured training step
    cost_repeats: int = 3  # timed steps per length (after one warm-up step)
    cost_step_limit_s: float = 30.0  # a mechanism whose step takes longer is not measured at longer lengths
    progress: bool = True


@dataclass
class Outcome:
    """One training run: a mechanism on one task at one length with one seed."""

    mechanism: str
    task: str
    length: int
    seed: int
    accuracy: float
    curve: list[float] = field(default_factory=list)  # test accuracy after each epoch
    losses: list[float] = field(default_factory=list)
    params: int = 0
    train_seconds: float = 0.0
    #: gated_mha: heads kept per layer by prune(), and the accuracy after it (``accuracy`` is before)
    heads_kept: list[int] | None = None
    pruned_accuracy: float | None = None
    #: the first seed at the shortest length of the first task: each layer's attention on test
    #: example 0, (queries, keys) averaged over heads, and what the keys are
    maps: list[Tensor] | None = field(default=None, repr=False)
    map_keys: str = ""


@dataclass
class CostPoint:
    """The cost of one training step of a mechanism's encoder at one length."""

    mechanism: str
    length: int
    params: int = 0
    mflops: float = 0.0  # forward, per sequence, the attention core included
    train_mflops: float = 0.0  # forward + backward, per sequence
    step_ms: list[float] = field(default_factory=list)  # every timed step (batch cost_batch)
    peak_mib: float = 0.0  # what one training step adds over the idle process
    skipped: str = ""  # why it was not measured (too slow, out of memory)
    threads: int = 0  # torch threads of the process that measured it

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else math.nan


def loglog_slope(lengths: Sequence[float], values: Sequence[float]) -> float:
    """The exponent p of ``value ~ c * length^p``: least squares on (log length, log value).

    Raises:
        ValueError: fewer than two points, or a non-positive length or value.
    """
    points = [(x, y) for x, y in zip(lengths, values) if not (math.isnan(x) or math.isnan(y))]
    if len({x for x, _ in points}) < 2:
        raise ValueError(f"slope: expected at least two distinct lengths, got {len(points)} point(s)")
    if any(x <= 0 or y <= 0 for x, y in points):
        raise ValueError("slope: expected positive lengths and values on a log-log scale")
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


# -- checks ----------------------------------------------------------------------------------------


def _adapter_options(name: str) -> set[str]:
    """Options taken by the encoder's adapter itself, e.g. the partition arity ``k`` of the
    BP-Transformer graph layer."""
    factory = ENCODER_MECHANISMS[name]
    if not inspect.isclass(factory):
        return set()
    params = list(inspect.signature(factory).parameters.values())[3:]  # after embed_dim, heads, max_len
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}


def _check_set(name: str, options: dict[str, Any]) -> None:
    for key in options:
        if key in _SET_BY_THE_ENCODER:
            raise ValueError(
                f"--set {name}.{key}: {key!r} is set by the encoder (from its width, heads and length)"
            )
    _check_options(name, {k: v for k, v in options.items() if k not in _adapter_options(name)})


def _positive_list(label: str, values: Sequence[int], minimum: int = 1) -> None:
    if not list(values):
        raise ValueError(f"{label}: expected at least one value")
    bad = [v for v in values if v < minimum]
    if bad:
        raise ValueError(f"{label}: expected integers >= {minimum}, got {bad[0]}")
    if len(set(values)) != len(values):
        raise ValueError(
            f"{label}: {sorted({v for v in values if list(values).count(v) > 1})[0]} listed twice"
        )


def check_config(config: SequenceConfig) -> None:
    """Reject a configuration that could not run, before any training (in about a second).

    Checks the mechanism and task names, the lengths, every ``--set`` option (a known option of a
    compared mechanism, of the right type, not one the encoder sets), the sizes and the device,
    and builds every encoder and runs two sequences through it at the shortest trained and
    measured lengths, which catches what only the constructors know (a Linformer projection
    longer than the sequence).

    Raises:
        ValueError: what is wrong, naming the valid choices.
    """
    import attnzoo

    names = check_names(config.mechanisms, example=",".join(SEQUENCE_MECHANISMS))
    for name in names:
        if name not in ENCODER_MECHANISMS:
            try:
                attnzoo.get_spec(name)
            except KeyError as error:
                raise ValueError(str(error.args[0])) from None
            raise ValueError(
                f"mechanisms: {name!r} is not a sequence self-attention layer; --task sequence can use: "
                f"{', '.join(SEQUENCE_MECHANISMS)}"
            )
    for name, options in config.attention_kwargs.items():
        if name not in names:
            try:
                attnzoo.get_spec(name)
            except KeyError as error:
                raise ValueError(f"--set {name}: {error.args[0]}") from None
            raise ValueError(
                f"--set {name}: {name!r} is not among the compared mechanisms ({', '.join(names)})"
            )
        _check_set(name, options)
    if config.data is None:
        for task in config.tasks:
            if task not in TASKS:
                raise ValueError(f"tasks: expected names among {', '.join(sorted(TASKS))}, got {task!r}")
        if not list(config.tasks):
            raise ValueError(f"tasks: expected at least one of {', '.join(sorted(TASKS))}")
        _positive_list("lengths", config.lengths, 8)
    _positive_list("cost lengths", config.cost_lengths, 8)
    if not list(config.seeds):
        raise ValueError("seeds: expected at least one seed")
    for label in ("epochs", "batch_size", "n_train", "n_test", "embed_dim", "num_heads", "num_layers",
                  "ffn_dim", "cost_batch", "cost_repeats"):  # fmt: skip
        if getattr(config, label) < 1:
            raise ValueError(f"{label}: expected a positive integer, got {getattr(config, label)}")
    if config.embed_dim % config.num_heads:
        raise ValueError(f"num_heads: {config.num_heads} does not divide embed_dim {config.embed_dim}")
    if not config.lr > 0:
        raise ValueError(f"lr: expected a positive learning rate, got {config.lr}")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {config.device!r}, but CUDA is not available here")
    trial_lengths = sorted({min(config.cost_lengths), *([] if config.data else [min(config.lengths)])})
    for name in names:
        for length in trial_lengths:
            try:
                model = build_model(name, config, vocab_size=8, num_classes=2, max_len=length).eval()
                with torch.no_grad():
                    model(torch.randint(1, 8, (2, length)))
            except (ValueError, TypeError, RuntimeError, KeyError) as error:
                reason = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
                options = config.attention_kwargs.get(name)
                raise ValueError(
                    f"{name}{f' with {options}' if options else ''} cannot be built into the encoder at "
                    f"length {length}: {reason.splitlines()[0] if reason else type(error).__name__}"
                ) from None


# -- data and models -------------------------------------------------------------------------------


def build_model(
    name: str, config: SequenceConfig, *, vocab_size: int, num_classes: int, max_len: int
) -> SequenceClassifier:
    return SequenceClassifier(
        vocab_size,
        num_classes,
        max_len,
        attention=name,
        embed_dim=config.embed_dim,
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        ffn_dim=config.ffn_dim,
        attention_options=config.attention_kwargs.get(name, {}),
    )


def load_tasks(config: SequenceConfig) -> dict[tuple[str, int], SequenceTask]:
    """Every (task, length) the runs train on: the generated tasks, or the user's file."""
    if config.data is not None:
        data = read_sequences(config.data)
        tasks = {(data.name, data.length): data}
    else:
        tasks = {
            (name, length): make_task(name, length, config.n_train, config.n_test, seed=0)
            for name in config.tasks
            for length in config.lengths
        }
    if config.limit is not None:
        for key, task in tasks.items():
            tasks[key] = SequenceTask(task.name, task.length, task.num_classes, task.vocab,
                                      task.train_tokens[: config.limit], task.train_labels[: config.limit],
                                      task.test_tokens, task.test_labels, task.classes)  # fmt: skip
    return tasks


# -- the runs --------------------------------------------------------------------------------------


def _layer_maps(model: SequenceClassifier, tokens: Tensor) -> tuple[list[Tensor], str]:
    """Each layer's attention on one sequence (1, L) as a (queries, keys) matrix averaged over
    heads, and what its keys are: the tokens, Linformer's projected rows, or the graph's nodes."""
    model.eval()
    with capture(model) as captured, torch.no_grad():
        model(tokens)
    maps, keys = [], "token"
    length = tokens.shape[1]
    for name in captured:
        weights = captured[name]
        if model.attention == "graph_self_attention":
            # (E, h) edge weights of the one sequence's graph -> (L, nodes): token queries only
            graph = model.layers[0].attn._graph(length, torch.device("cpu"))
            source, target = graph.edge_index
            dense = torch.zeros(graph.num_nodes, graph.num_nodes)
            dense[target, source] = weights.float().mean(-1)
            maps.append(dense[:length])
            keys = "graph node (tokens, then spans)"
        else:
            weights = weights.float()
            weights = weights.mean(1) if weights.dim() == 4 else weights  # (1, h, L, K) -> (1, L, K)
            maps.append(weights[0])
            if weights.shape[-1] != length:
                keys = "projected key row"
    return maps, keys


def _train(
    name: str,
    task: SequenceTask,
    seed: int,
    config: SequenceConfig,
    info: DistInfo,
    progress: ProgressSink,
    *,
    want_maps: bool = False,
) -> Outcome:
    import time

    torch.manual_seed(seed)
    core = build_model(
        name, config, vocab_size=task.vocab_size, num_classes=task.num_classes, max_len=task.length
    )
    model = prepare_model(core, info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = one_cycle(
        optimizer, config.lr, config.epochs * math.ceil(len(task.train_labels) / config.batch_size)
    )
    generator = torch.Generator().manual_seed(seed)
    x, y = task.train_tokens.to(info.device), task.train_labels.to(info.device)
    test_x, test_y = task.test_tokens.to(info.device), task.test_labels.to(info.device)
    gated = name == "gated_mha" and config.l0_weight > 0

    def loss_fn(idx: Tensor) -> Tensor:
        loss = F.cross_entropy(model(x[idx]), y[idx])
        return loss + config.l0_weight * core.l0_penalty() if gated else loss

    outcome = Outcome(
        name, task.name, task.length, seed, 0.0, params=sum(p.numel() for p in core.parameters())
    )
    started = time.perf_counter()
    for epoch in range(config.epochs):
        outcome.losses.append(
            train_epoch(model, optimizer, scheduler, len(y), config.batch_size, generator, loss_fn, info)
        )
        outcome.curve.append(evaluate(core, test_x, test_y, batch_size=64))
        progress.update(
            f"{name} {task.name}@{task.length} seed {seed} epoch {epoch + 1}/{config.epochs}: "
            f"acc {outcome.curve[-1]:.3f}"
        )
    outcome.train_seconds = time.perf_counter() - started
    outcome.accuracy = outcome.curve[-1]
    if name == "gated_mha":
        pruned = copy.deepcopy(core).eval()
        outcome.heads_kept = []
        for layer in pruned.layers:
            layer.attn.prune()
            outcome.heads_kept.append(layer.attn.num_heads)
        outcome.pruned_accuracy = evaluate(pruned, test_x, test_y, batch_size=64)
    if want_maps:
        outcome.maps, outcome.map_keys = _layer_maps(core.cpu(), task.test_tokens[:1])
    return outcome


def _cost_at(name: str, length: int, config: SequenceConfig, vocab_size: int, num_classes: int) -> CostPoint:
    """Parameters, FLOPs per sequence, step time and peak memory of one training step at ``length``."""
    device = torch.device(config.device)
    point = CostPoint(name, length, threads=torch.get_num_threads())
    torch.manual_seed(0)
    model = build_model(name, config, vocab_size=vocab_size, num_classes=num_classes, max_len=length).to(
        device
    )
    point.params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(length)
    # (cost_batch, L) random tokens: the cost does not depend on what they say
    tokens = torch.randint(2, vocab_size, (config.cost_batch, length), generator=generator).to(device)
    labels = torch.randint(0, num_classes, (config.cost_batch,), generator=generator).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens), labels).backward()
        optimizer.step()

    def forward() -> None:
        with torch.no_grad():
            model.eval()(tokens[:1])

    def train_step() -> None:
        F.cross_entropy(model.train()(tokens[:1]), labels[:1]).backward()

    point.mflops = count_flops(forward) / 1e6
    point.train_mflops = count_flops(train_step) / 1e6
    model.train()
    timing = time_call(step, warmup=1, repeats=config.cost_repeats, device=device)
    point.step_ms = [t * 1e3 for t in timing.samples]
    point.peak_mib = peak_memory(step, device=device) / 2**20
    return point


def _measure_cost(name: str, config: SequenceConfig, vocab_size: int, num_classes: int) -> list[CostPoint]:
    """Cost of a training step at each of ``cost_lengths``, shortest first. Once a step takes
    longer than ``cost_step_limit_s`` or fails (out of memory), the longer lengths are skipped
    with the reason."""
    points: list[CostPoint] = []
    reason = ""
    for length in sorted(config.cost_lengths):
        if reason:
            points.append(CostPoint(name, length, skipped=reason))
            continue
        try:
            point = _cost_at(name, length, config, vocab_size, num_classes)
        except (RuntimeError, MemoryError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            reason = f"failed at length {length}: {first[:120]}"
            points.append(CostPoint(name, length, skipped=reason))
            continue
        points.append(point)
        if point.median_ms / 1e3 > config.cost_step_limit_s:
            reason = (
                f"a step at length {length} took {point.median_ms / 1e3:.0f} s "
                f"(over the {config.cost_step_limit_s:.0f} s limit)"
            )
    return points


def _run_job(kind: str, name: str, key: Any, seed: int, shared: Any, progress: ProgressSink) -> Any:
    """One job of the pool: a training run (``kind`` "train", ``key`` (task, length)) or a
    mechanism's cost sweep ("cost"); module-level so that worker processes can run it."""
    config, tasks, info, vocab_size, num_classes = shared
    if kind == "cost":
        if not info.is_main:  # under torchrun rank 0 measures; the others have nothing to do
            return []
        points = _measure_cost(name, config, vocab_size, num_classes)
        progress.update(f"{name}: cost at {len(points)} lengths")
        return points
    task = tasks[key]
    first_task = next(iter(tasks))[0]
    # the maps: the first seed at the shortest length of the first task
    shortest = min(length for task_name, length in tasks if task_name == first_task)
    want_maps = seed == config.seeds[0] and key == (first_task, shortest)
    return _train(name, task, seed, config, info, progress, want_maps=want_maps)


def run_sequence_compare(
    config: SequenceConfig,
) -> tuple[list[Outcome], dict[str, list[CostPoint]], dict[tuple[str, int], SequenceTask]]:
    """Train every (mechanism, task, length, seed) and measure every mechanism's cost; returns the
    training outcomes, the cost points per mechanism and the tasks.

    The configuration is checked first (:func:`check_config`). The training runs and the cost
    sweeps share one pool of worker processes on the CPU (``config.workers``), the longest jobs
    first; under torchrun the training runs are data-parallel, one after another. A script that
    calls this needs an ``if __name__ == "__main__":`` guard (the workers import it again).
    """
    refuse_worker_bootstrap()
    check_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    info = init_distributed(config.device)
    try:
        tasks = load_tasks(config)
        first = next(iter(tasks.values()))
        cost_jobs = [("cost", name, None, 0) for name in config.mechanisms]
        train_jobs = [
            ("train", name, key, seed)
            for key in sorted(tasks, key=lambda k: -k[1])  # the longest sequences first
            for name in config.mechanisms
            for seed in config.seeds
        ]
        jobs = cost_jobs + train_jobs
        parallel = not info.distributed and info.device.type == "cpu"
        workers, threads = plan_workers(len(jobs), torch.get_num_threads(), config.workers if parallel else 1)
        progress = Progress(
            len(train_jobs) * config.epochs + len(cost_jobs), enabled=config.progress and info.is_main
        )
        try:
            results = run_jobs(
                _run_job,
                jobs,
                shared=(config, tasks, info, first.vocab_size, first.num_classes),
                workers=workers,
                threads=threads,
                progress=progress,
            )
        finally:
            progress.close()
        costs = {job[1]: points for job, points in zip(cost_jobs, results[: len(cost_jobs)])}
        outcomes = results[len(cost_jobs) :]
        order = {name: i for i, name in enumerate(config.mechanisms)}
        outcomes.sort(key=lambda o: (order[o.mechanism], list(tasks).index((o.task, o.length)), o.seed))
        return outcomes, costs, tasks
    finally:
        cleanup_distributed(info)


# -- the report ------------------------------------------------------------------------------------


def _slopes(points: Sequence[CostPoint]) -> tuple[float, float]:
    """(step time slope, peak memory slope) over the measured lengths; nan with fewer than two."""
    measured = [p for p in points if p.step_ms]
    result = []
    for values in ([p.median_ms for p in measured], [p.peak_mib for p in measured]):
        try:
            result.append(loglog_slope([p.length for p in measured], values))
        except ValueError:
            result.append(math.nan)
    return result[0], result[1]


def accuracy_table(outcomes: Sequence[Outcome], tasks: Sequence[tuple[str, int]]) -> str:
    """Test accuracy (%) per mechanism at each trained (task, length): the mean and every seed."""
    header = "| mechanism | " + " | ".join(f"{t} @ {n}: mean (per seed)" for t, n in tasks) + " |"
    rows = [header, "|---|" + "---|" * len(tasks)]
    for name in dict.fromkeys(o.mechanism for o in outcomes):
        cells = []
        for task, length in tasks:
            runs = [o for o in outcomes if (o.mechanism, o.task, o.length) == (name, task, length)]
            per_seed = " / ".join(f"{100 * o.accuracy:.1f}" for o in runs)
            cells.append(f"{100 * statistics.fmean(o.accuracy for o in runs):.1f} ({per_seed})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _fmt(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def cost_table(costs: dict[str, list[CostPoint]]) -> str:
    """Per mechanism: parameters and MFLOPs at the shortest and longest measured length, step time
    and peak memory at every length, and their log-log slopes."""
    lengths = sorted({p.length for points in costs.values() for p in points})
    short, long = lengths[0], lengths[-1]
    rows = [
        f"| mechanism | params @ {short} / {long} | MFLOPs fwd @ {short} / {long} | MFLOPs fwd+bwd @ {long} "
        "| time slope | memory slope | " + " | ".join(f"step ms / MiB @ {n}" for n in lengths) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(lengths),
    ]
    for name, points in costs.items():
        by_length = {p.length: p for p in points}
        time_slope, memory_slope = _slopes(points)
        cells = []
        for n in lengths:
            p = by_length.get(n)
            cells.append(
                "skipped" if p is None or not p.step_ms else f"{p.median_ms:,.0f} / {p.peak_mib:,.1f}"
            )
        first, last = by_length[short], by_length[long]
        rows.append(
            f"| {name} | {first.params:,} / {last.params:,} | {_fmt(first.mflops, 1)} / "
            f"{_fmt(last.mflops, 1) if last.step_ms else 'skipped'} | "
            f"{_fmt(last.train_mflops, 1) if last.step_ms else 'skipped'} | {_fmt(time_slope, 2)} | "
            f"{_fmt(memory_slope, 2)} | " + " | ".join(cells) + " |"
        )
    return "\n".join(rows)


def _threads_text(costs: dict[str, list[CostPoint]]) -> str:
    threads = sorted({p.threads for points in costs.values() for p in points if p.step_ms})
    return f"{'/'.join(map(str, threads)) or '?'} thread{'s' if threads != [1] else ''}"


def pruning_table(outcomes: Sequence[Outcome]) -> str:
    """gated_mha: the heads each layer keeps after prune() and the accuracy before and after."""
    rows = ["| task @ length | seed | heads kept per layer | accuracy before prune() | after |",
            "|---|---|---|---|---|"]  # fmt: skip
    for o in outcomes:
        if o.heads_kept is not None and o.pruned_accuracy is not None:
            rows.append(
                f"| {o.task} @ {o.length} | {o.seed} | {' / '.join(map(str, o.heads_kept))} | "
                f"{100 * o.accuracy:.1f} | {100 * o.pruned_accuracy:.1f} |"
            )
    return "\n".join(rows) if len(rows) > 2 else ""


def _plot_costs(costs: dict[str, list[CostPoint]], path: Path, cost_batch: int) -> Path:
    from attnzoo import viz

    plt = viz.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, (name, points) in enumerate(costs.items()):
        measured = [p for p in points if p.step_ms]
        if not measured:
            continue
        time_slope, memory_slope = _slopes(points)
        lengths = [p.length for p in measured]
        for ax, values, slope in (
            (axes[0], [p.median_ms for p in measured], time_slope),
            (axes[1], [p.peak_mib for p in measured], memory_slope),
        ):
            ax.loglog(lengths, values, "o-", color=f"C{i}", label=f"{name} (slope {_fmt(slope, 2)})")
    all_lengths = sorted({p.length for points in costs.values() for p in points})
    for ax, label in zip(axes, (f"training step time (ms), batch {cost_batch}",
                                f"peak memory of one step (MiB), batch {cost_batch}")):  # fmt: skip
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.set_xticks(all_lengths, [str(n) for n in all_lengths])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("cost against length, log-log: slope ~2 quadratic, ~1 linear (least squares)", fontsize=10)
    fig.tight_layout()
    return viz.save_figure(fig, path)


def _plot_accuracy(
    outcomes: Sequence[Outcome], tasks: dict[tuple[str, int], SequenceTask], path: Path
) -> Path:
    from attnzoo import viz

    plt = viz.pyplot()
    names = list(dict.fromkeys(t for t, _ in tasks))
    mechanisms = list(dict.fromkeys(o.mechanism for o in outcomes))
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.4), squeeze=False)
    for ax, task in zip(axes[0], names):
        lengths = sorted(n for t, n in tasks if t == task)
        for i, name in enumerate(mechanisms):
            means = []
            for n in lengths:
                runs = [o.accuracy for o in outcomes if (o.mechanism, o.task, o.length) == (name, task, n)]
                means.append(100 * statistics.fmean(runs))
                ax.plot([n] * len(runs), [100 * a for a in runs], "o", color=f"C{i}", alpha=0.35)
            ax.plot(lengths, means, "D-", color=f"C{i}", label=name)
        majority = [
            100
            * torch.bincount(tasks[(task, n)].test_labels).max().item()
            / len(tasks[(task, n)].test_labels)
            for n in lengths
        ]
        ax.plot(lengths, majority, "k_--", markersize=24, alpha=0.6, label="majority class")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("trained sequence length (tokens)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{task} (dots: each seed; diamonds: mean)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return viz.save_figure(fig, path)


def _plot_maps(outcomes: Sequence[Outcome], task: SequenceTask, path: Path) -> Path | None:
    from attnzoo import viz

    rows = [o for o in outcomes if o.maps]
    if not rows:
        return None
    plt = viz.pyplot()
    layers = max(len(o.maps or []) for o in rows)
    fig, axes = plt.subplots(
        len(rows), layers, figsize=(4.2 * layers, 3.6 * len(rows)), squeeze=False, layout="constrained"
    )
    tokens = [task.vocab[int(t)] for t in task.test_tokens[0]]
    for r, outcome in enumerate(rows):
        for c in range(layers):
            ax = axes[r, c]
            if c >= len(outcome.maps or []):
                ax.axis("off")
                continue
            weights = outcome.maps[c]
            shown = ax.imshow(weights.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(f"{outcome.mechanism}, layer {c + 1}", fontsize=9)
            ax.set_ylabel("query position", fontsize=8)
            ax.set_xlabel(outcome.map_keys, fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(
        f"attention on test example 0 of {task.name} @ {task.length} (label {int(task.test_labels[0])}), "
        f"heads averaged\ntokens: {' '.join(tokens[:6])} ... {' '.join(tokens[-3:])}",
        fontsize=10,
    )
    return viz.save_figure(fig, path)


def write_sequence_report(
    outcomes: Sequence[Outcome],
    costs: dict[str, list[CostPoint]],
    tasks: dict[tuple[str, int], SequenceTask],
    config: SequenceConfig,
    *,
    wall_seconds: float | None = None,
) -> Path:
    """report.md, results.json and the plots under ``config.output``; returns report.md."""
    out = prepare_output(config.output)
    keys = list(tasks)
    _plot_accuracy(outcomes, tasks, out / "accuracy_vs_length.png")
    _plot_costs(costs, out / "cost_vs_length.png", config.cost_batch)
    first_task = keys[0][0]
    map_task = tasks[(first_task, min(n for t, n in keys if t == first_task))]
    maps_path = _plot_maps(outcomes, map_task, out / "attention_maps.png")
    (out / "results.json").write_text(
        json.dumps(
            {
                "config": asdict(config),
                "outcomes": [{k: v for k, v in asdict(o).items() if k != "maps"} for o in outcomes],
                "costs": {name: [asdict(p) for p in points] for name, points in costs.items()},
            },
            indent=2,
            default=str,
        )
    )
    options = ", ".join(
        f"{name}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"
        for name, opts in config.attention_kwargs.items()
        if opts
    )
    skipped = [f"{name} from length {p.length}: {p.skipped}" for name, points in costs.items()
               for p in points if p.skipped and p is next(q for q in points if q.skipped)]  # fmt: skip
    pruning = pruning_table(outcomes)
    trained = ", ".join(f"{t} @ {n}" for t, n in keys)
    text = [
        "# Which sequence attention? Accuracy and cost on your machine",
        "",
        f"A pre-norm Transformer encoder classifier ({config.num_layers} layers, width {config.embed_dim}, "
        f"{config.num_heads} heads, FFN {config.ffn_dim}; `attnzoo.models.encoder.SequenceClassifier`) with "
        "each mechanism as its attention layer, the `<cls>` token classified. "
        + (f"Mechanism options: {options}; otherwise" if options else "Every mechanism has")
        + " its module's defaults (Synthesizer: dense; graph_self_attention: the BP-Transformer "
        "binary-partition graph, k = 4; Linformer: projected length k = n / 4, which grows with the "
        "length, so that its cost grows like mha's; `--set linformer.proj_dim=256` fixes k as the "
        "paper's efficiency experiments do, for a cost linear in n).",
        "",
        "## Accuracy (trained lengths: " + trained + ")",
        "",
        "- " + "\n- ".join(tasks[k].describe() for k in keys),
        f"- {config.epochs} epochs, AdamW lr {config.lr} (one-cycle), weight decay {config.weight_decay}, "
        f"batch {config.batch_size}, seeds {list(config.seeds)}"
        + (
            f"; gated_mha adds {config.l0_weight} x its L0 penalty (expected open heads) to the loss"
            if "gated_mha" in config.mechanisms
            else ""
        )
        + ".",
        f"- Trained only at {', '.join(str(n) for n in sorted({n for _, n in keys}))} tokens: training to "
        f"convergence at {max(config.cost_lengths)} tokens takes hours on a CPU. The cost below does not "
        "depend on training and is measured at every length. With a short budget read a difference "
        "smaller than the spread between seeds as no difference.",
        "",
        accuracy_table(outcomes, keys),
        "",
        "![accuracy against length](accuracy_vs_length.png)",
        "",
        *(["## gated_mha: heads kept by prune()", "", pruning, ""] if pruning else []),
        f"## Cost against length (measured at {', '.join(str(n) for n in sorted(config.cost_lengths))})",
        "",
        f"One training step (forward, backward, AdamW) of a batch of {config.cost_batch} random sequences, "
        f"median of {config.cost_repeats} steps after one warm-up; peak MiB is what one step adds over the "
        "idle process (resident-set high-water mark; on CUDA the allocator's peak). MFLOPs per sequence: "
        "matmuls and the fused attention core (a multiply-add is 2). Slopes: least squares of log cost "
        "on log length (about 2: quadratic in the length, about 1: linear; fixed costs such as the "
        "weights pull a slope below its asymptote at short lengths). Each mechanism's sweep ran in one "
        f"process on {_threads_text(costs)} beside the other jobs: absolute times carry the machine's "
        "load, the slopes much less.",
        "",
        cost_table(costs),
        "",
        *([f"Not measured: {'; '.join(skipped)}.", ""] if skipped else []),
        "![cost against length](cost_vs_length.png)",
        "",
        *(
            [
                "## What each mechanism attends to",
                "",
                "Each layer's attention weights on the same test sequence (first seed), averaged over "
                "heads: rows are query positions, columns the keys (tokens; Linformer's projected rows; "
                "the graph's nodes for graph_self_attention, tokens first, then spans).",
                "",
                f"![attention maps]({maps_path.name})",
                "",
            ]
            if maps_path is not None
            else []
        ),
        f"Run on {torch.get_num_threads()} threads"
        + (f"; wall time {wall_seconds / 60:.1f} min" if wall_seconds is not None else "")
        + ". Every number is in `results.json`.",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(text))
    return report


def compare_from_args(args: Any) -> int:
    """``attnzoo compare --task sequence``: the config from the command line, checked, run, reported."""
    import os
    import time

    started = time.perf_counter()
    if args.data is not None and (args.tasks is not None or args.lengths is not None):
        raise ValueError("--tasks and --lengths choose the generated tasks; drop them with --data FILE")
    attention_kwargs: dict[str, dict[str, Any]] = {}
    for name, options in args.set:
        attention_kwargs.setdefault(name, {}).update(options)
    config = SequenceConfig(
        mechanisms=args.mechanisms or list(SEQUENCE_MECHANISMS),
        tasks=args.tasks or SequenceConfig.tasks,
        lengths=args.lengths or SequenceConfig.lengths,
        cost_lengths=args.cost_lengths or SequenceConfig.cost_lengths,
        epochs=args.epochs or SequenceConfig.epochs,
        seeds=args.seeds,
        batch_size=args.batch_size or SequenceConfig.batch_size,
        lr=SequenceConfig.lr if args.lr is None else args.lr,
        data=args.data,
        limit=args.limit,
        output=args.output or SequenceConfig.output,
        threads=args.threads,
        workers=args.workers,
        attention_kwargs=attention_kwargs,
        device=args.device,
        progress=not args.quiet,
    )
    if config.data is not None:
        read_sequences(config.data)  # a bad file is one line, before the encoders are built
    check_config(config)
    prepare_output(config.output)
    outcomes, costs, tasks = run_sequence_compare(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    report = write_sequence_report(outcomes, costs, tasks, config, wall_seconds=time.perf_counter() - started)
    print(accuracy_table(outcomes, list(tasks)))
    print()
    print(cost_table(costs))
    print(f"\nreport: {report}")
    return 0
