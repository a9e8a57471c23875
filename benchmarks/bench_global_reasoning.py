"""Forward time and peak memory of the global-reasoning blocks against literal implementations.

Each of ``double_attention``, ``glore``, ``cgnl``, ``spygr``, ``adaptive_context``, ``psa`` and
``dgmn`` runs beside a literal implementation with the same weights, written the way the paper's
equations (or the official / popular code) read:

- double_attention: ``A (softmax_N(B)^T softmax_n(V))``, the non-local order (an N x N matrix).
- glore: the official ``GloRe_Unit`` (NCHW convs, permute + contiguous copies).
- cgnl: the official ``SpatialCGNL(x)``: a Python loop over the groups, Taylor terms concatenated.
- spygr: the explicit N x N similarity, degree and Laplacian matrices.
- adaptive_context: mmsegmentation's ``ACM`` (permute + contiguous + matmul).
- psa: the re-indexing through a precomputed (N, N) index tensor, then softmax + bmm (the
  research note's pure-PyTorch ``psa_mask``); both sides use the official shrink factor 2.
- dgmn: all 9 taps sampled at once (a (B, C, 9, H, W) unfold, as the official ``DeformUnfold``).

Usage::

    python benchmarks/bench_global_reasoning.py             # H = W = 32, 64, 128, C = 256, batch 1
    python benchmarks/bench_global_reasoning.py --quick     # H = W = 32 only, a smoke run
    python benchmarks/bench_global_reasoning.py --only spygr psa --sizes 64 --threads 8

Peak memory is the resident-set high-water mark of one forward call (``attnzoo.bench.peak_memory``)
in a fresh process per figure, after a small warm-up call; time is the median of interleaved
repeats (``attnzoo.bench.compare_calls``) with the first and third quartiles. Compare ratios within
one run: the absolute figures depend on the machine and its load.
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
from attnzoo.bench import compare_calls, peak_memory
from attnzoo.testing import randomize_

MIB = 2**20


# ------------------------------------------------------------------------------------------------
# literal implementations (the same weights as the registered modules)


def literal_double_attention(m: nn.Module, x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    flat = x.view(b, c, h * w)
    a, bb, v = m.features(flat), m.maps(flat), m.vectors(flat)
    attention = bb.softmax(dim=-1).transpose(1, 2) @ v.softmax(dim=1)  # (B, N, N)
    return x + m.out_proj(a @ attention).view_as(x)


def literal_glore(m: nn.Module, x: Tensor) -> Tensor:
    b, _, h, w = x.shape
    conv = lambda layer, t: F.conv2d(t, layer.weight[..., None], layer.bias)  # noqa: E731
    state = conv(m.state, x).view(b, m.state_channels, -1)
    proj = conv(m.projection, x).view(b, m.num_nodes, -1)
    nodes = torch.matmul(state, proj.permute(0, 2, 1))
    if m.normalize:
        nodes = nodes * (1.0 / state.size(2))
    hidden = m.node_conv(nodes.permute(0, 2, 1).contiguous()).permute(0, 2, 1) + nodes
    reasoned = m.state_conv(torch.relu(hidden))
    y = torch.matmul(reasoned, proj).view(b, m.state_channels, h, w)
    extended = F.conv2d(y, m.extend.weight[..., None])
    bn = m.norm
    return x + F.batch_norm(extended, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def literal_cgnl(m: nn.Module, x: Tensor) -> Tensor:
    b, _, h, w = x.shape
    conv = lambda layer, t: F.conv2d(t, layer.weight[..., None])  # noqa: E731
    t, p, g = conv(m.theta, x), conv(m.phi, x), conv(m.g, x)
    per = m.inner_channels // m.groups
    outs = []
    for ts, ps, gs in zip(t.split(per, 1), p.split(per, 1), g.split(per, 1)):
        ts, ps, gs = ts.reshape(b, 1, -1), ps.reshape(b, 1, -1), gs.reshape(b, -1, 1)
        if m.kernel == "dot":
            outs.append(torch.bmm(torch.bmm(ps, gs), ts).view(b, per, h, w))
        else:  # the official Taylor concatenation (exact coefficient as in the default variant)
            import math

            tt = torch.cat(
                [ts.pow(k) * math.sqrt((2 * m.gamma) ** k / math.factorial(k)) for k in range(m.order + 1)], 1
            )
            pp = torch.cat(
                [ps.pow(k) * math.sqrt((2 * m.gamma) ** k / math.factorial(k)) for k in range(m.order + 1)], 1
            )
            tt, pp = tt * torch.exp(-m.gamma * ts * ts), pp * torch.exp(-m.gamma * ps * ps)
            att = torch.bmm(pp, gs).view(b, 1, -1)
            outs.append(torch.bmm(att, tt).view(b, per, h, w))
    y = F.conv2d(torch.cat(outs, 1), m.out_proj.weight[..., None], groups=m.groups)
    return x + m.norm(y)


def literal_spygr(m: nn.Module, x: Tensor) -> Tensor:
    out = x
    for scale, layer in zip(m.scales, m.layers):
        xs = x if scale == 1 else F.max_pool2d(x, scale, scale, ceil_mode=True)
        b, c, h, w = xs.shape
        tokens = xs.flatten(2).transpose(1, 2)
        phi = torch.relu(layer.phi(tokens))
        lam = torch.sigmoid(layer.diagonal(tokens.mean(1)))
        a = (phi * lam[:, None]) @ phi.transpose(1, 2)  # (B, N, N)
        d = torch.rsqrt(a.sum(-1) + layer.eps)
        laplacian = torch.eye(h * w) - d[:, :, None] * a * d[:, None, :]  # (B, N, N)
        y = torch.relu(layer.theta(laplacian @ tokens)).transpose(1, 2).reshape(b, c, h, w)
        if scale != 1:
            y = F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)
        out = out + y
    return out


def literal_adaptive_context(m: nn.Module, x: Tensor) -> Tensor:
    outs = [x]
    for acm in m.modules_per_scale:
        s = acm.pool_scale
        reduced = acm.reduce(x)
        b, c, h, w = reduced.shape
        pooled = acm.reduce_pooled(F.adaptive_avg_pool2d(x, s)).view(b, c, -1).permute(0, 2, 1).contiguous()
        g = acm.global_info(F.adaptive_avg_pool2d(reduced, 1))
        affinity = acm.gla(reduced + g).permute(0, 2, 3, 1).reshape(b, -1, s * s).sigmoid()
        z = torch.matmul(affinity, pooled).permute(0, 2, 1).contiguous().view(b, c, h, w)
        outs.append(acm.fusion(torch.relu(acm.residual(z) + reduced)))
    return m.bottleneck(torch.cat(outs, 1))


def _dense_index(h: int, w: int, mh: int, mw: int, distribute: bool) -> tuple[Tensor, Tensor]:
    """An (N, N) flat index into the (mh mw, N) map and its validity: the quadratic index tensor."""
    q = torch.arange(h * w)
    qh, qw = q // w, q % w
    ph, pw = (qh[None, :], qw[None, :]) if distribute else (qh[:, None], qw[:, None])  # predicting
    th, tw = (qh[:, None], qw[:, None]) if distribute else (qh[None, :], qw[None, :])  # target
    a, bb = th - ph + (mh - 1) // 2, tw - pw + (mw - 1) // 2
    valid = (a >= 0) & (a < mh) & (bb >= 0) & (bb < mw)
    flat = (a.clamp(0, mh - 1) * mw + bb.clamp(0, mw - 1)) * (h * w) + (ph * w + pw)
    return flat, valid


def literal_psa(m: nn.Module, x: Tensor) -> Tensor:
    contexts = []
    fill = float("-inf") if m.variant == "paper" else 0.0
    for name, branch in m.paths.items():
        reduced = branch.reduce(x)
        if m.shrink_factor != 1:
            size = [(s - 1) // m.shrink_factor + 1 for s in x.shape[2:]]
            reduced = F.interpolate(reduced, size=size, mode="bilinear", align_corners=True)
        b, c, h, w = reduced.shape
        predicted = branch.predict(reduced).flatten(1)  # (B, mh mw N)
        flat, valid = _dense_index(h, w, *m.mask_size, distribute=name == "distribute")
        logits = predicted[:, flat].masked_fill(~valid, fill)  # (B, N, N)
        weights = logits.softmax(-1)
        contexts.append((weights @ reduced.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w))
    projected = m.proj(torch.cat(contexts, 1))
    if m.shrink_factor != 1:
        projected = F.interpolate(projected, size=x.shape[2:], mode="bilinear", align_corners=True)
    return m.fuse(torch.cat([x, projected], 1))


def literal_dgmn(m: nn.Module, x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    out = x
    rows = torch.arange(h, dtype=x.dtype)[:, None, None]
    cols = torch.arange(w, dtype=x.dtype)[None, :, None]
    taps = torch.arange(9)
    for index, rate in enumerate(m.rates):
        d = rate.dilation
        offsets = rate.offset(x).view(b, 9, 2, h, w)
        y = rows + d * (taps // 3 - 1).to(x.dtype) + offsets[:, :, 0].permute(0, 2, 3, 1)  # (B, H, W, 9)
        xx = cols + d * (taps % 3 - 1).to(x.dtype) + offsets[:, :, 1].permute(0, 2, 3, 1)
        grid = torch.stack([(2 * xx + 1) / w - 1, (2 * y + 1) / h - 1], -1).reshape(b, h, w * 9, 2)
        unfolded = F.grid_sample(x, grid, align_corners=False).view(b, c, h, w, 9)  # 9x the input
        weight = rate.kernel.weight.reshape(rate.kernel.out_channels, c, 9)
        logits = torch.einsum("bchwk,ock->bohw", unfolded, weight)
        n = m.groups * 9
        filters = logits[:, :n].view(b, m.groups, 9, h, w)
        aff = logits[:, n - 9 : n] if (m.variant == "official" and index == 3) else logits[:, n:]
        weights = filters * aff.softmax(1)[:, None]
        message = torch.einsum(
            "bgrhwk,bgkhw->bgrhw", unfolded.view(b, m.groups, c // m.groups, h, w, 9), weights
        )
        out = out + rate.gamma * message.reshape(b, c, h, w)
    return out


@dataclass(frozen=True)
class Case:
    name: str
    literal: Callable[[nn.Module, Tensor], Tensor]
    label: str
    kwargs: Callable[[int, int], dict]  # (channels, side) -> constructor kwargs


CASES = [
    Case("double_attention", literal_double_attention, "non-local order (N x N)", lambda c, s: {}),
    Case("glore", literal_glore, "official GloRe_Unit", lambda c, s: {}),
    Case("cgnl", literal_cgnl, "official (loop over groups)", lambda c, s: {}),
    Case("spygr", literal_spygr, "explicit N x N Laplacian", lambda c, s: {}),
    Case("adaptive_context", literal_adaptive_context, "mmseg ACM", lambda c, s: {}),
    Case(
        "psa",
        literal_psa,
        "(N, N) index + softmax + bmm",
        lambda c, s: {"shrink_factor": 2, "mask_size": 2 * ((s - 1) // 2 + 1) - 1},
    ),
    Case("dgmn", literal_dgmn, "9-tap unfold (DeformUnfold)", lambda c, s: {}),
]


def build(case: Case, channels: int, side: int) -> nn.Module:
    torch.manual_seed(0)
    module = attnzoo.create(case.name, channels, **case.kwargs(channels, side))
    return randomize_(module, seed=0, scale=0.05, shift=True).eval()


def example(channels: int, side: int) -> Tensor:
    return torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(1))


def _memory_in_fresh_process(name: str, channels: int, side: int, path: str, threads: int) -> int:
    """Peak memory of one forward call in a process that has run nothing else (see bench_non_local)."""
    torch.set_num_threads(threads)
    case = next(c for c in CASES if c.name == name)
    module, x = build(case, channels, side), example(channels, side)
    call = (lambda t: module(t)) if path == "attnzoo" else (lambda t: case.literal(module, t))
    with torch.no_grad():
        small = build(case, channels, 8) if name == "psa" else module
        (lambda t: small(t) if path == "attnzoo" else case.literal(small, t))(example(channels, 8))
        return peak_memory(lambda: call(x))


def run(names: list[str], sizes: list[int], channels: int, repeats: int, threads: int) -> list[dict]:
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for case in CASES:
        if case.name not in names:
            continue
        for side in sizes:
            module, x = build(case, channels, side), example(channels, side)
            memory = {}
            for path in ("attnzoo", "literal"):
                with spawn.Pool(1, maxtasksperchild=1) as pool:
                    memory[path] = pool.apply(
                        _memory_in_fresh_process, (case.name, channels, side, path, threads)
                    )
            with torch.no_grad():
                diff = (module(x) - case.literal(module, x)).abs().max().item()
                timings = compare_calls(
                    {"attnzoo": lambda: module(x), "literal": lambda: case.literal(module, x)},
                    warmup=1,
                    repeats=repeats,
                )
            rows.append({"module": case.name, "label": case.label, "side": side, "diff": diff,
                         "timings": timings, "memory": memory})  # fmt: skip
            print(f"  done {case.name} {side}x{side}", flush=True)
    return rows


def markdown(rows: list[dict], channels: int, threads: int) -> str:
    lines = [
        f"C = {channels}, batch 1, float32, {threads} threads, torch {torch.__version__}",
        "",
        "| module | H x W | attnzoo ms (q1-q3) | literal ms (q1-q3) | time ratio | attnzoo peak MiB | "
        "literal peak MiB | memory ratio | max abs diff | literal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours, lit = r["timings"]["attnzoo"], r["timings"]["literal"]
        (o1, o3), (l1, l3) = ours.quartiles, lit.quartiles
        mem_o, mem_l = r["memory"]["attnzoo"] / MIB, r["memory"]["literal"] / MIB
        lines.append(
            f"| {r['module']} | {r['side']} x {r['side']} | {ours.ms:.1f} ({o1 * 1e3:.1f}-{o3 * 1e3:.1f}) | "
            f"{lit.ms:.1f} ({l1 * 1e3:.1f}-{l3 * 1e3:.1f}) | {ours.ms / max(lit.ms, 1e-9):.2f} | "
            f"{mem_o:.1f} | {mem_l:.1f} | {mem_o / max(mem_l, 1e-9):.3f} | {r['diff']:.1e} | {r['label']} |"
        )
    lines += ["", "Ratios are attnzoo / literal: below 1 is better."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="H = W = 32 only, 2 repeats (smoke run)")
    parser.add_argument("--sizes", type=int, nargs="+", help="spatial sides (default 32 64 128)")
    parser.add_argument("--channels", type=int, default=256, help="C (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed calls per figure")
    parser.add_argument("--only", nargs="+", default=[c.name for c in CASES], help="mechanisms to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = args.sizes or ([32] if args.quick else [32, 64, 128])
    repeats = 2 if args.quick else args.repeats
    rows = run(args.only, sizes, args.channels, repeats, args.threads)
    print()
    print(markdown(rows, args.channels, args.threads))


if __name__ == "__main__":
    main()
