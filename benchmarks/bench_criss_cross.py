"""Peak memory and forward time of criss_cross and feature_bank against materialised baselines.

- ``criss_cross`` (C = 64, batch 1, H = W = 32, 64, 128): attnzoo forms the row and column
  energies, O(HW (H + W)); the baseline is the straightforward implementation that builds the full
  HW x HW energy matrix and masks everything outside the row and column of each position (1 GiB
  per pass at 128 x 128 in float32).
- ``feature_bank`` (N = 64 short-term features, a bank of M = 4096): attnzoo runs each FBO-NL
  block on the fused attention kernel; the baseline materialises the N x M softmax.

Both paths use the same weights and the table reports their largest output difference.

Usage::

    python benchmarks/bench_criss_cross.py                 # the full run (needs ~4 GiB free)
    python benchmarks/bench_criss_cross.py --quick         # small sizes, a smoke run
    python benchmarks/bench_criss_cross.py --threads 8 --sides 64 128 --bank 8192

``--peers`` compares criss_cross instead, in float32 and bfloat16, inference and training, time
and peak memory, against the two pure-PyTorch peers (issue 13), reproduced here from their source
because neither installs beside this project (mmcv needs its compiled ops):

- mmcv's ``CrissCrossAttention`` (mmcv/ops/cc_attention.py, the einsum version),
- fightingcv's ``CrissCrossAttention`` (External-Attention-pytorch, model/attention/
  CrissCrossAttention.py: permute/contiguous/bmm, the official CCNet pure-PyTorch code),

each a single pass applied R = 2 times with the same weights (RCCA), sharing attnzoo's weights::

    python benchmarks/bench_criss_cross.py --peers            # C = 64, batch 1, 32, 64 and 128
    python benchmarks/bench_criss_cross.py --peers --quick    # 32 and 64

Peak memory on CPU is the resident-set high-water mark over one call
(``attnzoo.bench.peak_memory``), each figure measured in a fresh process so that pages freed by an
earlier call cannot hide an allocation; time is the median of several calls
(``attnzoo.bench.time_call``). ``--peers`` measures as ``benchmarks/_peer.py`` does (the peak of
live tensor bytes, interleaved timings). Compare ratios within one run: the machines are shared
and noisy.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnzoo
from attnzoo.bench import peak_memory, time_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer import (
    HEADER,
    add_device_argument,
    format_row,
    inference,
    measure_pair,
    preamble,
    training,
    use_device,
)

MIB = 2**20


# ----------------------------------------------------------------------------------------------
# baselines


def dense_criss_cross_step(module: nn.Module, x: Tensor) -> Tensor:
    """One criss-cross pass through the full HW x HW matrix, masked to each row and column."""
    batch, channels, height, width = x.shape
    q = module.query_conv(x).flatten(2).transpose(1, 2)  # (B, HW, C')
    k = module.key_conv(x).flatten(2)  # (B, C', HW)
    v = module.value_conv(x).flatten(2)  # (B, C, HW)
    energy = torch.bmm(q, k)  # (B, HW, HW): the matrix attnzoo avoids
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    # same row or same column: H + W - 1 keys per query, the centre once
    allowed = (rows[:, None] == rows[None, :]) | (cols[:, None] == cols[None, :])  # (HW, HW)
    weights = energy.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = torch.bmm(v, weights.transpose(1, 2)).view(batch, channels, height, width)
    return module.gamma * out + x if module.gamma is not None else out + x


def dense_criss_cross(module: nn.Module, x: Tensor) -> Tensor:
    for _ in range(module.recurrence):
        x = dense_criss_cross_step(module, x)
    return x


def dense_feature_bank(module: nn.Module, x: Tensor, bank: Tensor) -> Tensor:
    """FBO-NL with the N x M softmax written out (eval: no dropout)."""
    state, memory = module.in_proj(x), module.bank_proj(bank)
    for block in module.layers:
        logits = block.theta(state) @ block.phi(memory).transpose(1, 2) / math.sqrt(block.dim)  # (B, N, M)
        read = logits.softmax(dim=-1) @ block.g(memory)
        state = state + block.out(torch.relu(block.norm(read)))
    return state


# ----------------------------------------------------------------------------------------------
# deterministic modules and inputs (rebuilt identically in every measuring process)


def _perturbed(module: nn.Module) -> nn.Module:
    """Off the zero init (gamma = 0 and zero output layers would make both paths trivial)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, device="cpu").to(p))
    return module.eval()


