"""The bench measures: FLOPs of the fused attention kernel against an analytic count, the spread of
timings, and the ratio of interleaved timings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.bench import Timing, count_flops, paired_ratio, peak_tensor_memory
from attnzoo.bench.report import Speedup, bench_module

B, H, NQ, NK, D = 2, 3, 40, 24, 16


def attention_flops(b: int, h: int, nq: int, nk: int, d: int, dv: int) -> tuple[int, int]:
    """Forward: scores Q K^T (2 nq nk d per head) and weights V (2 nq nk dv). Backward: the
    scores recomputed (2 nq nk d), dP = dO V^T (2 nq nk dv), dV = P^T dO (2 nq nk dv),
    dQ = dS K (2 nq nk d), dK = dS^T Q (2 nq nk d)."""
    per_head = b * h * nq * nk
    forward = 2 * per_head * d + 2 * per_head * dv
    backward = 3 * (2 * per_head * d) + 2 * (2 * per_head * dv)
    return forward, backward


def test_the_fused_kernel_is_counted_forward_and_backward():
    # equal head widths for q, k and v: the CPU flash kernel (a value width of its own takes the
    # unfused math path, whose matmuls were always counted)
    q = torch.randn(B, H, NQ, D, requires_grad=True)
    k = torch.randn(B, H, NK, D, requires_grad=True)
    v = torch.randn(B, H, NK, D, requires_grad=True)
    forward, backward = attention_flops(B, H, NQ, NK, D, D)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == forward
    total = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert total == forward + backward


def test_a_masked_fused_call_is_counted():
    q = torch.randn(B, H, NQ, D)
    mask = torch.ones(NQ, NQ, dtype=torch.bool).tril()
    forward, _ = attention_flops(B, H, NQ, NQ, D, D)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask)) == forward


def test_mha_counts_projections_and_attention():
    # the case: mha at N = 1024 reported only its projections (0.27 of 2.4 GFLOPs)
    n, e, heads = 256, 32, 4
    module = attnzoo.create("mha", e, heads).eval()
    x = torch.randn(1, n, e)
    with torch.no_grad():
        flops = count_flops(lambda: module(x))
    projections = 4 * 2 * n * e * e
    core, _ = attention_flops(1, heads, n, n, e // heads, e // heads)
    assert flops == projections + core


def test_bench_counts_the_attention_module():
    spec = attnzoo.get_spec("attention")  # no parameters: the whole cost is the kernel
    row = bench_module(spec, spec.sizes(batch=2, width=16, extent=8), repeats=1, warmup=0)
    assert row.params == 0 and row.gflops > 0 and row.train_gflops > row.gflops


def test_timing_spread_and_paired_ratio():
    base = Timing.of([1.0, 2.0, 1.0, 2.0, 1.0])
    ours = Timing.of([1.1, 2.2, 1.1, 2.2, 1.1])  # 10% slower in every round, under a changing load
    assert base.low <= base.quartiles[0] <= base.median <= base.quartiles[1] <= base.high
    median, low, high = paired_ratio(ours, base)
    assert median == pytest.approx(1.1) and low == pytest.approx(1.1) and high == pytest.approx(1.1)
    assert not Speedup.of(ours, base).within_noise  # a clear 1.1x, though the times overlap
    noisy = Timing.of([0.9, 2.4, 1.0, 1.8, 1.3])
    assert Speedup.of(noisy, base).within_noise and str(Speedup.of(noisy, base)).endswith("~")
    with pytest.raises(ValueError, match="same number of samples"):
        paired_ratio(Timing.of([1.0]), base)


def test_peak_tensor_memory_counts_live_tensors_exactly():
    # a, then b = 2a alongside it, then c = 3b: three 4 MB buffers live at once; b is freed before
    # d, so the peak stays at three (a result dropped inside the call still counts)
    n = 1_000_000  # float32 elements: 4 MB per buffer

    def three_live() -> torch.Tensor:
        a = torch.ones(n)
        b = a * 2
        c = b * 3
        del b
        return a + c

    def one_at_a_time() -> None:
        for _ in range(3):
            torch.ones(n)

    figures = [peak_tensor_memory(three_live) for _ in range(2)]
    assert figures[0] == figures[1]  # deterministic, unlike the resident set
    assert abs(figures[0] - 3 * 4 * n) <= 4096
    assert abs(peak_tensor_memory(one_at_a_time) - 4 * n) <= 4096
