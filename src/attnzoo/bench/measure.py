"""Latency, peak memory and FLOPs of a callable, measured the same way everywhere.

Latency is the median of several repeats after warm-up, with its spread (the interquartile range
and the extremes of the repeats): these machines are shared and noisy, so compare ratios against a
baseline measured in the same run, with the repeats interleaved (:func:`compare_calls`), and read a
difference that lies inside the spread as noise.

FLOPs are counted by ``torch.utils.flop_counter`` with the CPU flash-attention kernels added (the
counter knows only the CUDA ones, so without them the fused attention core counted as 0), forward
and backward.

Peak memory on CPU is the process's resident-set high-water mark during the call, minus the
resident set before it: Linux resets the mark through ``/proc/self/clear_refs``, so the figure
includes every temporary a kernel allocates, not only the tensors a profiler sees (allocations of
64 KiB and more are given their own mappings during the call, so freed memory is not reused
silently; smaller ones are not counted reliably). On CUDA it is
``torch.cuda.max_memory_allocated`` minus the allocation before the call.

:func:`peak_tensor_memory` counts tensors only, deterministically: the peak of the bytes held by
live tensors during the call (PyTorch's profiler memory timeline on CPU, the caching allocator's
peak on CUDA). It misses what kernels allocate outside PyTorch's allocator, but unlike the
resident set it does not move with the C library's heap: compare two contenders with it where
their figures are a few MiB apart (the resident-set figure of one training step has varied by
+-25 % between identical runs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Timing",
    "compare_calls",
    "count_flops",
    "paired_ratio",
    "peak_memory",
    "peak_tensor_memory",
    "time_call",
]


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the spread of the repeats (``samples`` keeps them in order)."""

    median: float
    low: float
    high: float
    repeats: int
    samples: tuple[float, ...] = ()

    @property
    def ms(self) -> float:
        return self.median * 1e3

    @property
    def quartiles(self) -> tuple[float, float]:
        """(first, third) quartile of the repeats, in seconds (the extremes below four repeats)."""
        if len(self.samples) < 4:
            return self.low, self.high
        first, _, third = statistics.quantiles(self.samples, n=4, method="inclusive")
        return first, third

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        return cls(statistics.median(samples), min(samples), max(samples), len(samples), tuple(samples))


def paired_ratio(ours: Timing, base: Timing) -> tuple[float, float, float]:
    """Median, min and max of ``ours / base`` over interleaved repeats (round i against round i).

    Both timings must come from one :func:`compare_calls` run: each round exposes both callables to
    the same load, so the per-round ratio cancels the load that the absolute times carry. A range
    that contains 1.0 means that the difference lies inside the noise of this run.
    """
    if not ours.samples or len(ours.samples) != len(base.samples):
        raise ValueError("paired_ratio: expected two timings with the same number of samples")
    ratios = [a / b for a, b in zip(ours.samples, base.samples)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    repeats: int = 5,
    device: torch.device | str | None = None,
) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return Timing.of(samples)


def compare_calls(
    calls: dict[str, Callable[[], object]],
    *,
    warmup: int = 2,
    repeats: int = 5,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time several callables with their repeats interleaved (a, b, a, b, ...).

    On a shared machine the load changes over seconds; interleaving exposes every contender to the
    same load, so their ratio is steadier than with one block of repeats after the other.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, got {repeats}")
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: Timing.of(s) for name, s in samples.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def peak_memory(fn: Callable[[], object], *, device: torch.device | str | None = None) -> int:
    """Extra bytes at the peak of ``fn()`` over what was in use before the call.

    CPU: resident-set high-water mark (Linux only). CUDA: the caching allocator's peak.
    The result of ``fn`` is dropped inside the measurement, so it counts toward the peak.
    """
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    libc = _libc()
    if libc is not None:
        # glibc serves allocations below its (adaptive, up to 32 MiB) mmap threshold from a heap it
        # keeps after free: a second call then reuses pages already resident and shows no growth.
        # During the call every allocation of 64 KiB or more gets its own mapping, returned on
        # free, so the resident set follows the live tensors.
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)
    try:
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current resident set
        except OSError as error:
            raise RuntimeError("peak_memory on CPU needs Linux's /proc/self/clear_refs") from error
        before = _status_kb("VmRSS")
        fn()
        return max(0, _status_kb("VmHWM") - before) * 1024
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's adaptive ceiling


def peak_tensor_memory(fn: Callable[[], object], *, device: torch.device | str | None = None) -> int:
    """Extra bytes held by live tensors at the peak of ``fn()`` over those held before the call.

    CPU: every allocation and free of PyTorch's CPU allocator during the call, from the profiler's
    memory timeline (``torch.profiler`` with ``profile_memory``), summed in time order; the same
    call gives the same figure. CUDA: :func:`peak_memory` (the caching allocator's peak is already
    tensor-level). The result of ``fn`` is dropped inside the measurement, so it counts toward the
    peak. Slower than :func:`peak_memory` (the profiler records every operator).
    """
    if device is not None and torch.device(device).type == "cuda":
        return peak_memory(fn, device=device)
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    gc.collect()
    # The timeline's first entry holds the tensors that existed before the call and are used in it;
    # a tensor made before and touched first guarantees that entry (without one, the first entry
    # would be the call's first allocation, and the baseline would swallow it).
    sentinel = torch.zeros(1)
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        sentinel.add_(1)
        fn()
    # bytes per memory category after each event: (events, categories)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    totals = [sum(row) for row in sizes]
    return max(0, int(max(totals, default=0) - (totals[0] if totals else 0)))


def _flash_cpu_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flash_cpu_backward(  # type: ignore[no-untyped-def]
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _attention_formulas() -> dict[object, Callable[..., int]]:
    """FLOP formulas of the CPU fused-attention kernels, which torch's counter does not know."""
    aten = torch.ops.aten
    formulas: dict[object, Callable[..., int]] = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _flash_cpu_forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _flash_cpu_backward),
    ):
        if hasattr(aten, name):
            formulas[getattr(aten, name)] = formula
    return formulas


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of ``fn()`` as counted by ``torch.utils.flop_counter``.

    Counts matmuls, convolutions and the attention kernels, fused ones included, in the forward
    and, when ``fn`` calls ``backward()``, the backward pass (a multiply-add is 2 FLOPs; the fused
    attention forward is 4 N_q N_k d per head, its backward 2.5 times that: the scores are
    recomputed). Elementwise work is not counted, as in the papers' FLOP tables.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_attention_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())
