"""Peak memory and forward time of the non-local family against materialised-matrix baselines.

The peers (MMCV, timm, the popular catalog repository) compute these blocks as
``softmax(bmm(theta^T, phi)) @ g`` on views of the NCHW map, which materialises the (HW x HW)
matrix: 1 GiB per image at 128 x 128 in float32. attnzoo routes the same computation through the
fused attention kernel, so its peak memory grows linearly with HW. This script runs both, with the
same weights, and prints a Markdown table with the ratios (targets at 128 x 128: attnzoo's peak
memory at most a quarter of the baseline's, and its time no worse).

Usage::

    python benchmarks/bench_non_local.py            # H = W = 32, 64, 128 (needs ~3 GiB free)
    python benchmarks/bench_non_local.py --quick    # H = W = 32, 64 only: a smoke run
    python benchmarks/bench_non_local.py --threads 8 --sizes 96 128

Figures on CPU are the resident-set high-water mark over the call (``attnzoo.bench.peak_memory``)
measured in a fresh process per figure (so no earlier call's freed pages hide an allocation), and
the median of several calls (``attnzoo.bench.time_call``); compare ratios within one run.
"""

from __future__ import annotations

import argparse
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnzoo
from attnzoo.bench import peak_memory, time_call

MIB = 2**20


def _conv1x1(x: Tensor, layer: nn.Linear) -> Tensor:
    """A Linear layer's weights applied as the 1x1 convolution the peers use: (B, C, H, W)."""
    return F.conv2d(x, layer.weight[:, :, None, None], layer.bias)


def naive_non_local(module: nn.Module, x: Tensor) -> Tensor:
    """Embedded-Gaussian non-local block as the peers write it (mmcv ``NonLocal2d``)."""
    b, _, h, w = x.shape
    theta = _conv1x1(x, module.theta).view(b, module.inner, -1).permute(0, 2, 1)  # (B, N, C')
    phi = _conv1x1(x, module.phi).view(b, module.inner, -1)  # (B, C', N)
    g = _conv1x1(x, module.g).view(b, module.inner, -1).permute(0, 2, 1)  # (B, N, C')
    pairwise = torch.matmul(theta, phi)  # (B, N, N): the matrix
    if module.use_scale:
        pairwise = pairwise / module.inner**0.5
    pairwise = pairwise.softmax(dim=-1)
    y = torch.matmul(pairwise, g).permute(0, 2, 1).reshape(b, module.inner, h, w)
    z = _conv1x1(y, module.w_z)
    bn = module.norm
    z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return x + z


def naive_sagan(module: nn.Module, x: Tensor) -> Tensor:
    """SAGAN attention as the peers write it (BigGAN-PyTorch / popular repositories)."""
    b, _, h, w = x.shape
    query = _conv1x1(x, module.g).view(b, -1, h * w).permute(0, 2, 1)  # (B, N, C/8)
    key = _conv1x1(x, module.f)
    value = _conv1x1(x, module.h)
    if module.subsample:
        key, value = F.max_pool2d(key, 2), F.max_pool2d(value, 2)
    key = key.view(b, key.shape[1], -1)  # (B, C/8, N')
    value = value.view(b, value.shape[1], -1)  # (B, C_h, N')
    beta = torch.bmm(query, key).softmax(dim=-1)  # (B, N, N')
    o = torch.bmm(value, beta.permute(0, 2, 1)).view(b, -1, h, w)
    return x + module.gamma * _conv1x1(o, module.v)


def naive_danet(module: nn.Module, x: Tensor) -> Tensor:
    """DANet PAM + CAM as in the official ``PAM_Module`` / ``CAM_Module``."""
    b, c, h, w = x.shape
    outs = []
    if module.pam is not None:
        pam = module.pam
        query = _conv1x1(x, pam.query).view(b, -1, h * w).permute(0, 2, 1)
        key = _conv1x1(x, pam.key).view(b, -1, h * w)
        energy = torch.bmm(query, key)  # (B, N, N)
        attention = energy.softmax(dim=-1)
        value = _conv1x1(x, pam.value).view(b, -1, h * w)
        out = torch.bmm(value, attention.permute(0, 2, 1)).view(b, c, h, w)
        outs.append(pam.alpha * out + x)
    if module.cam is not None:
        cam = module.cam
        features = x.view(b, c, -1)
        energy = torch.bmm(features, features.permute(0, 2, 1))
        if cam.variant == "official":
            energy = energy.amax(dim=-1, keepdim=True) - energy
        out = torch.bmm(energy.softmax(dim=-1), features).view(b, c, h, w)
        outs.append(cam.beta * out + x)
    return outs[0] if len(outs) == 1 else outs[0] + outs[1]


def explicit_maps(module: nn.Module, x: Tensor) -> Tensor:
    """Fallback baseline: the module's own explicit path (it materialises its maps)."""
    return module(x, return_attn=True)[0]


