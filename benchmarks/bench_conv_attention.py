"""Attention as convolution: time and peak memory against unfold / materialised implementations.

Each mechanism runs beside the way its peers compute it, with the same weights, in one run:

- ``sasa`` against an unfold implementation (keys and values copied k^2 = 49 times, the border
  keys masked), at the issue's (8, 128, 56, 56), k = 7, 8 heads (halo tiles through the fused
  kernel), and with 16 heads of 8 dimensions (``sasa_small_heads``: shift-and-accumulate);
- ``aa_conv`` against the materialised (B, N_h, HW, HW) logits with the relative logits gathered
  into them (the paper's "relative to absolute" result), at 64 x 64;
- ``conv_as_attention`` against the official code's batch-shared dense (N_h, HW, HW) positional
  attention, at (8, 64, 56, 56).
- ``san`` (pairwise, patchwise) and ``local_relation`` against unfold implementations (values,
  and LR-Net's keys, copied k^2 = 49 times) with the same weights, at (8, 128, 56, 56), k = 7;
- ``carafe`` against unfold + pixel_unshuffle einsum (the input copied k_up^2 = 25 times),
  upsampling (8, 256, 28, 28) by 2.

Two modes: inference forward (eval, no_grad) and training forward + backward; float32 and
bfloat16. Peak memory on CPU is the resident-set high-water mark over one call
(``attnzoo.bench.peak_memory``), each figure in a fresh process so that freed pages of an earlier
call cannot hide a peak. Times are medians of interleaved repeats (``attnzoo.bench.compare_calls``).

Run ``.venv/bin/python benchmarks/bench_conv_attention.py`` (``--quick`` for a smoke run at small
sizes, ``--only sasa`` for one mechanism, ``--dtypes float32``). Other mechanisms of the family
add a ``Case`` to ``CASES`` with their own build and baseline functions.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.bench import compare_calls, peak_memory
from attnzoo.vision.aa_conv import AAConv2d
from attnzoo.vision.carafe import CARAFE
from attnzoo.vision.conv_as_attention import ConvAsAttention
from attnzoo.vision.local_relation import LocalRelation
from attnzoo.vision.san import SANAttention
from attnzoo.vision.sasa import SASA

MIB = 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# baselines: the peers' computation, written here with the modules' weights


def sasa_unfold(layer: SASA, x: Tensor) -> Tensor:
    """SASA with keys and values unfolded over the window: (B, h, d, k^2, HW) each, out-of-image
    keys masked with -inf (the correct border; the popular versions zero-pad instead)."""
    batch, _, height, width = x.shape
    heads, d, size = layer.num_heads, layer.head_dim, layer.kernel_size
    qkv = layer.qkv(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, 3C, H, W)
    q, k, v = qkv.chunk(3, dim=1)
    unfold = lambda t: F.unfold(t, size, padding=size // 2).view(batch, heads, d, size * size, -1)  # noqa: E731
    q = q.reshape(batch, heads, d, 1, height * width)  # (B, C, H, W) -> (B, h, d, 1, HW)
    k_win, v_win = unfold(k), unfold(v)  # (B, h, d, k^2, HW): 49x the activation each
    half = d // 2
    # (k, h, d/2) tables -> the (k^2, h, d) embedding of each tap, row half then column half
    rel = torch.cat(
        [
            layer.rel_rows[:, None].expand(size, size, heads, half),
            layer.rel_cols[None, :].expand(size, size, heads, half),
        ],
        dim=-1,
    ).reshape(size * size, heads, d)
    logits = (q * (k_win + rel.permute(1, 2, 0)[None, :, :, :, None])).sum(2)  # (B, h, k^2, HW)
    inside = F.unfold(x.new_ones(1, 1, height, width), size, padding=size // 2) > 0  # (1, k^2, HW)
    weights = logits.masked_fill(~inside[:, None], float("-inf")).softmax(dim=2)
    out = (weights[:, :, None] * v_win).sum(3).reshape(batch, -1, height, width)  # (B, C, H, W)
    return F.avg_pool2d(out, layer.stride, ceil_mode=True) if layer.stride > 1 else out


def aa_materialised(layer: AAConv2d, x: Tensor) -> Tensor:
    """AA with the (B, h, HW, HW) logits built explicitly, relative logits gathered into them."""
    conv = layer.conv(x)
    batch, _, height, width = x.shape
    heads, d_k, d_v = layer.num_heads, layer.key_dim, layer.value_dim
    q, k, v = layer.qkv(x.permute(0, 2, 3, 1)).split([d_k, d_k, d_v], dim=-1)
    q, k, v = (t.reshape(batch, height * width, heads, -1).transpose(1, 2) for t in (q, k, v))
    middle = layer.max_size - 1
    rows = torch.arange(height)
    cols = torch.arange(width)
    r_h = layer.rel_height[rows[None, :] - rows[:, None] + middle]  # (H, H, d)
    r_w = layer.rel_width[cols[None, :] - cols[:, None] + middle]  # (W, W, d)
    q5 = q.reshape(batch, heads, height, width, -1)
    rel = (
        torch.einsum("bhyxd,yjd->bhyxj", q5, r_h)[..., :, None]
        + torch.einsum("bhyxd,xjd->bhyxj", q5, r_w)[..., None, :]
    )  # (B, h, H, W, H, W): every (query, key) pair
    content = q @ k.transpose(-1, -2)  # (B, h, HW, HW)
    logits = (content + rel.reshape(batch, heads, height * width, -1)) * layer.key_head_dim**-0.5
    out = logits.softmax(dim=-1) @ v  # (B, h, HW, d_v / h)
    out = layer.out_proj(out.transpose(1, 2).reshape(batch, height * width, d_v))
    return torch.cat([conv, out.transpose(1, 2).reshape(batch, d_v, height, width)], dim=1)


def conv_as_attention_dense(layer: ConvAsAttention, x: Tensor) -> Tensor:
    """The official code's positional attention: one dense (h, HW, HW) matrix shared by the batch."""
    batch, _, height, width = x.shape
    rows, cols = layer.axis_weights(height, width)
    dense = torch.einsum("hiy,hjx->hijyx", rows, cols).flatten(3).flatten(1, 2).to(x.dtype)  # (h, N, N)
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
    per_head = torch.einsum("hqk,bkc->bqhc", dense, tokens).reshape(batch, height, width, -1)
    return layer.value(per_head).permute(0, 3, 1, 2)


