"""Benchmark rows for `attnzoo bench`: one registered module at one size."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from attnzoo.bench.measure import count_flops, peak_memory, time_call
from attnzoo.registry import ModuleSpec, Sizes

__all__ = ["BenchRow", "bench_module", "format_table", "to_csv", "to_json"]


@dataclass(frozen=True)
class BenchRow:
    """Measurements of one module; times in milliseconds, memory in MiB, FLOPs in GFLOPs."""

    name: str
    batch: int
    width: int
    extent: int
    dtype: str
    threads: int
    params: int
    gflops: float
    forward_ms: float
    train_ms: float
    peak_mib: float


def _first(result: object) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result  # type: ignore[return-value]


def bench_module(spec: ModuleSpec, sizes: Sizes, *, repeats: int = 5, warmup: int = 2) -> BenchRow:
    """Params, FLOPs, forward latency (eval, no grad), forward+backward latency (train) and the
    peak memory of the forward pass of ``spec`` at ``sizes``."""
    torch.manual_seed(0)
    module = spec.build(sizes)
    inputs = spec.example_inputs(sizes)
    params = sum(p.numel() for p in module.parameters())

    module.eval()

    def forward() -> None:
        with torch.no_grad():
            module(*inputs)

    flops = count_flops(forward)
    forward_time = time_call(forward, warmup=warmup, repeats=repeats, device=sizes.device)
    peak = peak_memory(forward, device=sizes.device)

    module.train()
    grad_inputs = tuple(x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs)

    def train_step() -> None:
        out = _first(module(*grad_inputs))
        out.float().square().mean().backward()

    train_time = time_call(train_step, warmup=warmup, repeats=repeats, device=sizes.device)
    return BenchRow(
        name=spec.name,
        batch=sizes.batch,
        width=sizes.width,
        extent=sizes.extent,
        dtype=str(sizes.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        params=params,
        gflops=flops / 1e9,
        forward_ms=forward_time.ms,
        train_ms=train_time.ms,
        peak_mib=peak / 2**20,
    )


_COLUMNS = (
    ("name", "module", "{}"),
    ("batch", "B", "{}"),
    ("width", "width", "{}"),
    ("extent", "extent", "{}"),
    ("params", "params", "{:,}"),
    ("gflops", "GFLOPs", "{:.4g}"),
    ("forward_ms", "fwd ms", "{:.2f}"),
    ("train_ms", "fwd+bwd ms", "{:.2f}"),
    ("peak_mib", "peak MiB", "{:.1f}"),
)


def format_table(rows: Sequence[BenchRow]) -> str:
    """A Markdown table (readable in a terminal as is)."""
    header = [title for _, title, _ in _COLUMNS]
    body = [[fmt.format(getattr(row, key)) for key, _, fmt in _COLUMNS] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *body)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(b) for b in body)])


def to_json(rows: Sequence[BenchRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)


def to_csv(rows: Sequence[BenchRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(BenchRow.__dataclass_fields__))
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return buffer.getvalue()
