"""Training steps of ``attend``: keeping the weights against the fused kernel, by head width and length.

A training step of unmasked attention either runs ``scaled_dot_product_attention`` (the fused
kernel keeps the softmax's log-sum-exp and recomputes ``q k^T`` in the backward: five products) or
keeps the weights P for the backward (four products, and P's N_q x N_k per head held until then).
``attend`` keeps them for heads at least 256 wide and at most 512 queries and keys
(``attnzoo.functional.attend._keeps_weights``); this benchmark shows the grid that rule comes from.
Each row times ``attend`` (whichever path it picks) against the fused kernel called directly,
forward + backward of the sum with gradients to q, k and v, interleaved repeats; peak memory is that
of the live tensors over one step. Ratios are attend / fused: where the rule keeps the fused kernel
the two run the same computation, and the ratio reads about 1.0 (its spread is this machine's noise).

Usage::

    python benchmarks/bench_kept_weights.py              # the grid, float32
    python benchmarks/bench_kept_weights.py --quick      # two widths, shorter lengths
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from attnzoo.functional.attend import _keeps_weights, attend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer import HEADER, add_device_argument, format_row, measure_pair, preamble, training, use_device

#: (batch, heads, head width): one wide head (a single-head attention over d 256 or 512 features),
#: and multi-head layers of 512 features split into 4 or 8 heads
SHAPES = ((8, 1, 256), (8, 1, 512), (8, 4, 128), (8, 8, 64))
LENGTHS = (128, 512, 1024, 2048)
QUICK_SHAPES = ((8, 1, 256), (8, 8, 64))
QUICK_LENGTHS = (128, 512, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two head widths, shorter lengths")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per row (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    add_device_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_device(args.device)

    print(f"# attend's training step against the fused kernel: {preamble(args.repeats)}\n")
    print(HEADER)
    for batch, heads, width in QUICK_SHAPES if args.quick else SHAPES:
        for n in QUICK_LENGTHS if args.quick else LENGTHS:
            torch.manual_seed(0)
            q, k, v = (torch.randn(batch, heads, n, width) for _ in range(3))
            probe = q.detach().requires_grad_()
            path = "keeps weights" if _keeps_weights(probe, k, v, 0.0) else "fused"
            with torch.no_grad():
                torch.testing.assert_close(attend(q, k, v), F.scaled_dot_product_attention(q, k, v))
            result = measure_pair(
                training(attend, [], q, k, v),
                training(F.scaled_dot_product_attention, [], q, k, v),
                warmup=1,
                repeats=args.repeats,
            )
            size = f"B {batch}, h {heads}, d {width}, N {n}"
            print(
                format_row(f"attend ({path})", "fused kernel", size, q.dtype, "training", result), flush=True
            )
            del q, k, v, probe
            gc.collect()


if __name__ == "__main__":
    main()
