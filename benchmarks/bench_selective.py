"""Latency of sk, split_attention and scconv against straightforward plain-PyTorch versions.

Each baseline below is the same equation written the obvious way (stack the branches, sum, split,
concatenate), with the same parameter names, so it loads the attnzoo module's weights; the script
checks that both give the same output before timing them.

    python benchmarks/bench_selective.py            # (B=32, C=256, 56x56) and (B=32, C=1024, 14x14)
    python benchmarks/bench_selective.py --quick    # batch 2 (256 channels at 28x28), a smoke run

Inference: eval mode, no_grad; training: train mode (batch statistics), forward + backward of the sum.
Ratios below 1 mean attnzoo is faster; the repeats of the two are interleaved, so compare ratios,
not absolute times, on a shared machine.

``--peers`` compares split_attention instead with timm's ``SplitAttn`` (issue 13; timm/layers/
split_attn.py with its ``RadixSoftmax``, in-place ReLUs, reproduced here because timm imports
torchvision at import time, which this project does not install; where timm imports, its own
``SplitAttn`` is timed instead, checked equal to ours first), at C = 256, 64x64 and C = 64, 32x32,
batch 8, in float32 and bfloat16, inference and training, time and peak memory (``--device cuda``:
on a GPU)::

    python benchmarks/bench_selective.py --peers            # batch 8
    python benchmarks/bench_selective.py --peers --quick    # batch 2
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnzoo
from attnzoo.bench import compare_calls

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

NAMES = ["sk", "split_attention", "scconv"]


class PlainSK(nn.Module):
    """SKNet eqs. 1-6 written directly: stack the branches, sum, pool, softmax, weighted sum."""

    def __init__(self, channels: int, groups: int, rd: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=d, dilation=d, groups=groups, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            )
            for d in (1, 2)
        )
        self.fc = nn.Linear(channels, rd, bias=False)
        self.norm = nn.BatchNorm1d(rd)
        self.act = nn.ReLU()
        self.select = nn.Linear(rd, 2 * channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        feats = torch.stack([branch(x) for branch in self.branches], dim=1)  # (B, M, C, H, W)
        s = feats.sum(dim=1).mean(dim=(2, 3))
        z = self.act(self.norm(self.fc(s)))
        a = self.select(z).view(x.shape[0], 2, -1).softmax(dim=1)
        return (feats * a[..., None, None]).sum(dim=1)


class PlainSplitAttention(nn.Module):
    """ResNeSt split attention written as in the paper's pseudo-code: split, sum, rSoftMax, weighted sum."""

    def __init__(self, channels: int, radix: int, cardinality: int, rd: int) -> None:
        super().__init__()
        self.radix, self.cardinality = radix, cardinality
        self.conv = nn.Conv2d(
            channels, channels * radix, 3, padding=1, groups=cardinality * radix, bias=False
        )
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.fc1 = nn.Conv2d(channels, rd, 1, groups=cardinality)
        self.bn1 = nn.BatchNorm2d(rd)
        self.fc2 = nn.Conv2d(rd, channels * radix, 1, groups=cardinality)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn0(self.conv(x)))
        batch, rchannel = x.shape[:2]
        splits = torch.split(x, rchannel // self.radix, dim=1)
        gap = F.adaptive_avg_pool2d(sum(splits), 1)
        gap = F.relu(self.bn1(self.fc1(gap)))
        atten = self.fc2(gap).view(batch, self.cardinality, self.radix, -1).transpose(1, 2)
        atten = F.softmax(atten, dim=1).reshape(batch, -1, 1, 1)
        attens = torch.split(atten, rchannel // self.radix, dim=1)
        return sum(a * s for a, s in zip(attens, splits))


class PlainSCConv(nn.Module):
    """SCNet eqs. 1-4 written directly on the two halves."""

    def __init__(self, channels: int, pooling_r: int = 4) -> None:
        super().__init__()
        half = channels // 2
        self.pooling_r = pooling_r

        def conv_bn() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(half, half, 3, padding=1, bias=False), nn.BatchNorm2d(half))

        self.k1, self.k2, self.k3, self.k4 = conv_bn(), conv_bn(), conv_bn(), conv_bn()

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = torch.split(x, x.shape[1] // 2, dim=1)
        t1 = F.avg_pool2d(x1, self.pooling_r)
        x1p = F.interpolate(self.k2(t1), size=x1.shape[-2:], mode="bilinear", align_corners=False)
        y1 = self.k4(self.k3(x1) * torch.sigmoid(x1 + x1p))
        y2 = self.k1(x2)
        return F.relu(torch.cat([y1, y2], dim=1))


class TimmSplitAttn(PlainSplitAttention):
    """timm's ``SplitAttn`` forward (timm/layers/split_attn.py), ``RadixSoftmax`` inlined."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn0(self.conv(x)), inplace=True)  # act0 = act_layer(inplace=True)
        batch, rchannels, height, width = x.shape
        if self.radix > 1:
            x = x.reshape((batch, self.radix, rchannels // self.radix, height, width))
            x_gap = x.sum(dim=1)
        else:
            x_gap = x
        x_gap = x_gap.mean((2, 3), keepdim=True)
        x_gap = F.relu(self.bn1(self.fc1(x_gap)), inplace=True)
        x_attn = self.fc2(x_gap)
        if self.radix > 1:  # RadixSoftmax
            x_attn = x_attn.view(batch, self.cardinality, self.radix, -1).transpose(1, 2)
            x_attn = F.softmax(x_attn, dim=1).reshape(batch, -1)
        else:
            x_attn = torch.sigmoid(x_attn)
        x_attn = x_attn.view(batch, -1, 1, 1)
        if self.radix > 1:
            out = (x * x_attn.reshape((batch, self.radix, rchannels // self.radix, 1, 1))).sum(dim=1)
        else:
            out = x * x_attn
        return out.contiguous()


TIMM = installed("timm")


def timm_split_attn(ours: nn.Module) -> nn.Module:
    """timm's own ``SplitAttn`` where timm imports and its widths can match ours, else the reproduction."""
    channels, radix, cardinality, rd = ours.channels, ours.radix, ours.cardinality, ours.rd_channels
    if TIMM is not None and rd % radix == 0:  # timm's attention width is rd_channels * radix
        return TIMM.layers.SplitAttn(
            channels, groups=cardinality, radix=radix, rd_channels=rd // radix, norm_layer=nn.BatchNorm2d
        )
    return TimmSplitAttn(channels, radix, cardinality, rd)


def peers_table(
    batch: int, repeats: int, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
) -> list[str]:
    """C 64 and 256 at 32x32, C 256 at 64x64, then (2, 16, 4, 4), where the arithmetic is
    negligible: the per-call cost (Python and, on a GPU, kernel launches), 200 calls per repeat."""
    rows = [preamble(repeats), "", HEADER]
    print("\n".join(rows), flush=True)
    for channels, side in [(64, 32), (256, 32), (256, 64)]:
        for dtype in dtypes:
            rows += _peer_rows((batch, channels, side, side), dtype, repeats)
    for dtype in dtypes:
        rows += _peer_rows((2, 16, 4, 4), dtype, repeats, calls_per_repeat=200)
    return rows


def _peer_rows(
    shape: tuple[int, int, int, int], dtype: torch.dtype, repeats: int, calls_per_repeat: int = 1
) -> list[str]:
    """Inference and training rows of split_attention against timm's SplitAttn at one shape."""
    torch.manual_seed(0)
    ours = attnzoo.create("split_attention", shape[1])
    peer = timm_split_attn(ours)
    peer.load_state_dict(ours.state_dict())  # the same entry names in timm's and ours
    label = peer_label("timm SplitAttn", None if isinstance(peer, TimmSplitAttn) else TIMM)
    ours, peer = ours.to(dtype), peer.to(dtype)
    x = torch.randn(*shape).to(dtype)
    ours.eval(), peer.eval()
    with torch.no_grad():
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(ours(x), peer(x), rtol=tol, atol=tol)
    size = f"{shape}" + (" (per call)" if calls_per_repeat > 1 else "")
    timing = {"warmup": 1, "repeats": repeats, "calls_per_repeat": calls_per_repeat}
    rows = []
    r = measure_pair(inference(ours, x), inference(peer, x), **timing)
    rows.append(format_row("split_attention", label, size, dtype, "inference", r))
    print(rows[-1], flush=True)
    ours.train(), peer.train()
    r = measure_pair(
        training(ours, list(ours.parameters()), x), training(peer, list(peer.parameters()), x), **timing
    )
    rows.append(format_row("split_attention", label, size, dtype, "training", r))
    print(rows[-1], flush=True)
    return rows


def build(name: str, channels: int) -> tuple[nn.Module, nn.Module]:
    if name == "sk":
        ours = attnzoo.create("sk", channels, groups=math.gcd(32, channels))
        plain = PlainSK(channels, math.gcd(32, channels), ours.rd_channels)
    elif name == "split_attention":
        ours = attnzoo.create("split_attention", channels)
        plain = PlainSplitAttention(channels, ours.radix, ours.cardinality, ours.rd_channels)
    else:
        ours = attnzoo.create("scconv", channels)
        plain = PlainSCConv(channels, ours.pooling_r)
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def timings(
    ours: nn.Module, plain: nn.Module, x: Tensor, warmup: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """(ours ms, plain ms) for inference forward and training forward+backward, repeats interleaved."""
    ours.eval(), plain.eval()

    def infer(module: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                module(x)

        return run

    forward = compare_calls({"ours": infer(ours), "plain": infer(plain)}, warmup=warmup, repeats=repeats)
    ours.train(), plain.train()
    xg = x.detach().requires_grad_()

    def train(module: nn.Module) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            xg.grad = None
            module(xg).sum().backward()

        return run

    backward = compare_calls({"ours": train(ours), "plain": train(plain)}, warmup=warmup, repeats=repeats)
    return {
        "fwd": (forward["ours"].ms, forward["plain"].ms),
        "fwd+bwd": (backward["ours"].ms, backward["plain"].ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="batch 2 instead of 32, fewer repeats")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per entry (default 5; 3 quick)"
    )
    parser.add_argument(
        "--names", nargs="+", default=NAMES, choices=NAMES, help="which mechanisms (default: all three)"
    )
    parser.add_argument("--peers", action="store_true", help="split_attention against timm's SplitAttn")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=("float32", "bfloat16"),
        default=["float32", "bfloat16"],
        help="--peers: the dtypes to run (default both)",
    )
    add_device_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.peers:
        use_device(args.device)
        dtypes = tuple(getattr(torch, name) for name in args.dtypes)
        rows = peers_table(2 if args.quick else 8, args.repeats or (3 if args.quick else 7), dtypes)
        print("\n" + "\n".join(rows))
        return
    batch = 2 if args.quick else 32
    repeats = args.repeats or (3 if args.quick else 5)
    warmup = 1 if args.quick else 2
    # the quick run keeps both channel widths but halves the large feature map
    sizes = [(256, 28), (1024, 14)] if args.quick else [(256, 56), (1024, 14)]

    print(
        f"threads: {torch.get_num_threads()}, batch: {batch}, median of {repeats} interleaved repeats, "
        f"torch {torch.__version__}\n"
    )
    print("| module | input (B, C, H, W) | pass | attnzoo ms | plain ms | ratio |")
    print("|---|---|---|---:|---:|---:|")
    for name in args.names:
        for channels, side in sizes:
            ours, plain = build(name, channels)
            x = torch.randn(batch, channels, side, side)
            ours.eval(), plain.eval()
            with torch.no_grad():
                torch.testing.assert_close(ours(x), plain(x), rtol=1e-4, atol=1e-4)
            shape = f"({batch}, {channels}, {side}, {side})"
            for label, (ours_ms, plain_ms) in timings(ours, plain, x, warmup, repeats).items():
                times = f"{ours_ms:.1f} | {plain_ms:.1f} | {ours_ms / plain_ms:.2f}"
                print(f"| {name} | {shape} | {label} | {times} |", flush=True)


if __name__ == "__main__":
    main()