def san_unfold(layer: nn.Module, x: Tensor) -> Tensor:
    """SAN with the values unfolded: the layer's own weight computation (the same in both), then
    the CPU ports' aggregation: reflection-pad, unfold to (B, C k^2, HW), multiply by the
    interleaved weights (channel c uses map c mod C_w) and sum over the taps."""
    k = layer.kernel_size
    weights = layer._weights(x)  # (B, Cw, k^2, H, W)
    batch, cw, _, height, width = weights.shape
    values = F.pad(layer.value(x), (k // 2,) * 4, mode="reflect")
    cols = F.unfold(values, k)  # (B, C k^2, HW): k^2 copies of the values
    cols = cols.view(batch, -1, cw, k * k, height * width)  # (B, C k^2, HW) -> (B, C/Cw, Cw, k^2, HW)
    out = (cols * weights.flatten(3).unsqueeze(1).to(cols.dtype)).sum(3)  # (B, C/Cw, Cw, HW)
    return out.reshape(batch, -1, height, width)


def local_relation_unfold(layer: nn.Module, x: Tensor) -> Tensor:
    """LR-Net the way its ports compute it: keys and values unfolded over the window, border
    keys masked (-inf; the popular port zero-pads them instead), softmax, weighted sum."""
    k, groups = layer.kernel_size, layer.groups
    batch, channels, height, width = x.shape
    n = height * width
    q = layer.query(x).flatten(2).unsqueeze(2)  # (B, K, 1, HW)
    keys = F.unfold(layer.key(x), k, padding=k // 2).view(batch, -1, k * k, n)  # (B, K, k^2, HW)
    appearance = -(q - keys).square().view(batch, groups, -1, k * k, n).sum(2)  # (B, G, k^2, HW)
    prior = layer.geometry_prior(layer.offsets).t()  # (G, k^2)
    inside = F.unfold(torch.ones(1, 1, height, width, dtype=x.dtype), k, padding=k // 2) > 0  # (1, k^2, HW)
    logits = (appearance + prior[..., None]).masked_fill(~inside, float("-inf"))
    weights = torch.softmax(logits.float(), dim=2).to(x.dtype)
    cols = F.unfold(x, k, padding=k // 2).view(batch, groups, -1, k * k, n)  # (B, G, m, k^2, HW)
    out = (cols * weights.unsqueeze(2)).sum(3).view(batch, channels, height, width)
    return layer.proj(out)


def carafe_unfold(layer: nn.Module, x: Tensor) -> Tensor:
    """CARAFE as unfold + pixel_unshuffle einsum (exact; the better pure-PyTorch port, which at
    least does not upsample the unfolded tensor): the input unfolded to (B, C k^2, HW)."""
    k, sigma = layer.up_kernel, layer.scale
    batch, channels, height, width = x.shape
    encoded = layer.encoder(layer.compressor(x))  # (B, k^2 s^2, H, W)
    kernels = torch.softmax(F.pixel_shuffle(encoded, sigma).float(), dim=1).to(x.dtype)  # (B, k^2, sH, sW)
    kernels = F.pixel_unshuffle(kernels, sigma).view(batch, k * k, sigma * sigma, height, width)
    cols = F.unfold(x, k, padding=k // 2).view(batch, channels, k * k, height, width)  # k^2 copies
    out = torch.einsum("bckhw,bkshw->bcshw", cols, kernels)  # (B, C, s^2, H, W)
    return F.pixel_shuffle(out.reshape(batch, -1, height, width), sigma)


# ---------------------------------------------------------------------------------------------
# the cases


@dataclass(frozen=True)
class Case:
    """One mechanism against its baseline at one size."""

    name: str
    baseline_name: str
    build: Callable[[bool], tuple[nn.Module, Tensor]]  # quick -> (module, input)
    baseline: Callable[[nn.Module, Tensor], Tensor]
    size: Callable[[bool], str]


def _input(shape: tuple[int, ...]) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def build_sasa(quick: bool) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    shape = (2, 64, 28, 28) if quick else (8, 128, 56, 56)
    return SASA(shape[1], kernel_size=7, num_heads=8), _input(shape)


def build_sasa_small_heads(quick: bool) -> tuple[nn.Module, Tensor]:
    """8-dimensional heads (128 channels, 16 heads): the shift-and-accumulate path."""
    torch.manual_seed(0)
    shape = (2, 64, 28, 28) if quick else (8, 128, 56, 56)
    return SASA(shape[1], kernel_size=7, num_heads=shape[1] // 8), _input(shape)


def build_aa(quick: bool) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    shape = (1, 64, 32, 32) if quick else (1, 64, 64, 64)
    return AAConv2d(shape[1], num_heads=8, max_size=64), _input(shape)


def build_conv_as_attention(quick: bool) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    shape = (2, 32, 28, 28) if quick else (8, 64, 56, 56)
    return ConvAsAttention(shape[1], num_heads=9), _input(shape)


def build_san_pairwise(quick: bool) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    shape = (2, 64, 28, 28) if quick else (8, 128, 56, 56)
    return SANAttention(shape[1], mode="pairwise", kernel_size=7), _input(shape)


def build_san_patchwise(quick: bool) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    shape = (2, 64, 28, 28) if quick else (8, 128, 56, 56)
    return SANAttention(shape[1], mode="patchwise", kernel_size=7), _input(shape)


def build_local_relation(quick: bool) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    shape = (2, 64, 28, 28) if quick else (8, 128, 56, 56)
    return LocalRelation(shape[1], kernel_size=7), _input(shape)


def build_carafe(quick: bool) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    shape = (2, 128, 14, 14) if quick else (8, 256, 28, 28)
    return CARAFE(shape[1], 2), _input(shape)


def _shape_label(build: Callable[[bool], tuple[nn.Module, Tensor]]) -> Callable[[bool], str]:
    return lambda quick: str(tuple(build(quick)[1].shape))


CASES: dict[str, Case] = {
    "sasa": Case("sasa", "unfold", build_sasa, sasa_unfold, _shape_label(build_sasa)),
    "sasa_small_heads": Case(
        "sasa (d = 8)", "unfold", build_sasa_small_heads, sasa_unfold, _shape_label(build_sasa_small_heads)
    ),
    "aa_conv": Case("aa_conv", "materialised", build_aa, aa_materialised, _shape_label(build_aa)),
    "conv_as_attention": Case(
        "conv_as_attention",
        "dense (official)",
        build_conv_as_attention,
        conv_as_attention_dense,
        _shape_label(build_conv_as_attention),
    ),
    "san_pairwise": Case(
        "san (pairwise)", "unfold", build_san_pairwise, san_unfold, _shape_label(build_san_pairwise)
    ),
    "san_patchwise": Case(
        "san (patchwise)", "unfold", build_san_patchwise, san_unfold, _shape_label(build_san_patchwise)
    ),
    "local_relation": Case(
        "local_relation",
        "unfold",
        build_local_relation,
        local_relation_unfold,
        _shape_label(build_local_relation),
    ),
    "carafe": Case("carafe", "unfold+einsum", build_carafe, carafe_unfold, _shape_label(build_carafe)),
}


def _call(case: Case, path: str, mode: str, module: nn.Module, x: Tensor) -> Callable[[], object]:
    run = (lambda: module(x)) if path == "attnzoo" else (lambda: case.baseline(module, x))
    if mode == "forward":

        def forward() -> object:
            with torch.no_grad():
                return run()

        return forward
    grad = None

    def train() -> None:
        nonlocal grad
        out = run()
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        module.zero_grad(set_to_none=True)

    return train


def _memory(name: str, path: str, mode: str, dtype: str, quick: bool, threads: int) -> int:
    """Peak extra bytes of one call, in a process that has run nothing else of this size."""
    torch.set_num_threads(threads)
    case = CASES[name]
    module, x = case.build(quick)
    module, x = module.to(DTYPES[dtype]), x.to(DTYPES[dtype])
    module.train(mode == "train")
    # a tiny call first starts the thread pool and the kernels' lazy state
    _call(case, path, mode, module, x[:1, :, :8, :8])()
    return peak_memory(_call(case, path, mode, module, x))


def measure(name: str, mode: str, dtype: str, quick: bool, threads: int, repeats: int) -> dict:
    case = CASES[name]
    spawn = multiprocessing.get_context("spawn")
    memory = {}
    for path in ("attnzoo", "baseline"):
        with spawn.Pool(1, maxtasksperchild=1) as pool:
            memory[path] = pool.apply(_memory, (name, path, mode, dtype, quick, threads))
    module, x = case.build(quick)
    module, x = module.to(DTYPES[dtype]), x.to(DTYPES[dtype])
    module.eval()
    with torch.no_grad():
        ours, theirs = module(x), case.baseline(module, x)
        diff = ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()
    module.train(mode == "train")
    calls = {path: _call(case, path, mode, module, x) for path in ("attnzoo", "baseline")}
    timing = compare_calls(calls, warmup=1, repeats=repeats)
    print(f"  done {name} {mode} {dtype}", flush=True)
    return {
        "module": name,
        "baseline": case.baseline_name,
        "size": case.size(quick),
        "mode": mode,
        "dtype": dtype,
        "ours_ms": timing["attnzoo"].ms,
        "ours_spread": tuple(t * 1e3 for t in timing["attnzoo"].quartiles),
        "base_ms": timing["baseline"].ms,
        "base_spread": tuple(t * 1e3 for t in timing["baseline"].quartiles),
        "ours_mib": memory["attnzoo"] / MIB,
        "base_mib": memory["baseline"] / MIB,
        "diff": diff,
    }


def markdown(rows: list[dict], threads: int) -> str:
    lines = [
        f"{threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}",
        "",
        "| module | baseline | size | mode | dtype | attnzoo ms (IQR) | baseline ms (IQR) | time ratio "
        "| attnzoo peak MiB | baseline peak MiB | memory ratio | rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['module']} | {r['baseline']} | {r['size']} | {r['mode']} | {r['dtype']} "
            f"| {r['ours_ms']:.0f} ({r['ours_spread'][0]:.0f}-{r['ours_spread'][1]:.0f}) "
            f"| {r['base_ms']:.0f} ({r['base_spread'][0]:.0f}-{r['base_spread'][1]:.0f}) "
            f"| {r['ours_ms'] / r['base_ms']:.2f} | {r['ours_mib']:.0f} | {r['base_mib']:.0f} "
            f"| {r['ours_mib'] / max(r['base_mib'], 1e-9):.3f} | {r['diff']:.1e} |"
        )
    lines += ["", "Ratios are attnzoo / baseline: below 1 is better. rel. diff: ||ours - base|| / ||base||."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), help="these mechanisms only")
    parser.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, help="timed calls per figure (default 5; quick: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    rows = [
        measure(name, mode, dtype, args.quick, args.threads, repeats)
        for name in (args.only or list(CASES))
        for dtype in args.dtypes
        for mode in args.modes
    ]
    print(markdown(rows, args.threads))
    if not math.isfinite(sum(r["diff"] for r in rows)):
        raise SystemExit("a baseline disagrees with attnzoo (non-finite difference)")


if __name__ == "__main__":
    main()
