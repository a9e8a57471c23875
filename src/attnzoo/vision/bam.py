"""BAM: bottleneck attention module (parallel channel and spatial branches, residual gating).

Park et al. 2018, "BAM: Bottleneck Attention Module", https://arxiv.org/abs/1807.06514.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, check_variant, parameter_dtype
from attnzoo.layers import LayerSpec, NormLayer, create_layer, create_norm, reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._norm import check_batch_statistics
from attnzoo.vision.squeeze_excite import channel_descriptor

__all__ = ["BAM"]

Variant = Literal["paper", "official"]
Fusion = Literal["sum", "product"]


@register(
    "bam",
    placement="stage",
    map_kind="mixed",
    linear_memory=True,
    family="gating",
    paper=Paper("BAM: Bottleneck Attention Module", "1807.06514"),
    equation="F' = F + F * sigmoid(M_c(F) + M_s(F)); M_c = BN(MLP(GAP(F))), C -> C/r -> C; "
    "M_s = BN(conv1x1(conv3x3_d4(conv3x3_d4(conv1x1(F))))), C -> C/r -> C/r -> C/r -> 1; r = 16",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B C HW + B HW C^2 / r + 18 B HW C^2 / r^2); memory O(B C HW)",
    notes="variant='official' is the authors' code: BN+ReLU after every hidden layer, no BN at the "
    "branch ends, biases everywhere, and the branches MULTIPLIED (fusion='product'); the paper sums",
    samples=(
        Sample("fusion=product", {"fusion": "product"}),
        Sample(
            "variant=official",
            {"variant": "official"},
            skips={"gradients": "the BN after the official channel MLP's first FC cancels its bias"},
        ),
    ),
)
class BAM(nn.Module):
    """Bottleneck attention module: one 3-D attention map from a channel and a spatial branch.

    ``M(F) = sigma(M_c(F) + M_s(F))`` and ``F' = F + F * M(F)`` (paper eq. 1-2), with
    ``M_c(F) = BN(W_1 delta(W_0 GAP(F) + b_0))`` (eq. 3; W_0: C -> C/r, W_1: C/r -> C) and
    ``M_s(F) = BN(f_3^{1x1}(f_2^{3x3}(f_1^{3x3}(f_0^{1x1}(F)))))`` (eq. 4; 1x1 to C/r, two 3x3
    convs of dilation d = 4, 1x1 to one map); r = 16. M_c (B, C, 1, 1) and M_s (B, 1, H, W) are
    broadcast to (B, C, H, W) before the sum. The paper places one BAM at each bottleneck of the
    network, where the feature maps are downsampled: in a ResNet at the end of every stage but the
    last.

    The paper writes the MLP and the conv stack without activations; ReLU follows every hidden
    layer here, as in the authors' code. NOTE: the bias b_1 of eq. 3 and the last 1x1 conv's bias
    sit right before a BatchNorm, which removes any constant in training (their gradient is zero)
    and has its own shift: they are left out in the paper variant.

    Args:
        channels: C.
        rd_ratio: 1/r (paper: 1/16), for both branches.
        rd_channels: the bottleneck width C/r, overriding ``rd_ratio``.
        rd_divisor: round the bottleneck to a multiple of this (1 = floor of C/r, as the paper).
        dilation: d of the 3x3 convs (paper: 4).
        num_dilated: how many dilated 3x3 convs (paper: 2).
        act_layer: the hidden activation (default ReLU).
        gate_layer: the gate (default sigmoid).
        variant: ``"paper"`` (BN at the end of each branch, as eq. 3-4) or ``"official"`` (the
            authors' code, so its weights load here: Linear/conv + BN + ReLU for every hidden
            layer, no BN at the branch ends, biases in every layer).
        fusion: how the branches combine before the gate: ``"sum"`` (paper, its best in Table 1)
            or ``"product"`` (the authors' code). None: the variant's own (sum / product).
        norm_layer: the normalisation (default BatchNorm), called as ``norm_layer(channels)`` and
            applied to (B, C', H, W) maps; the channel branch's vectors go through it as
            (B, C', 1, 1), which for BatchNorm has the statistics of a BatchNorm1d over (B, C').
            None: no normalisation anywhere.

    Shape:
        - x: (B, C, H, W); output: the same.
        - attention (``return_attn``): ``{"channel": M_c (B, C, 1, 1), "spatial": M_s
          (B, 1, H, W), "gate": M (B, C, H, W)}`` (M_c, M_s before the gate).
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        dilation: int = 4,
        num_dilated: int = 2,
        *,
        act_layer: LayerSpec = "relu",
        gate_layer: LayerSpec = "sigmoid",
        variant: Variant = "paper",
        fusion: Fusion | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        check_variant(variant)
        fusion = fusion or ("product" if variant == "official" else "sum")
        if fusion not in ("sum", "product"):
            raise ValueError(f"fusion: expected 'sum', 'product' or None, got {fusion!r}")
        if dilation < 1:
            raise ValueError(f"dilation: expected a positive dilation, got {dilation}")
        if num_dilated < 0:
            raise ValueError(f"num_dilated: expected a count >= 0, got {num_dilated}")
        self.channels, self.variant, self.fusion = channels, variant, fusion
        width = reduced_width(channels, rd_ratio, rd_channels, rd_divisor)
        factory = {"device": device, "dtype": dtype}
        official = variant == "official"

        def hidden_norm(n: int) -> nn.Module:
            return create_norm(norm_layer, n, **factory) if official else nn.Identity()

        def end_norm(n: int) -> nn.Module:
            return nn.Identity() if official else create_norm(norm_layer, n, **factory)

        # channel branch: GAP -> FC -> [BN] -> act -> FC -> BN (paper) / no end BN (official)
        self.channel_fc1 = nn.Linear(channels, width, **factory)
        self.channel_norm1 = hidden_norm(width)
        self.channel_act = create_layer(act_layer, argument="act_layer")
        self.channel_fc2 = nn.Linear(width, channels, bias=official, **factory)
        self.channel_norm = end_norm(channels)

        # spatial branch: 1x1 reduce -> num_dilated x (3x3, dilation d) -> 1x1 to one map
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 1, **factory), hidden_norm(width)]
        layers.append(create_layer(act_layer, argument="act_layer"))
        for _ in range(num_dilated):
            layers += [
                nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, **factory),
                hidden_norm(width),
                create_layer(act_layer, argument="act_layer"),
            ]
        layers.append(nn.Conv2d(width, 1, 1, bias=official, **factory))
        layers.append(end_norm(1))
        self.spatial = nn.Sequential(*layers)
        self.gate = create_layer(gate_layer, argument="gate_layer")

    def channel_attention(self, x: Tensor) -> Tensor:
        """M_c(x) before the gate, (B, C, 1, 1)."""
        # (B, C') -> (B, C', 1, 1): the norm layers take maps
        hidden = self.channel_fc1(channel_descriptor(x, "avg"))[:, :, None, None]
        hidden = self.channel_act(self.channel_norm1(hidden)).flatten(1)  # (B, C', 1, 1) -> (B, C')
        return self.channel_norm(self.channel_fc2(hidden)[:, :, None, None])  # (B, C) -> (B, C, 1, 1)

    def spatial_attention(self, x: Tensor) -> Tensor:
        """M_s(x) before the gate, (B, 1, H, W)."""
        return self.spatial(x)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        for norm in (self.channel_norm1, self.channel_norm):  # the norms of the pooled vector
            check_batch_statistics(norm, x, "BAM's norm over the pooled channel vector")
        channel = self.channel_attention(x)
        spatial = self.spatial_attention(x)
        # (B, C, 1, 1) with (B, 1, H, W) -> (B, C, H, W)
        combined = channel + spatial if self.fusion == "sum" else channel * spatial
        gate = self.gate(combined)
        # F + F * M(F) as F * (1 + M(F)): one product to differentiate instead of two and a sum
        out = x * (gate + 1)
        if return_attn:
            return out, {"channel": channel, "spatial": spatial, "gate": gate}
        return out
