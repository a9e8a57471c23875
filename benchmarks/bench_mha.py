"""mha against torch.nn.MultiheadAttention, the attention core against matmul, and memory scaling.

    python benchmarks/bench_mha.py [--threads 2] [--repeats 5] [--quick] [--device cpu|cuda]

Three tables, every ratio against a baseline measured in the same run (repeats interleaved):

1. `mha` vs `torch.nn.MultiheadAttention` (need_weights=False, batch_first, identical weights):
   training forward+backward and inference (eval, no_grad) forward.
   Targets: training ours/torch <= 1.0; inference ours/torch <= 0.7.
2. `attnzoo.functional.attend` at (1, 8, 4096, 64) float32 as GFLOP/s against the matmul rate,
   beside torch's fused kernel called directly (the ceiling: attend dispatches to it).
   Target: at least 80% of the matmul rate.
3. Peak memory of `mha` forward without maps at N = 2048, 8192, 16384 beside the materialised
   (N x N) computation; it must grow linearly in N.
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.bench import compare_calls, peak_memory
from attnzoo.functional import attend
from attnzoo.sequence.mha import MultiheadAttention


def pair(d: int, h: int, device: str) -> tuple[MultiheadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(d, h, batch_first=True, device=device)
    return MultiheadAttention.from_torch(theirs), theirs


def mha_table(sizes: list[tuple[int, int, int, int]], repeats: int, device: str) -> list[str]:
    rows = [
        "| mode | B | N | d | h | torch ms | ours ms | ours / torch | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b, n, d, h in sizes:
        ours, theirs = pair(d, h, device)
        x = torch.randn(b, n, d, device=device, requires_grad=True)

        def train_ours() -> None:
            ours(x).sum().backward()

        def train_theirs() -> None:
            theirs(x, x, x, need_weights=False)[0].sum().backward()

        ours.train(), theirs.train()
        t = compare_calls({"torch": train_theirs, "ours": train_ours}, repeats=repeats, device=device)
        ratio = t["ours"].median / t["torch"].median
        rows.append(
            f"| train fwd+bwd | {b} | {n} | {d} | {h} | {t['torch'].ms:.1f} | {t['ours'].ms:.1f} "
            f"| {ratio:.2f} | <= 1.0 |"
        )

        ours.eval(), theirs.eval()
        xi = x.detach()

        def infer_ours() -> None:
            with torch.no_grad():
                ours(xi)

        def infer_theirs() -> None:
            with torch.no_grad():
                theirs(xi, xi, xi, need_weights=False)

        t = compare_calls({"torch": infer_theirs, "ours": infer_ours}, repeats=repeats, device=device)
        ratio = t["ours"].median / t["torch"].median
        rows.append(
            f"| inference fwd | {b} | {n} | {d} | {h} | {t['torch'].ms:.1f} | {t['ours'].ms:.1f} "
            f"| {ratio:.2f} | <= 0.7 |"
        )
        gc.collect()
    return rows


def core_table(b: int, h: int, n: int, d: int, repeats: int, device: str) -> list[str]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device) for _ in range(3))
    m = 4096
    a, c = torch.randn(m, m, device=device), torch.randn(m, m, device=device)
    t = compare_calls(
        {
            "matmul": lambda: a @ c,
            "attend": lambda: attend(q, k, v),
            # the fused kernel called directly: the ceiling for attend, which only dispatches to it
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        },
        repeats=repeats,
        device=device,
    )
    matmul_rate = 2 * m**3 / t["matmul"].median / 1e9
    flops = 4 * b * h * n * n * d  # QK^T and AV: 2 matmuls

    def row(name: str, label: str) -> str:
        rate = flops / t[name].median / 1e9
        return (
            f"| {label} | ({b}, {h}, {n}, {d}) | {t[name].ms:.1f} | {rate:.1f} | {rate / matmul_rate:.0%} "
            f"| {'>= 80%' if name == 'attend' else ''} |"
        )

    return [
        "| kernel | size | ms | GFLOP/s | share of matmul rate | target |",
        "|---|---|---|---|---|---|",
        f"| matmul fp32 | {m} x {m} x {m} | {t['matmul'].ms:.1f} | {matmul_rate:.1f} | 100% | |",
        row("attend", "attend fp32"),
        row("sdpa", "torch SDPA fp32 (direct)"),
    ]


def memory_table(lengths: list[int], d: int, h: int, naive_limit: int, device: str) -> list[str]:
    rows = [
        "| N | mha fwd peak MiB | materialised N x N peak MiB | ratio |",
        "|---|---|---|---|",
    ]
    ours, _ = pair(d, h, device)
    ours.eval()
    for n in lengths:
        x = torch.randn(1, n, d, device=device)

        def fused() -> None:
            with torch.no_grad():
                ours(x)

        def materialised() -> None:
            with torch.no_grad():
                ours(x, return_attn=True, average_heads=False)

        fused()  # warm-up allocations that are not part of the call's own footprint
        # below 1 MiB the allocator reuses freed pages and the resident-set figure means little
        peak = max(peak_memory(fused, device=device) / 2**20, 1.0)
        if n <= naive_limit:
            naive = peak_memory(materialised, device=device) / 2**20
            naive_text = f"{naive:.0f}"
        else:
            # 2 h N^2 floats (logits and weights) would not fit beside everything else here
            naive = 2 * h * n * n * 4 / 2**20
            naive_text = f"{naive:.0f} (analytic: logits + weights)"
        rows.append(f"| {n} | {peak:.1f} | {naive_text} | {naive / peak:.0f}x |")
        gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        mha_sizes, core, lengths, naive_limit = [(2, 256, 128, 4)], (1, 2, 512, 32), [256, 512, 1024], 1024
    else:
        mha_sizes = [(8, 1024, 512, 8), (1, 4096, 512, 8)]
        core, lengths, naive_limit = (1, 8, 4096, 64), [2048, 8192, 16384], 8192
    print(
        f"threads: {torch.get_num_threads()}, device: {args.device}, "
        f"median of {args.repeats} interleaved repeats\n"
    )
    print("\n".join(mha_table(mha_sizes, args.repeats, args.device)), "\n")
    print("\n".join(core_table(*core, args.repeats, args.device)), "\n")
    print("\n".join(memory_table(lengths, 512, 8, naive_limit, args.device)))


if __name__ == "__main__":
    main()