def criss_cross_case(channels: int, side: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    module = _perturbed(attnzoo.create("criss_cross", channels))
    generator = torch.Generator().manual_seed(1)  # a CPU generator: the same input on every device
    x = torch.randn(1, channels, side, side, generator=generator, device="cpu").to(torch.get_default_device())
    return module, (x,)


def feature_bank_case(channels: int, window: int, bank: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    module = _perturbed(attnzoo.create("feature_bank", channels))  # inner 512, 2 layers
    generator = torch.Generator().manual_seed(1)
    short_term = torch.randn(1, window, channels, generator=generator)
    memory = torch.randn(1, bank, channels, generator=generator)
    return module, (short_term, memory)


BASELINES: dict[str, Callable[..., Tensor]] = {
    "criss_cross": dense_criss_cross,
    "feature_bank": dense_feature_bank,
}


def _build(name: str, sizes: tuple[int, ...]) -> tuple[nn.Module, tuple[Tensor, ...]]:
    return criss_cross_case(*sizes) if name == "criss_cross" else feature_bank_case(*sizes)


def _memory(name: str, sizes: tuple[int, ...], path: str, threads: int) -> int:
    """Peak extra memory of one forward call, in a process that has run nothing else."""
    torch.set_num_threads(threads)
    module, inputs = _build(name, sizes)
    run = (lambda *t: module(*t)) if path == "attnzoo" else (lambda *t: BASELINES[name](module, *t))
    # a tiny call first starts the thread pool and the kernels' lazy state, which the first call
    # would otherwise count; it is too small to leave freed pages that could hide the real peak
    tiny = tuple(t[..., :2, :2] if name == "criss_cross" else t[:, :2] for t in inputs)
    with torch.no_grad():
        run(*tiny)
        return peak_memory(lambda: run(*inputs))


def measure(
    name: str, sizes: tuple[int, ...], label: str, threads: int, repeats: int, dense_ok: bool
) -> dict:
    spawn = multiprocessing.get_context("spawn")
    memory = {}
    paths = ("attnzoo", "dense") if dense_ok else ("attnzoo",)
    for path in paths:
        with spawn.Pool(1, maxtasksperchild=1) as pool:
            memory[path] = pool.apply(_memory, (name, sizes, path, threads))
    module, inputs = _build(name, sizes)
    row = {"module": name, "size": label, "ours_mib": memory["attnzoo"] / MIB}
    with torch.no_grad():
        row["ours_ms"] = time_call(lambda: module(*inputs), warmup=1, repeats=repeats).ms
        if dense_ok:
            baseline = BASELINES[name]
            row["diff"] = (module(*inputs) - baseline(module, *inputs)).abs().max().item()
            row["dense_ms"] = time_call(lambda: baseline(module, *inputs), warmup=1, repeats=repeats).ms
            row["dense_mib"] = memory["dense"] / MIB
    print(f"  done {name} {label}", flush=True)
    return row


def markdown(rows: list[dict], threads: int) -> str:
    lines = [
        f"batch 1, float32, {threads} threads, torch {torch.__version__}",
        "",
        "| module | size | attnzoo ms | dense ms | time ratio | attnzoo peak MiB | dense peak MiB | "
        "memory ratio | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "dense_ms" in r:
            dense = (
                f"{r['dense_ms']:.1f} | {r['ours_ms'] / max(r['dense_ms'], 1e-9):.2f} | "
                f"{r['ours_mib']:.1f} | {r['dense_mib']:.1f} | "
                f"{r['ours_mib'] / max(r['dense_mib'], 1e-9):.3f} | {r['diff']:.1e}"
            )
        else:
            dense = f"skipped | - | {r['ours_mib']:.1f} | skipped | - | -"
        lines.append(f"| {r['module']} | {r['size']} | {r['ours_ms']:.1f} | {dense} |")
    lines += [
        "",
        "Ratios are attnzoo / dense baseline: below 1 is better. criss_cross runs R = 2 passes on "
        "both paths; 'dense' builds the HW x HW masked matrix (criss_cross) or the N x M softmax "
        "(feature_bank).",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# peers (issue 13), written from their source; q, k, v from attnzoo's own 1x1 convs


def mmcv_criss_cross_step(module: nn.Module, x: Tensor) -> Tensor:
    """mmcv.ops.CrissCrossAttention.forward (pure PyTorch since mmcv 1.x)."""
    _, _, height, _ = x.size()
    query, key, value = module.query_conv(x), module.key_conv(x), module.value_conv(x)
    neg_inf_diag = torch.diag(torch.full((height,), float("-inf"), device=x.device, dtype=x.dtype))
    energy_h = torch.einsum("bchw,bciw->bwhi", query, key) + neg_inf_diag
    energy_h = energy_h.transpose(1, 2)
    energy_w = torch.einsum("bchw,bchj->bhwj", query, key)
    attn = F.softmax(torch.cat([energy_h, energy_w], dim=-1), dim=-1)  # [B, H, W, (H + W)]
    out = torch.einsum("bciw,bhwi->bchw", value, attn[..., :height])
    out += torch.einsum("bchj,bhwj->bchw", value, attn[..., height:])
    out = module.gamma * out + x
    return out.contiguous()


def fightingcv_criss_cross_step(module: nn.Module, x: Tensor) -> Tensor:
    """fightingcv (External-Attention-pytorch) CrissCrossAttention.forward, the CCNet original."""
    b, _, h, w = x.size()
    proj_query = module.query_conv(x)
    proj_query_h = proj_query.permute(0, 3, 1, 2).contiguous().view(b * w, -1, h).permute(0, 2, 1)
    proj_query_w = proj_query.permute(0, 2, 1, 3).contiguous().view(b * h, -1, w).permute(0, 2, 1)
    proj_key = module.key_conv(x)
    proj_key_h = proj_key.permute(0, 3, 1, 2).contiguous().view(b * w, -1, h)
    proj_key_w = proj_key.permute(0, 2, 1, 3).contiguous().view(b * h, -1, w)
    proj_value = module.value_conv(x)
    proj_value_h = proj_value.permute(0, 3, 1, 2).contiguous().view(b * w, -1, h)
    proj_value_w = proj_value.permute(0, 2, 1, 3).contiguous().view(b * h, -1, w)
    inf = -torch.diag(torch.tensor(float("inf"), dtype=x.dtype).repeat(h), 0).unsqueeze(0).repeat(b * w, 1, 1)
    energy_h = (torch.bmm(proj_query_h, proj_key_h) + inf).view(b, w, h, h).permute(0, 2, 1, 3)
    energy_w = torch.bmm(proj_query_w, proj_key_w).view(b, h, w, w)
    concate = F.softmax(torch.cat([energy_h, energy_w], 3), dim=3)
    att_h = concate[:, :, :, 0:h].permute(0, 2, 1, 3).contiguous().view(b * w, h, h)
    att_w = concate[:, :, :, h : h + w].contiguous().view(b * h, w, w)
    out_h = torch.bmm(proj_value_h, att_h.permute(0, 2, 1)).view(b, w, -1, h).permute(0, 2, 3, 1)
    out_w = torch.bmm(proj_value_w, att_w.permute(0, 2, 1)).view(b, h, -1, w).permute(0, 2, 1, 3)
    return module.gamma * (out_h + out_w) + x


def recurrent(step: Callable[[nn.Module, Tensor], Tensor]) -> Callable[[nn.Module, Tensor], Tensor]:
    """RCCA: the single-pass peer module applied R times with the same weights."""

    def run(module: nn.Module, x: Tensor) -> Tensor:
        for _ in range(module.recurrence):
            x = step(module, x)
        return x

    return run


PEERS = {"mmcv": recurrent(mmcv_criss_cross_step), "fightingcv": recurrent(fightingcv_criss_cross_step)}


def peers_table(
    sides: list[int],
    channels: int,
    repeats: int,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
) -> list[str]:
    rows = [preamble(repeats), "", HEADER]
    print("\n".join(rows), flush=True)
    for side in sides:
        for dtype in dtypes:
            module, (x,) = criss_cross_case(channels, side)
            module, x = module.to(dtype), x.to(dtype)
            size = f"(1, {channels}, {side}, {side})"
            for peer_name, peer in PEERS.items():
                module.eval()
                with torch.no_grad():
                    tol = 1e-3 if dtype == torch.float32 else 1e-1
                    torch.testing.assert_close(module(x), peer(module, x), rtol=tol, atol=tol)
                r = measure_pair(
                    inference(module, x), inference(lambda t: peer(module, t), x), warmup=1, repeats=repeats
                )
                rows.append(format_row("criss_cross", peer_name, size, dtype, "inference", r))
                print(rows[-1], flush=True)
                module.train()
                params = list(module.parameters())
                r = measure_pair(
                    training(module, params, x),
                    training(lambda t: peer(module, t), params, x),
                    warmup=1,
                    repeats=repeats,
                )
                rows.append(format_row("criss_cross", peer_name, size, dtype, "training", r))
                print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    parser.add_argument("--sides", type=int, nargs="+", help="criss_cross H = W (default 32 64 128)")
    parser.add_argument("--channels", type=int, default=64, help="criss_cross C (default 64)")
    parser.add_argument("--window", type=int, help="feature_bank N (default 64)")
    parser.add_argument("--bank", type=int, help="feature_bank M (default 4096)")
    parser.add_argument("--bank-channels", type=int, default=2048, help="feature_bank C (paper: 2048)")
    parser.add_argument("--repeats", type=int, help="timed calls per figure (default 5; quick: 2)")
    parser.add_argument(
        "--max-dense-gib", type=float, default=6.0, help="skip a dense baseline whose matrices exceed this"
    )
    parser.add_argument("--peers", action="store_true", help="criss_cross against mmcv and fightingcv")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=("float32", "bfloat16"),
        default=["float32", "bfloat16"],
        help="--peers: the dtypes to run (default both)",
    )
    add_device_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peers:
        use_device(args.device)
        sides = args.sides or ([32, 64] if args.quick else [32, 64, 128])
        dtypes = tuple(getattr(torch, name) for name in args.dtypes)
        rows = peers_table(sides, args.channels, args.repeats or (3 if args.quick else 7), dtypes)
        print("\n" + "\n".join(rows))
        return
    sides = args.sides or ([16, 32] if args.quick else [32, 64, 128])
    window = args.window or (16 if args.quick else 64)
    bank = args.bank or (512 if args.quick else 4096)
    bank_channels = 256 if args.quick and args.bank_channels == 2048 else args.bank_channels
    repeats = args.repeats or (2 if args.quick else 5)

    rows = []
    for side in sides:
        # the dense pass holds about three HW x HW float32 matrices (energy, masked, softmax)
        dense_gib = 3 * (side * side) ** 2 * 4 / 2**30
        rows.append(
            measure(
                "criss_cross",
                (args.channels, side),
                f"C={args.channels}, {side} x {side}",
                args.threads,
                repeats,
                dense_ok=dense_gib <= args.max_dense_gib,
            )
        )
    rows.append(
        measure(
            "feature_bank",
            (bank_channels, window, bank),
            f"C={bank_channels}, N={window}, M={bank}",
            args.threads,
            repeats,
            dense_ok=True,
        )
    )
    print()
    print(markdown(rows, args.threads))


if __name__ == "__main__":
    main()
