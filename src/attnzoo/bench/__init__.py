"""Measuring attention modules: latency, peak memory, FLOPs, and the `attnzoo bench` table."""

from attnzoo.bench.measure import (
    Timing,
    compare_calls,
    count_flops,
    paired_ratio,
    peak_memory,
    peak_tensor_memory,
    time_call,
)

__all__ = [
    "Timing",
    "compare_calls",
    "count_flops",
    "paired_ratio",
    "peak_memory",
    "peak_tensor_memory",
    "time_call",
]
