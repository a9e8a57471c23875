"""Latency of eca, bam, gc, sag_mask, se and cbam against straightforward plain-PyTorch versions,
and the overhead of each mechanism in a ResNet-50.

Each baseline below is the mechanism's equation written the obvious way (pool with
``adaptive_avg_pool2d``, ``expand_as`` to the full map, ``view``/``unsqueeze``/``matmul`` as the
official code does), reading the attnzoo module's own parameters; the script checks that both give
the same output before timing them.

    python benchmarks/bench_gating.py                # (B=32, C=256, 56x56), (B=32, C=1024, 14x14)
    python benchmarks/bench_gating.py --quick        # batch 2, small sizes: a smoke run
    python benchmarks/bench_gating.py --skip-resnet  # the modules only
    python benchmarks/bench_gating.py --peers        # cbam and gc against timm and mmcv (issue 13)
    python benchmarks/bench_gating.py --peers --quick

``--peers`` compares, in float32 and bfloat16, inference (eval, no_grad) and training
(forward + backward) time and peak memory against the peers' computations, reproduced here
because the packages cannot be installed beside this project's pinned torch (timm imports
torchvision at import time; mmcv needs its compiled ops): ``cbam`` against timm's
``CbamModule`` (timm/layers/cbam.py: 1x1-conv MLP without bias, ``amax`` pooling, 7x7 conv +
BatchNorm) and ``gc`` against mmcv's ``ContextBlock`` (mmcv/cnn/bricks/context_block.py:
``channel_add`` fusion), each loading the attnzoo module's weights and checked equal first. Where
timm imports (a GPU machine's image, say), its own ``CbamModule`` is timed instead, loaded with the
reproduction's weights and checked equal to ours. ``--device cuda`` runs the table on a GPU.

Ratios below 1 mean attnzoo is faster; ResNet overheads are relative to the plain ResNet-50 timed in
the same run. Compare ratios, not absolute times, on a shared machine.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnzoo
from attnzoo.bench import time_call
from attnzoo.models.resnet import resnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer import (
    HEADER,
    add_device_argument,
    copy_in_order,
    format_row,
    inference,
    installed,
    measure_pair,
    peer_label,
    preamble,
    training,
    use_device,
)

Baseline = Callable[[nn.Module, Tensor], Tensor]


def _bn(x: Tensor, bn: nn.Module) -> Tensor:
    return F.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps
    )


def plain_se(m: nn.Module, x: Tensor) -> Tensor:
    y = F.adaptive_avg_pool2d(x, 1).flatten(1)
    y = torch.sigmoid(F.linear(F.relu(F.linear(y, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias))
    return x * y.unsqueeze(-1).unsqueeze(-1).expand_as(x)


def plain_eca(m: nn.Module, x: Tensor) -> Tensor:
    # the official eca_layer: pool, squeeze, transpose, conv1d, transpose back, expand
    y = F.adaptive_avg_pool2d(x, 1)
    y = F.conv1d(y.squeeze(-1).transpose(-1, -2), m.conv.weight, padding=m.kernel_size // 2)
    y = torch.sigmoid(y.transpose(-1, -2).unsqueeze(-1))
    return x * y.expand_as(x)


def plain_cbam(m: nn.Module, x: Tensor) -> Tensor:
    ch = m.channel

    def mlp(v: Tensor) -> Tensor:
        return F.linear(F.relu(F.linear(v, ch.fc1.weight, ch.fc1.bias)), ch.fc2.weight, ch.fc2.bias)

    h, w = x.shape[2:]
    avg = F.avg_pool2d(x, (h, w)).flatten(1)
    mx = F.max_pool2d(x, (h, w)).flatten(1)
    x = x * torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None].expand_as(x)
    pooled = torch.cat([torch.mean(x, 1, keepdim=True), torch.max(x, 1, keepdim=True)[0]], dim=1)
    conv = m.spatial.conv
    return x * torch.sigmoid(F.conv2d(pooled, conv.weight, conv.bias, padding=conv.padding))


def plain_bam(m: nn.Module, x: Tensor) -> Tensor:
    y = F.adaptive_avg_pool2d(x, 1).flatten(1)
    y = F.relu(F.linear(y, m.channel_fc1.weight, m.channel_fc1.bias))
    mc = _bn(F.linear(y, m.channel_fc2.weight), m.channel_norm)
    mc = mc.unsqueeze(2).unsqueeze(3).expand_as(x)
    convs = [layer for layer in m.spatial if isinstance(layer, nn.Conv2d)]
    s = x
    for conv in convs[:-1]:
        s = F.relu(F.conv2d(s, conv.weight, conv.bias, padding=conv.padding, dilation=conv.dilation))
    ms = _bn(F.conv2d(s, convs[-1].weight), m.spatial[-1]).expand_as(x)
    return x + x * torch.sigmoid(mc + ms)


def plain_gc(m: nn.Module, x: Tensor) -> Tensor:
    # the official ContextBlock's spatial_pool and channel_add
    b, c, h, w = x.shape
    input_x = x.view(b, c, h * w).unsqueeze(1)  # (B, 1, C, HW)
    mask = F.conv2d(x, m.key.weight.view(1, c, 1, 1)).view(b, 1, h * w)
    mask = F.softmax(mask, dim=2).unsqueeze(3)  # (B, 1, HW, 1)
    context = torch.matmul(input_x, mask).view(b, c, 1, 1)
    t = F.conv2d(context, m.fc1.weight[:, :, None, None], m.fc1.bias)
    t = F.relu(F.layer_norm(t, (t.shape[1], 1, 1), m.norm.weight[:, None, None], m.norm.bias[:, None, None]))
    t = F.conv2d(t, m.fc2.weight[:, :, None, None], m.fc2.bias)
    return x + t


def plain_sag_mask(m: nn.Module, x: Tensor) -> Tensor:
    for layer in m.convs:
        if isinstance(layer, nn.Conv2d):
            x = F.relu(F.conv2d(x, layer.weight, layer.bias, padding=1))
    pooled = torch.cat([torch.max(x, 1, keepdim=True)[0], torch.mean(x, 1, keepdim=True)], dim=1)
    x = x * torch.sigmoid(F.conv2d(pooled, m.attn_conv.weight, padding=m.attn_conv.padding))
    x = F.relu(F.conv_transpose2d(x, m.deconv.weight, m.deconv.bias, stride=2))
    return F.conv2d(x, m.predictor.weight, m.predictor.bias)


BASELINES: dict[str, Baseline] = {
    "eca": plain_eca,
    "bam": plain_bam,
    "gc": plain_gc,
    "sag_mask": plain_sag_mask,
    "se": plain_se,
    "cbam": plain_cbam,
}


def randomise(module: nn.Module) -> None:
    """Non-trivial weights (GC's zero last layer would make the check vacuous)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, device="cpu").to(p))


def _callers(
    module: nn.Module, baseline: Baseline
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    return module, lambda x: baseline(module, x)


def forward_backward(fn: Callable[[Tensor], Tensor], params: list[Tensor], x: Tensor) -> Callable[[], None]:
    def run() -> None:
        for p in [*params, x]:
            p.grad = None
        fn(x).sum().backward()

    return run


def bench_modules(sizes: list[tuple[int, int, int]], roi: tuple[int, int, int], args) -> list[str]:
    rows = [
        "| mechanism | input (B, C, H=W) | fwd attnzoo ms | fwd plain ms | ratio | fwd+bwd attnzoo ms "
        "| fwd+bwd plain ms | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, baseline in BASELINES.items():
        for batch, channels, side in [roi] if name == "sag_mask" else sizes:
            torch.manual_seed(0)
            module = attnzoo.create(name, channels)
            randomise(module)
            x = torch.randn(batch, channels, side, side)
            module.eval()
            with torch.no_grad():
                torch.testing.assert_close(module(x), baseline(module, x), rtol=1e-3, atol=1e-3)
            module.train()
            xg = x.clone().requires_grad_()
            params = list(module.parameters())
            ours, plain = _callers(module, baseline)
            with torch.no_grad():
                fa = time_call(lambda: ours(x), warmup=args.warmup, repeats=args.repeats).ms
                fp = time_call(lambda: plain(x), warmup=args.warmup, repeats=args.repeats).ms
            ba = time_call(forward_backward(ours, params, xg), warmup=args.warmup, repeats=args.repeats).ms
            bp = time_call(forward_backward(plain, params, xg), warmup=args.warmup, repeats=args.repeats).ms
            rows.append(
                f"| {name} | ({batch}, {channels}, {side}) | {fa:.2f} | {fp:.2f} | {fa / fp:.2f} "
                f"| {ba:.2f} | {bp:.2f} | {ba / bp:.2f} |"
            )
            print(rows[-1], flush=True)
    return rows


def bench_resnet(batch: int, side: int, depth: int, args) -> list[str]:
    names: list[str | None] = [None, "se", "cbam", "eca", "gc", "bam"]
    names += [n for n in ("sk", "split_attention") if n in attnzoo.list_modules()]
    rows = [
        f"| ResNet-{depth} + | params (M) | fwd ms | overhead | fwd+bwd ms | overhead |",
        "|---|---|---|---|---|---|",
    ]
    x = torch.randn(batch, 3, side, side)
    base: tuple[float, float] | None = None
    for name in names:
        torch.manual_seed(0)
        model = resnet(depth, name)
        params = list(model.parameters())
        model.eval()
        with torch.no_grad():
            fwd = time_call(lambda: model(x), warmup=args.warmup, repeats=args.repeats).ms
        model.train()
        xg = x.clone().requires_grad_()
        both = time_call(forward_backward(model, params, xg), warmup=args.warmup, repeats=args.repeats).ms
        if base is None:
            base = (fwd, both)
        label = name or "(plain)"
        count = sum(p.numel() for p in params) / 1e6
        rows.append(
            f"| {label} | {count:.2f} | {fwd:.1f} | {100 * (fwd / base[0] - 1):+.1f}% "
            f"| {both:.1f} | {100 * (both / base[1] - 1):+.1f}% |"
        )
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# peers (issue 13): the peer libraries' computations, written from their source


class TimmCbam(nn.Module):
    """timm's ``CbamModule`` (timm/layers/cbam.py) at its defaults: ``mlp_bias=False``, 7x7."""

    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=False)
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)  # ConvNormAct(apply_act=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: Tensor) -> Tensor:
        # ChannelAttn
        x_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        x = x * torch.sigmoid(x_avg + x_max)
        # SpatialAttn
        x_attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        x_attn = self.bn(self.conv(x_attn))
        return x * torch.sigmoid(x_attn)


TIMM = installed("timm")


def timm_cbam_pair(channels: int) -> tuple[nn.Module, nn.Module]:
    """attnzoo's cbam configured as timm's (no MLP bias, conv + BN) and timm's, same weights."""
    ours = attnzoo.create("cbam", channels, variant="official", mlp_bias=False)
    randomise(ours)
    rd_channels = ours.channel.fc1.out_features
    peer = TimmCbam(channels, rd_channels)
    with torch.no_grad():
        peer.fc1.weight.copy_(ours.channel.fc1.weight[:, :, None, None])
        peer.fc2.weight.copy_(ours.channel.fc2.weight[:, :, None, None])
        # attnzoo's official order is [max; mean], timm's [mean; max]
        peer.conv.weight.copy_(ours.spatial.conv.weight.flip(1))
    peer.bn.load_state_dict(ours.spatial.norm.state_dict())
    if TIMM is not None:  # timm's own module, its entries in the reproduction's order
        cbam = importlib.import_module("timm.layers.cbam")  # not exported by timm.layers
        real = cbam.CbamModule(channels, rd_channels=rd_channels, mlp_bias=False)
        copy_in_order(real, peer)
        peer = real
    return ours, peer


class MmcvContextBlock(nn.Module):
    """mmcv's ``ContextBlock`` (mmcv/cnn/bricks/context_block.py): ``pooling_type='att'``,
    ``fusion_types=('channel_add',)``."""

    def __init__(self, channels: int, planes: int) -> None:
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.softmax = nn.Softmax(dim=2)
        self.channel_add_conv = nn.Sequential(
            nn.Conv2d(channels, planes, kernel_size=1),
            nn.LayerNorm([planes, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, channels, kernel_size=1),
        )

    def spatial_pool(self, x: Tensor) -> Tensor:
        batch, channel, height, width = x.size()
        input_x = x.view(batch, channel, height * width).unsqueeze(1)  # (B, 1, C, HW)
        context_mask = self.conv_mask(x).view(batch, 1, height * width)
        context_mask = self.softmax(context_mask).unsqueeze(-1)  # (B, 1, HW, 1)
        return torch.matmul(input_x, context_mask).view(batch, channel, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        context = self.spatial_pool(x)
        return x + self.channel_add_conv(context)


def mmcv_gc_pair(channels: int) -> tuple[nn.Module, nn.Module]:
    ours = attnzoo.create("gc", channels)
    randomise(ours)  # off the zero init of W_v2
    peer = MmcvContextBlock(channels, ours.rd_channels)
    with torch.no_grad():
        peer.conv_mask.weight.copy_(ours.key.weight[:, :, None, None])
        peer.conv_mask.bias.zero_()  # a constant on every logit: no effect on the softmax
        fc1, norm, fc2 = peer.channel_add_conv[0], peer.channel_add_conv[1], peer.channel_add_conv[3]
        fc1.weight.copy_(ours.fc1.weight[:, :, None, None])
        fc1.bias.copy_(ours.fc1.bias)
        norm.weight.copy_(ours.norm.weight[:, None, None])
        norm.bias.copy_(ours.norm.bias[:, None, None])
        fc2.weight.copy_(ours.fc2.weight[:, :, None, None])
        fc2.bias.copy_(ours.fc2.bias)
    return ours, peer


PEERS: dict[str, tuple[str, Callable[[int], tuple[nn.Module, nn.Module]]]] = {
    "cbam": (peer_label("timm CbamModule", TIMM), timm_cbam_pair),
    "gc": (peer_label("mmcv ContextBlock", None), mmcv_gc_pair),  # mmcv needs its compiled ops
}


def bench_peers(args) -> list[str]:
    """cbam at C 64-256, 32x32 and 64x64; gc at C 64 and 256, 32x32 and 64x64; batch 8. Then each
    at (2, 16, 4, 4), where the arithmetic is negligible: the per-call cost (Python and, on a GPU,
    kernel launches), 200 calls in a row per repeat."""
    batch = 2 if args.quick else 8
    cases = {
        "cbam": [(64, 32), (128, 32), (256, 32), (64, 64), (256, 64)],
        "gc": [(64, 32), (256, 32), (256, 64)],
    }
    if args.quick:
        cases = {"cbam": [(64, 32), (256, 32)], "gc": [(256, 32)]}
    rows = [preamble(args.repeats), "", HEADER]
    print("\n".join(rows), flush=True)
    for name, sizes in cases.items():
        for channels, side in sizes:
            rows += _peer_rows(name, (batch, channels, side, side), args)
    for name in cases:
        rows += _peer_rows(name, (2, 16, 4, 4), args, calls_per_repeat=200)
    return rows


def _peer_rows(name: str, shape: tuple[int, int, int, int], args, calls_per_repeat: int = 1) -> list[str]:
    """Inference and training rows of one module against its peer at one input shape, both dtypes."""
    peer_name, make = PEERS[name]
    size = f"{shape}" + (" (per call)" if calls_per_repeat > 1 else "")
    timing = {"warmup": args.warmup, "repeats": args.repeats, "calls_per_repeat": calls_per_repeat}
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        ours, peer = (m.to(dtype) for m in make(shape[1]))
        x = torch.randn(*shape).to(dtype)
        ours.eval(), peer.eval()
        with torch.no_grad():
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(ours(x), peer(x), rtol=tol, atol=tol)
        r = measure_pair(inference(ours, x), inference(peer, x), **timing)
        rows.append(format_row(name, peer_name, size, dtype, "inference", r))
        print(rows[-1], flush=True)
        ours.train(), peer.train()
        r = measure_pair(
            training(ours, list(ours.parameters()), x), training(peer, list(peer.parameters()), x), **timing
        )
        rows.append(format_row(name, peer_name, size, dtype, "training", r))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (batch 2): a smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first")
    parser.add_argument("--skip-resnet", action="store_true", help="only the modules")
    parser.add_argument("--peers", action="store_true", help="only cbam and gc against timm and mmcv")
    add_device_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peers:
        use_device(args.device)
        args.repeats = args.repeats or (3 if args.quick else 7)
        args.warmup = 1 if args.warmup is None else args.warmup
        rows = bench_peers(args)
        print("\n" + "\n".join(rows))
        return
    if args.quick:
        sizes, roi = [(2, 64, 28), (2, 256, 7)], (2, 64, 14)
        resnet_batch, resnet_side = 2, 64
        args.repeats = args.repeats or 2
        args.warmup = 1 if args.warmup is None else args.warmup
    else:
        sizes, roi = [(32, 256, 56), (32, 1024, 14)], (32, 256, 14)
        resnet_batch, resnet_side = 8, 224
        args.repeats = args.repeats or 5
        args.warmup = 2 if args.warmup is None else args.warmup
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    rows = bench_modules(sizes, roi, args)
    print("\n" + "\n".join(rows) + "\n")
    if not args.skip_resnet:
        rows = bench_resnet(resnet_batch, resnet_side, 50, args)
        print(f"\nResNet-50, batch {resnet_batch}, {resnet_side}x{resnet_side}\n")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
