"""Shared measuring for the peer comparisons of bench_gating, bench_criss_cross, bench_selective and
bench_graph_attention: attnzoo against a peer library's computation, time and peak memory, one table.

Each contender is a zero-argument callable (inference: eval + no_grad; training: train mode, forward
+ backward of the sum). Times are medians of interleaved repeats (``compare_calls``), with the
spread (min-max) of each; peak memory is the peak of the bytes held by live tensors over one call
(``peak_tensor_memory``: the profiler's memory timeline on CPU, the caching allocator's peak on
CUDA), after a warm-up call, the median of three measurements (the first profiled call of a
process can count more, and a profiled call now and then misses an allocation). It repeats from call to
call: the resident-set high-water mark (``peak_memory``) used before moved by +-25 % between
identical runs at these sizes, more than the differences between the contenders. Ratios are
ours / peer: below 1 is better.

``--device cuda`` (``add_device_argument``, ``use_device``) runs both contenders on a GPU: every
tensor and module the script builds goes there, and each timed call is synchronised.
"""

from __future__ import annotations

import argparse
import importlib
import platform
from collections.abc import Callable
from types import ModuleType

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


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cpu", help="where both contenders run: cpu (default), cuda or cuda:N"
    )


def use_device(name: str) -> torch.device:
    """Makes ``name`` the default device of every tensor and module the benchmark builds.

    On CUDA, float32 convolutions and matmuls run without TF32 (cuDNN's convolutions would use it
    by default), so that the float32 rows are float32 and the checks that both contenders agree
    hold at float32 tolerances.
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: expected a device such as cpu, cuda or cuda:0") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {name}: expected a CUDA device, but torch sees none")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_default_device(device)
    return device


def installed(package: str) -> ModuleType | None:
    """The peer's own package where it imports here (timm, torch_geometric), else None.

    Where it does, the benchmarks time the peer's own module, loaded with the reproduction's weights
    and checked equal to it first, so each run also tests that the reproduction is faithful.
    """
    try:
        return importlib.import_module(package)
    except Exception:  # timm imports torchvision, which fails against some torch builds
        return None


def peer_label(name: str, package: ModuleType | None) -> str:
    """The peer's name with where its computation came from: its package or the reproduction."""
    if package is None:
        return f"{name} (reproduced)"
    return f"{name} ({package.__name__} {getattr(package, '__version__', '')})".replace(" )", ")")


def copy_in_order(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Loads ``source``'s state into ``target`` entry by entry, in registration order.

    For a peer's own module and its reproduction, whose entries come in the same order under
    other names (timm's ``spatial.conv.conv.weight`` against ``conv.weight``).
    """
    targets, sources = target.state_dict(), source.state_dict()
    shapes = [tuple(t.shape) for t in targets.values()], [tuple(t.shape) for t in sources.values()]
    if shapes[0] != shapes[1]:
        raise ValueError(f"state entries differ: {list(targets)} {shapes[0]} vs {list(sources)} {shapes[1]}")
    with torch.no_grad():
        for mine, theirs in zip(targets.values(), sources.values()):
            mine.copy_(theirs)


def preamble(repeats: int) -> str:
    flags = torch.backends.cpu.get_cpu_capability()
    where = f"{cpu_name()} ({flags}), {torch.get_num_threads()} threads"
    device = torch.get_default_device()
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (host: {where}), float32 without TF32"
    return f"{where}, torch {torch.__version__}, median of {repeats} interleaved repeats"


def measure_pair(
    ours: Callable[[], object],
    peer: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    calls_per_repeat: int = 1,
) -> dict[str, float]:
    """Times (median, min, max in ms per call) and peak memory (MiB) of both contenders.

    ``calls_per_repeat`` > 1 times that many calls in a row per repeat, for calls too short to
    time one by one (the times are still per call; memory is one call's)."""
    device = torch.get_default_device()  # the CUDA figures need a synchronisation around each call
    timed = {"ours": _repeated(ours, calls_per_repeat), "peer": _repeated(peer, calls_per_repeat)}
    timing = compare_calls(timed, warmup=warmup, repeats=repeats, device=device)
    # the median of three measurements each: the first profiled call of a process can count tens
    # of MiB more than every later one (split_attention training at (8, 256, 64^2): 256.4, then
    # 221.8 MiB for both contenders, in either order), and now and then the CPU profiler misses an
    # allocation and counts less (gc's bfloat16 training: 12.0, 8.0, 8.0, 8.0 MiB alone; 4.0 once
    # in a full run, the smaller of two), so neither the smallest nor the largest is kept
    memory = {
        name: sorted(peak_tensor_memory(fn, device=device) for _ in range(3))[1] / MIB
        for name, fn in (("ours", ours), ("peer", peer))
    }
    row: dict[str, float] = {}
    for name in ("ours", "peer"):
        t = timing[name]
        per_call = 1e3 / calls_per_repeat
        row[f"{name}_ms"], row[f"{name}_lo"], row[f"{name}_hi"] = (
            t.median * per_call,
            t.low * per_call,
            t.high * per_call,
        )
        row[f"{name}_mib"] = memory[name]
    return row


def _repeated(fn: Callable[[], object], calls: int) -> Callable[[], object]:
    if calls == 1:
        return fn

    def run() -> None:
        for _ in range(calls):
            fn()

    return run


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
