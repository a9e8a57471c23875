"""Shared measuring for the peer comparisons of bench_gating, bench_criss_cross, bench_selective and
bench_graph_attention: attnzoo against a peer library's computation, time and peak memory, one table.

Each contender is a zero-argument callable (inference: eval + no_grad; training: train mode, forward
+ backward of the sum). Times are medians of interleaved repeats (``compare_calls``), with the
spread (min-max) of each; peak memory is the peak of the bytes held by live tensors over one call
(``peak_tensor_memory``: the profiler's memory timeline on CPU), after a warm-up call, the smaller
of two measurements (the first profiled call of a process can count more). It repeats from call to
call: the resident-set high-water mark (``peak_memory``) used before moved by +-25 % between
identical runs at these sizes, more than the differences between the contenders. Ratios are
ours / peer: below 1 is better.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import torch

from attnzoo.bench import compare_calls, peak_tensor_memory

MIB = 2**20

HEADER = (
    "| module | peer | size | dtype | pass | ours ms (min-max) | peer ms (min-max) | time ratio "
    "| ours MiB | peer MiB | memory ratio |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def preamble(repeats: int) -> str:
    flags = torch.backends.cpu.get_cpu_capability()
    return (
        f"{cpu_name()} ({flags}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"median of {repeats} interleaved repeats"
    )


def measure_pair(
    ours: Callable[[], object], peer: Callable[[], object], *, warmup: int, repeats: int
) -> dict[str, float]:
    """Times (median, min, max in ms) and peak memory (MiB) of both contenders."""
    timing = compare_calls({"ours": ours, "peer": peer}, warmup=warmup, repeats=repeats)
    # the smaller of two measurements each: the first profiled call of a process can count tens of
    # MiB more than every later one (split_attention training at (8, 256, 64^2): 256.4, then 221.8
    # MiB for both contenders, in either order)
    memory = {
        name: min(peak_tensor_memory(fn) for _ in range(2)) / MIB
        for name, fn in (("ours", ours), ("peer", peer))
    }
    row: dict[str, float] = {}
    for name in ("ours", "peer"):
        t = timing[name]
        row[f"{name}_ms"], row[f"{name}_lo"], row[f"{name}_hi"] = t.median * 1e3, t.low * 1e3, t.high * 1e3
        row[f"{name}_mib"] = memory[name]
    return row


def format_row(module: str, peer: str, size: str, dtype: torch.dtype, label: str, r: dict[str, float]) -> str:
    # below 1 MiB a few small buffers decide the ratio: it reads from 1 MiB up
    ours_mib, peer_mib = max(r["ours_mib"], 1.0), max(r["peer_mib"], 1.0)
    return (
        f"| {module} | {peer} | {size} | {str(dtype).removeprefix('torch.')} | {label} "
        f"| {r['ours_ms']:.2f} ({r['ours_lo']:.2f}-{r['ours_hi']:.2f}) "
        f"| {r['peer_ms']:.2f} ({r['peer_lo']:.2f}-{r['peer_hi']:.2f}) "
        f"| {r['ours_ms'] / r['peer_ms']:.2f} | {r['ours_mib']:.1f} | {r['peer_mib']:.1f} "
        f"| {ours_mib / peer_mib:.2f} |"
    )


def inference(fn: Callable[..., object], *inputs: object) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn(*inputs)

    return run


def training(
    fn: Callable[..., torch.Tensor], params: list[torch.Tensor], *inputs: object
) -> Callable[[], None]:
    """Forward + backward of the sum, gradients to the parameters and every floating input."""
    grad_inputs = tuple(
        t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in inputs
    )

    def run() -> None:
        for p in params:
            p.grad = None
        for t in grad_inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None
        fn(*grad_inputs).float().sum().backward()

    return run
