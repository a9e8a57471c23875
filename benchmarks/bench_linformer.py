"""Linformer against multi-head attention: forward + backward time and peak memory by length.

Linformer (arXiv:2006.04768) projects keys and values to k rows, so its attention costs O(N k d)
where multi-head attention costs O(N^2 d). Both run at d = 256, h = 4, batch 1, k = 256, for
N = 1024, 4096, 16384 (``--quick``: 512, 1024, 2048, for a smoke run). ``mha`` takes the fused
kernel (no N x N matrix is stored, so its memory is O(N d) too): the time column is where the
linear cost shows; memory shows Linformer's n x k maps and E, F against the kernel's working set.

Time: median of repeats after warm-up (``attnzoo.bench.time_call``); memory: resident-set
high-water mark over one forward + backward after one warm-up pass (``attnzoo.bench.peak_memory``),
each in a fresh child process started with ``MALLOC_MMAP_THRESHOLD_`` fixed, so that glibc returns
large freed buffers to the system and one measurement's freed pages do not hide the next one's
peak. Ratios are linformer / mha, both measured in the same run (compare ratios, not absolute
numbers, across machines).

Usage::

    python benchmarks/bench_linformer.py --quick
    python benchmarks/bench_linformer.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from attnzoo.bench import peak_memory, time_call
from attnzoo.sequence.linformer import Linformer
from attnzoo.sequence.mha import MultiheadAttention

FULL_LENGTHS = (1024, 4096, 16384)
QUICK_LENGTHS = (512, 1024, 2048)


def forward_backward(module: nn.Module, x: Tensor) -> Callable[[], tuple[Tensor, ...]]:
    """One forward and backward pass; the gradients are returned (and so counted by the memory
    measurement) rather than accumulated into ``.grad`` across calls."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> tuple[Tensor, ...]:
        out = module(x)
        return torch.autograd.grad(out.square().mean(), [x, *params])

    return step


def build(name: str, n: int, d: int, h: int, k: int) -> nn.Module:
    if name == "mha":
        return MultiheadAttention(d, h)
    return Linformer(d, h, max_seq_len=n, proj_dim=k)


def measure_time(module: nn.Module, x: Tensor, warmup: int, repeats: int) -> float:
    """Milliseconds of one forward + backward (median)."""
    return time_call(forward_backward(module, x), warmup=warmup, repeats=repeats).ms


def measure_memory(name: str, n: int, d: int, h: int, k: int, threads: int) -> float:
    """MiB at the peak of one forward + backward, measured in a fresh child process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    command = [sys.executable, __file__, "--child", name, str(n), str(d), str(h), str(k), str(threads)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 2**20


def child(name: str, n: int, d: int, h: int, k: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(1, n, d, requires_grad=True)
    step = forward_backward(build(name, n, d, h, k), x)
    step()  # warm-up: thread pools and kernel set-up are not the mechanism's memory
    print(peak_memory(step))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        name, *sizes = sys.argv[2:]
        child(name, *(int(v) for v in sizes))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller lengths, fewer repeats (smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="override the lengths N")
    parser.add_argument("--dim", type=int, default=256, help="model width d (default 256)")
    parser.add_argument("--heads", type=int, default=4, help="heads h (default 4)")
    parser.add_argument("--proj-dim", type=int, default=256, help="Linformer's k (default 256)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 2; quick 1)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    repeats = args.repeats or (3 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    d, h, k = args.dim, args.heads, args.proj_dim

    print(
        f"# linformer vs mha, forward + backward: d={d}, h={h}, k={k}, batch 1, "
        f"{args.threads} threads, torch {torch.__version__}, median of {repeats} after {warmup} warm-up\n"
    )
    print("| N | mha ms | linformer ms | time ratio | mha MiB | linformer MiB | memory ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in lengths:
        x = torch.randn(1, n, d, requires_grad=True)
        mha_ms = measure_time(build("mha", n, d, h, k), x, warmup, repeats)
        lin_ms = measure_time(build("linformer", n, d, h, k), x, warmup, repeats)
        mha_mib = measure_memory("mha", n, d, h, k, args.threads)
        lin_mib = measure_memory("linformer", n, d, h, k, args.threads)
        memory_ratio = f"{lin_mib / mha_mib:.2f}" if mha_mib > 0 else "n/a"
        print(
            f"| {n} | {mha_ms:.1f} | {lin_ms:.1f} | {lin_ms / mha_ms:.2f} | {mha_mib:.1f} | {lin_mib:.1f} | "
            f"{memory_ratio} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
