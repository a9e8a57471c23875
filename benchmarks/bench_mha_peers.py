"""mha and attention against the peers' computations, side by side in one run (issue 13's rows).

    python benchmarks/bench_mha_peers.py [--threads 2] [--repeats 7] [--quick]

Two tables; ratios are ours / peer (below 1 is better), every pair measured in the same run with
interleaved repeats (medians, min-max spread) and the peak of live tensor bytes of one call
(``benchmarks/_peer.py``).

1. ``mha`` against timm's ``Attention`` (the ViT block's attention): inference forward time and
   peak memory, B = 8, d = 512, h = 8, N = 256 and 1024, float32 and bfloat16. timm cannot be
   installed here (its package imports torchvision at import time), so its computation is
   reproduced below (``TimmAttention``): one packed qkv Linear, ``scaled_dot_product_attention``,
   the heads merged by ``transpose(1, 2).reshape`` and the output Linear, with the same weights as
   ours (checked equal before timing). Where timm imports, its own ``Attention`` is timed instead,
   loaded with the same weights and checked equal to ours.
   The per-call cost, where the arithmetic is negligible (B 1, N 4, d 32, h 4: Python and, on a
   GPU, kernel launches), against timm's ``Attention`` and ``torch.nn.MultiheadAttention``.
2. ``attention`` (score ``scaled_dot``) against keras's ``Attention`` layer as its torch backend
   runs it (reproduced: ``scores = q @ k^T * scale``, softmax, ``weights @ v``), training
   forward + backward, B = 8, d = 256, N = 512 and 2048, float32.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnzoo
from attnzoo.sequence.mha import MultiheadAttention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer import (
    HEADER,
    add_device_argument,
    format_row,
    inference,
    installed,
    measure_pair,
    peer_label,
    preamble,
    training,
    use_device,
)


class TimmAttention(nn.Module):
    """timm's ``Attention`` computation (qk_norm off, no dropout), written from its forward."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    @classmethod
    def like(cls, ours: MultiheadAttention) -> TimmAttention:
        peer = cls(ours.embed_dim, ours.num_heads).to(ours.out_proj.weight.dtype)
        with torch.no_grad():
            projections = (ours.q_proj, ours.k_proj, ours.v_proj)
            peer.qkv.weight.copy_(torch.cat([p.weight for p in projections]))
            peer.qkv.bias.copy_(torch.cat([p.bias for p in projections]))
            peer.proj.load_state_dict(ours.out_proj.state_dict())
        return peer

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        # (B, N, 3C) -> (3, B, h, N, d)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(b, n, c)  # (B, h, N, d) -> (B, N, C)
        return self.proj(x)


TIMM = installed("timm")


def timm_attention(ours: MultiheadAttention) -> tuple[nn.Module, str]:
    """timm's own ``Attention`` where timm imports, else the reproduction; with the peer's label."""
    peer = TimmAttention.like(ours)
    if TIMM is None:
        return peer, peer_label("timm Attention", None)
    # timm 1.0 defines it in the ViT model file; later versions in timm.layers
    attention = getattr(TIMM.layers, "Attention", None) or TIMM.models.vision_transformer.Attention
    real = attention(ours.embed_dim, num_heads=ours.num_heads, qkv_bias=True)
    real.load_state_dict(peer.state_dict())  # the same entries: qkv and proj
    return real, peer_label("timm Attention", TIMM)


def keras_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """keras.layers.Attention (score_mode="dot") as its torch backend computes it."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, v)


def mha_rows(lengths: list[int], dtypes: list[torch.dtype], repeats: int) -> list[str]:
    rows = []
    b, d, h = 8, 512, 8
    for dtype in dtypes:
        torch.manual_seed(0)
        ours = MultiheadAttention(d, h).eval()
        with torch.no_grad():
            for p in (ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias, ours.out_proj.bias):
                p.normal_(0, 0.1)
        peer, label = timm_attention(ours)
        peer = peer.eval().to(dtype)
        ours = ours.to(dtype)
        for n in lengths:
            x = torch.randn(b, n, d, dtype=dtype)
            with torch.no_grad():
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                torch.testing.assert_close(ours(x), peer(x), rtol=tol, atol=tol)
            result = measure_pair(inference(ours, x), inference(peer, x), warmup=1, repeats=repeats)
            size = f"B {b}, N {n}, d {d}, h {h}"
            rows.append(format_row("mha", label, size, dtype, "inference", result))
            gc.collect()
    return rows


def small_call_rows(dtypes: list[torch.dtype], repeats: int) -> list[str]:
    """The per-call cost, where the arithmetic is negligible: B 1, N 4, d 32, h 4, each repeat
    timing 200 calls in a row. On a GPU a small call waits on Python and kernel launches; this
    row measures them on either device."""
    rows = []
    for dtype in dtypes:
        torch.manual_seed(0)
        ours = MultiheadAttention(32, 4).eval()
        timm, timm_label = timm_attention(ours)
        native = nn.MultiheadAttention(32, 4, batch_first=True).eval()
        with torch.no_grad():  # torch packs W^Q, W^K, W^V as the rows of in_proj_weight
            native.in_proj_weight.copy_(timm.state_dict()["qkv.weight"])
            native.in_proj_bias.copy_(timm.state_dict()["qkv.bias"])
            native.out_proj.load_state_dict(ours.out_proj.state_dict())
        ours, timm, native = ours.to(dtype), timm.eval().to(dtype), native.to(dtype)
        x = torch.randn(1, 4, 32, dtype=dtype)
        with torch.no_grad():
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(ours(x), timm(x), rtol=tol, atol=tol)
            torch.testing.assert_close(ours(x), native(x, x, x, need_weights=False)[0], rtol=tol, atol=tol)
        size = "B 1, N 4, d 32, h 4 (per call)"
        for peer, label in (
            (timm, timm_label),
            (lambda x: native(x, x, x, need_weights=False), "torch MultiheadAttention"),
        ):
            result = measure_pair(
                inference(ours, x), inference(peer, x), warmup=1, repeats=repeats, calls_per_repeat=200
            )
            rows.append(format_row("mha", label, size, dtype, "inference", result))
    return rows


def attention_rows(lengths: list[int], repeats: int) -> list[str]:
    rows = []
    b, d = 8, 256
    ours = attnzoo.create("attention", d, score="scaled_dot").train()
    scale = d**-0.5
    for n in lengths:
        torch.manual_seed(0)
        q, k = (torch.randn(b, n, d) for _ in range(2))
        torch.testing.assert_close(ours(q, k), keras_attention(q, k, k, scale), rtol=1e-4, atol=1e-5)
        result = measure_pair(
            training(ours, list(ours.parameters()), q, k),
            training(lambda q, k: keras_attention(q, k, k, scale), [], q, k),
            warmup=1,
            repeats=repeats,
        )
        size, name = f"B {b}, N {n}, d {d}", "attention (scaled_dot)"
        rows.append(format_row(name, "keras Attention", size, torch.float32, "training", result))
        gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="the issue's sizes only, float32, 3 repeats")
    add_device_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_device(args.device)
    repeats = 3 if args.quick else args.repeats
    print(preamble(repeats), "\n")
    print(HEADER)
    if args.quick:
        rows = mha_rows([1024], [torch.float32], repeats) + attention_rows([512], repeats)
    else:
        rows = mha_rows([256, 1024], [torch.float32, torch.bfloat16], repeats)
        rows += small_call_rows([torch.float32, torch.bfloat16], repeats)
        rows += attention_rows([512, 2048], repeats)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