@dataclass(frozen=True)
class Case:
    name: str
    baseline: Callable[[nn.Module, Tensor], Tensor]
    baseline_label: str


CASES = [
    Case("non_local", naive_non_local, "bmm + softmax (mmcv)"),
    Case("sagan", naive_sagan, "bmm + softmax"),
    Case("danet", naive_danet, "bmm + softmax (official)"),
    # another file provides criss_cross; its peers do not form an N x N matrix, so the baseline
    # is its own explicit-maps path
    Case("criss_cross", explicit_maps, "its return_attn path"),
]


def perturb(module: nn.Module, seed: int = 0) -> None:
    """Move every parameter off its init (zero gates would make both paths return x)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def build(name: str, channels: int) -> nn.Module:
    """The registered module with deterministic, perturbed weights (the same in every process)."""
    torch.manual_seed(0)
    module = attnzoo.create(name, channels).eval()
    perturb(module)
    return module


def example(channels: int, side: int) -> Tensor:
    return torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(1))


def _case(name: str) -> Case:
    return next(case for case in CASES if case.name == name)


def _memory_in_fresh_process(name: str, channels: int, side: int, path: str, threads: int) -> int:
    """Peak memory of one forward call, measured in a process that has run nothing else.

    The resident-set high-water mark cannot see memory that the allocator reuses: after one large
    call has freed its buffers, a later small call is served from pages that are already resident
    and shows (almost) no growth. A fresh process per measurement keeps the figures honest; a
    4 x 4 warm-up in it keeps one-time costs (library code paged in, thread pools) out.
    """
    torch.set_num_threads(threads)
    module, x = build(name, channels), example(channels, side)
    baseline = _case(name).baseline
    call = (lambda t: module(t)) if path == "fused" else (lambda t: baseline(module, t))
    with torch.no_grad():
        # a tiny warm-up call pages in the kernels' code and starts the thread pool (one-time
        # resident memory that is no part of the call's cost) while freeing almost nothing
        call(example(channels, 4))
        return peak_memory(lambda: call(x))


def run(sizes: list[int], channels: int, repeats: int, threads: int) -> list[dict[str, object]]:
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for case in CASES:
        if case.name not in attnzoo.list_modules():
            print(f"(skipping {case.name}: not registered)")
            continue
        module = build(case.name, channels)
        for side in sizes:
            x = example(channels, side)
            memory = {}
            for path in ("fused", "naive"):
                with spawn.Pool(1, maxtasksperchild=1) as pool:
                    memory[path] = pool.apply(
                        _memory_in_fresh_process, (case.name, channels, side, path, threads)
                    )
            with torch.no_grad():
                diff = (module(x) - case.baseline(module, x)).abs().max().item()
                fused_t = time_call(lambda: module(x), warmup=1, repeats=repeats)
                naive_t = time_call(lambda: case.baseline(module, x), warmup=1, repeats=repeats)
            rows.append(
                {
                    "module": case.name,
                    "baseline": case.baseline_label,
                    "side": side,
                    "fused_ms": fused_t.ms,
                    "naive_ms": naive_t.ms,
                    "fused_mib": memory["fused"] / MIB,
                    "naive_mib": memory["naive"] / MIB,
                    "diff": diff,
                }
            )
            print(f"  done {case.name} {side}x{side}", flush=True)
    return rows


def markdown(rows: list[dict[str, object]], channels: int, threads: int) -> str:
    lines = [
        f"C = {channels}, batch 1, float32, {threads} threads, torch {torch.__version__}",
        "",
        "| module | H x W | N | attnzoo ms | baseline ms | time ratio | attnzoo peak MiB | "
        "baseline peak MiB | memory ratio | max abs diff | baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        side = r["side"]
        time_ratio = r["fused_ms"] / max(r["naive_ms"], 1e-9)
        mem_ratio = r["fused_mib"] / max(r["naive_mib"], 1e-9)
        lines.append(
            f"| {r['module']} | {side} x {side} | {side * side} | {r['fused_ms']:.1f} | "
            f"{r['naive_ms']:.1f} | {time_ratio:.2f} | {r['fused_mib']:.1f} | {r['naive_mib']:.1f} | "
            f"{mem_ratio:.3f} | {r['diff']:.1e} | {r['baseline']} |"
        )
    lines += ["", "Ratios are attnzoo / baseline: below 1 is better."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="H = W = 32 and 64 only (smoke run)")
    parser.add_argument("--sizes", type=int, nargs="+", help="spatial sides to run (default 32 64 128)")
    parser.add_argument("--channels", type=int, default=64, help="C (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = args.sizes or ([32, 64] if args.quick else [32, 64, 128])
    rows = run(sizes, args.channels, args.repeats, args.threads)
    print()
    print(markdown(rows, args.channels, args.threads))


if __name__ == "__main__":
    main()
