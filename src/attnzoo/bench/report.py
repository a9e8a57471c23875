"""Benchmark rows for `attnzoo bench`: one registered module at one size.

Every latency is the median of interleaved repeats with its interquartile range; a speed-up (another
dtype, ``torch.compile``) is the median of the per-repeat ratios of two contenders timed in the same
rounds, marked ``~`` when the range of those ratios contains 1 (a difference inside the noise).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from attnzoo.bench.measure import Timing, compare_calls, count_flops, paired_ratio, peak_memory
from attnzoo.registry import ModuleSpec, Sizes

__all__ = ["BenchRow", "bench_module", "format_table", "to_csv", "to_json"]

#: What ``peak_mib`` measures, for the table's footnote and the docs.
PEAK_MEMORY_NOTE = (
    "peak MiB: memory the forward pass adds over the idle process (CPU: resident-set high-water "
    "mark during the call minus the resident set before it; CUDA: allocator peak minus the "
    "allocation before), output included"
)


@dataclass(frozen=True)
class Speedup:
    """``other / this`` time: the median of the per-repeat ratios and their range."""

    median: float
    low: float
    high: float

    @property
    def within_noise(self) -> bool:
        return self.low <= 1.0 <= self.high

    def __str__(self) -> str:
        return f"{self.median:.2f}x" + ("~" if self.within_noise else "")

    @classmethod
    def of(cls, base: Timing, ours: Timing) -> Speedup:
        # ours / base per round is the slowdown; its reciprocal the speed-up
        median, low, high = paired_ratio(base, ours)
        return cls(median, low, high)


@dataclass(frozen=True)
class BenchRow:
    """Measurements of one module: times in milliseconds, memory in MiB, FLOPs in GFLOPs.

    ``*_q1_ms`` / ``*_q3_ms`` are the quartiles of the repeats. Figures that could not be measured
    are None, with the reason in ``notes``.
    """

    name: str
    batch: int
    width: int
    extent: int
    dtype: str
    device: str
    threads: int
    params: int
    gflops: float | None
    train_gflops: float | None
    forward_ms: float | None
    forward_q1_ms: float | None
    forward_q3_ms: float | None
    train_ms: float | None
    train_q1_ms: float | None
    train_q3_ms: float | None
    peak_mib: float | None
    float32_forward_ms: float | None = None
    float32_train_ms: float | None = None
    speedup_vs_float32_forward: Speedup | None = None
    speedup_vs_float32_train: Speedup | None = None
    compiled_forward_ms: float | None = None
    compiled_train_ms: float | None = None
    compile_s: float | None = None
    compile_speedup_forward: Speedup | None = None
    compile_speedup_train: Speedup | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def _first(result: object) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result  # type: ignore[return-value]


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@dataclass
class _Contender:
    """One way of running the module (a dtype, eager or compiled): its forward and training step."""

    module: nn.Module
    forward: Callable[[], None]
    train_step: Callable[[], None]


def _contender(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> _Contender:
    grad_inputs = tuple(x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs)

    def forward() -> None:
        module.eval()
        with torch.no_grad():
            module(*inputs)

    def train_step() -> None:
        module.train()
        out = _first(module(*grad_inputs))
        out.float().square().mean().backward()
        module.zero_grad(set_to_none=True)

    return _Contender(module, forward, train_step)


def _first_call_s(fn: Callable[[], None], device: Any) -> float:
    start = time.perf_counter()
    fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _quartiles_ms(timing: Timing | None) -> tuple[float | None, float | None, float | None]:
    if timing is None:
        return None, None, None
    q1, q3 = timing.quartiles
    return timing.ms, q1 * 1e3, q3 * 1e3


def bench_module(
    spec: ModuleSpec,
    sizes: Sizes,
    *,
    repeats: int = 5,
    warmup: int = 2,
    against_float32: bool = False,
    compile: bool = False,
) -> BenchRow:
    """Params, FLOPs (forward; forward + backward), forward latency (eval, no grad), training-step
    latency (forward + backward) and the forward pass's peak memory of ``spec`` at ``sizes``.

    ``against_float32``: also time a float32 copy (same weights), interleaved with this one, and
    report the speed-up of ``sizes.dtype`` over float32. ``compile``: also time a
    ``torch.compile``-d copy interleaved with the eager one, and the compile time (the first
    forward and the first training step). A training step that cannot run (a BatchNorm on a batch
    of one) leaves its figures None and says why in ``notes``; an error in building or running the
    forward pass is raised.
    """
    if warmup < 0:
        raise ValueError(f"warmup: expected a count >= 0, got {warmup}")
    torch.manual_seed(0)
    module = spec.build(sizes)
    inputs = spec.example_inputs(sizes)
    params = sum(p.numel() for p in module.parameters())
    notes: list[str] = []
    main = _contender(module, inputs)
    contenders = {"main": main}
    if against_float32 and sizes.dtype != torch.float32:
        float32_sizes = replace(sizes, dtype=torch.float32)
        reference = spec.build(float32_sizes)
        reference.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
        contenders["float32"] = _contender(reference, spec.example_inputs(float32_sizes))
    compile_s = 0.0
    if compile:
        compiled = _contender(torch.compile(module), inputs)  # type: ignore[arg-type]
        compile_s += _first_call_s(compiled.forward, sizes.device)
        contenders["compiled"] = compiled

    main.forward()  # fails here, before any timing, for a module that cannot run at these sizes
    gflops = count_flops(main.forward) / 1e9
    forward = compare_calls(
        {k: c.forward for k, c in contenders.items()}, warmup=warmup, repeats=repeats, device=sizes.device
    )
    peak = peak_memory(main.forward, device=sizes.device)

    train: dict[str, Timing] = {}
    train_gflops = None
    try:
        main.train_step()
        train_gflops = count_flops(main.train_step) / 1e9
        if compile:
            compile_s += _first_call_s(contenders["compiled"].train_step, sizes.device)
        train = compare_calls(
            {k: c.train_step for k, c in contenders.items()},
            warmup=warmup,
            repeats=repeats,
            device=sizes.device,
        )
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
        notes.append(f"training step not measured: {_reason(error)}")

    def speedup(timings: dict[str, Timing], other: str) -> Speedup | None:
        return Speedup.of(timings[other], timings["main"]) if other in timings else None

    def compiled_speedup(timings: dict[str, Timing]) -> Speedup | None:
        return Speedup.of(timings["main"], timings["compiled"]) if "compiled" in timings else None

    fwd_ms, fwd_q1, fwd_q3 = _quartiles_ms(forward["main"])
    train_ms, train_q1, train_q3 = _quartiles_ms(train.get("main"))
    return BenchRow(
        name=spec.name,
        batch=sizes.batch,
        width=sizes.width,
        extent=sizes.extent,
        dtype=str(sizes.dtype).removeprefix("torch."),
        device=str(sizes.device),
        threads=torch.get_num_threads(),
        params=params,
        gflops=gflops,
        train_gflops=train_gflops,
        forward_ms=fwd_ms,
        forward_q1_ms=fwd_q1,
        forward_q3_ms=fwd_q3,
        train_ms=train_ms,
        train_q1_ms=train_q1,
        train_q3_ms=train_q3,
        peak_mib=peak / 2**20,
        float32_forward_ms=forward["float32"].ms if "float32" in forward else None,
        float32_train_ms=train["float32"].ms if "float32" in train else None,
        speedup_vs_float32_forward=speedup(forward, "float32"),
        speedup_vs_float32_train=speedup(train, "float32"),
        compiled_forward_ms=forward["compiled"].ms if "compiled" in forward else None,
        compiled_train_ms=train["compiled"].ms if "compiled" in train else None,
        compile_s=compile_s if compile else None,
        compile_speedup_forward=compiled_speedup(forward),
        compile_speedup_train=compiled_speedup(train),
        notes=tuple(notes),
    )


def _ms(value: float | None, q1: float | None = None, q3: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" [{q1:.2f}-{q3:.2f}]" if q1 is not None and q3 is not None else "")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _columns(rows: Sequence[BenchRow]) -> list[tuple[str, Callable[[BenchRow], str]]]:
    columns: list[tuple[str, Callable[[BenchRow], str]]] = [
        ("module", lambda r: r.name),
        ("B", lambda r: str(r.batch)),
        ("width", lambda r: str(r.width)),
        ("extent", lambda r: str(r.extent)),
        ("params", lambda r: f"{r.params:,}"),
        ("GFLOPs fwd", lambda r: _num(r.gflops, "{:.4g}")),
        ("GFLOPs fwd+bwd", lambda r: _num(r.train_gflops, "{:.4g}")),
        ("fwd ms [IQR]", lambda r: _ms(r.forward_ms, r.forward_q1_ms, r.forward_q3_ms)),
        ("fwd+bwd ms [IQR]", lambda r: _ms(r.train_ms, r.train_q1_ms, r.train_q3_ms)),
        ("peak MiB", lambda r: _num(r.peak_mib, "{:.1f}")),
    ]
    if any(r.float32_forward_ms is not None for r in rows):
        columns += [
            ("float32 fwd ms", lambda r: _ms(r.float32_forward_ms)),
            ("fwd speed-up", lambda r: str(r.speedup_vs_float32_forward or "-")),
            ("float32 fwd+bwd ms", lambda r: _ms(r.float32_train_ms)),
            ("fwd+bwd speed-up", lambda r: str(r.speedup_vs_float32_train or "-")),
        ]
    if any(r.compile_s is not None for r in rows):
        columns += [
            ("compiled fwd ms", lambda r: _ms(r.compiled_forward_ms)),
            ("fwd gain", lambda r: str(r.compile_speedup_forward or "-")),
            ("compiled fwd+bwd ms", lambda r: _ms(r.compiled_train_ms)),
            ("fwd+bwd gain", lambda r: str(r.compile_speedup_train or "-")),
            ("compile s", lambda r: _num(r.compile_s, "{:.1f}")),
        ]
    return columns


def format_table(rows: Sequence[BenchRow]) -> str:
    """A Markdown table (readable in a terminal as is), with footnotes: notes and what each
    figure measures."""
    columns = _columns(rows)
    header = [title for title, _ in columns]
    body = [[cell(row) for _, cell in columns] for row in rows]
    widths = [max(len(c) for c in column) for column in zip(header, *body)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    notes = [f"- {row.name}: {note}" for row in rows for note in row.notes]
    dtype = rows[0].dtype if rows else ""
    legend = [
        "ms: median of the repeats [interquartile range]. " + PEAK_MEMORY_NOTE + ".",
        "GFLOPs: matmuls, convolutions and the fused attention kernel (multiply-add = 2); "
        "fwd+bwd is one training step.",
    ]
    if any(r.float32_forward_ms is not None for r in rows):
        legend.append(
            f"speed-up: float32 time / {dtype} time, median of the per-repeat ratios (repeats "
            "interleaved); ~ marks a ratio whose range includes 1 (inside the noise)."
        )
    if any(r.compile_s is not None for r in rows):
        legend.append(
            "gain: eager time / torch.compile time, median of the per-repeat ratios (interleaved); "
            "~ marks a ratio whose range includes 1. compile s: the first compiled forward and "
            "training step."
        )
    return "\n".join([line(header), rule, *(line(b) for b in body), "", *legend, *notes])


def _plain(row: BenchRow) -> dict[str, Any]:
    out = asdict(row)  # a Speedup becomes {"median": ..., "low": ..., "high": ...}
    out["notes"] = list(row.notes)
    return out


def to_json(rows: Sequence[BenchRow]) -> str:
    return json.dumps([_plain(r) for r in rows], indent=2)


def to_csv(rows: Sequence[BenchRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(BenchRow.__dataclass_fields__))
    writer.writeheader()
    for row in rows:
        flat = {}
        for key, value in _plain(row).items():
            if isinstance(value, dict):
                value = f"{value['median']:.4g} [{value['low']:.4g}-{value['high']:.4g}]"
            elif isinstance(value, list):
                value = "; ".join(value)
            flat[key] = "" if value is None else value
        writer.writerow(flat)
    return buffer.getvalue()
