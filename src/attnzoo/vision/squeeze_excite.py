"""Squeeze-and-excitation.

Hu et al. 2018, "Squeeze-and-Excitation Networks", https://arxiv.org/abs/1709.01507.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import SPATIAL_LAYOUTS, check_input, check_positive, parameter_dtype
from attnzoo.functional.softmax import mean_of
from attnzoo.layers import LayerSpec, call_layer, create_layer, reduced_width
from attnzoo.registry import Paper, Sample, image_input, register

__all__ = ["POOLS", "SqueezeExcite", "channel_descriptor", "needs_grad"]

#: How the channel descriptor is pooled (see :class:`SqueezeExcite`).
Pool = Literal["avg", "max", "avgmax", "avg_and_max"]
POOLS: tuple[str, ...] = ("avg", "max", "avgmax", "avg_and_max")


def needs_grad(x: Tensor) -> bool:
    """True where autograd will differentiate through ``x`` (always True for an fx Proxy)."""
    return not isinstance(x, Tensor) or (torch.is_grad_enabled() and x.requires_grad)


def channel_descriptor(x: Tensor, pool: str) -> Tensor:
    """Global pooling over every spatial dim: (B, C, *S) -> (B, C); ``pool`` is "avg" or "max"."""
    if pool == "avg":
        return mean_of(x.flatten(2), -1)  # (B, C, *S) -> (B, C, prod(S)) -> (B, C)
    if pool == "max":
        if needs_grad(x):
            # max(dim), not amax, where a gradient flows: its backward scatters through the
            # indices, where amax's splits the gradient over ties with full-size masks (2.7x slower
            # measured at (32, 256, 56, 56))
            return x.flatten(2).max(dim=-1).values  # (B, C, *S) -> (B, C, prod(S)) -> (B, C)
        # without a gradient amax is ~6x faster: max(dim) also computes and writes the indices
        return x.flatten(2).amax(dim=-1)
    raise ValueError(f"pool: expected 'avg' or 'max', got {pool!r}")


@register(
    "se",
    placement="residual",
    map_kind="channel",
    linear_memory=True,
    family="gating",
    paper=Paper("Squeeze-and-Excitation Networks", "1709.01507"),
    equation="y = x * sigmoid(W2 relu(W1 GAP(x) + b1) + b2), W1: C -> C/r, W2: C/r -> C, r = 16",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B C HW + B C^2 / r); memory O(B C HW) (the gated output)",
    notes="pool='avgmax' adds max-pooling to the descriptor (0.5 (avg + max), timm's add_maxpool); "
    "pool='avg_and_max' runs both descriptors through the MLP and sums the logits (CBAM's channel "
    "branch); single_fc=True is the effective SE (eSE) of CenterMask/VoVNetV2: one C -> C FC",
    samples=(
        Sample("pool=max", {"pool": "max"}, description="max-pooled descriptor"),
        Sample("pool=avgmax", {"pool": "avgmax"}, description="SE with max-pooling added (timm)"),
        Sample("pool=avg_and_max", {"pool": "avg_and_max"}, description="CBAM-style two-descriptor MLP"),
        Sample(
            "effective",
            {"single_fc": True, "gate_layer": "hard_sigmoid"},
            description="eSE (VoVNetV2): one C -> C FC, hard sigmoid",
        ),
        Sample("bias=False", {"bias": False}, description="FC layers without biases"),
        Sample(
            "video",
            inputs=lambda s: (torch.randn(s.batch, s.width, 3, s.extent, s.extent).to(s.device, s.dtype),),
            description="(B, C, T, H, W) input",
        ),
    ),
)
class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: gate each channel by a function of a global descriptor.

    ``s = sigmoid(W2 delta(W1 z + b1) + b2)``, ``z = GAP(x)``, ``y = s * x``, with
    W1: C -> C/r and W2: C/r -> C (r = 16 in the paper). In a ResNet it goes on the residual
    branch, before the addition with the identity (paper, Fig. 3).

    The same module is the channel branch of CBAM (:class:`attnzoo.vision.cbam.ChannelAttention`
    is this class with ``pool="avg_and_max"``) and, with ``single_fc=True``, the effective SE of
    CenterMask / VoVNetV2 (Lee and Park 2020, https://arxiv.org/abs/1911.06667, section 3.3):
    ``s = hsigmoid(W z + b)`` with one W: C -> C, which keeps every channel's information where
    the bottleneck of SE loses some (pass ``gate_layer="hard_sigmoid"`` as VoVNetV2 does).

    Args:
        channels: C.
        rd_ratio: 1/r, the bottleneck ratio (paper: 1/16).
        rd_channels: the bottleneck width, overriding ``rd_ratio``.
        rd_divisor: round the bottleneck to a multiple of this (1 = exact C/r as in the paper;
            timm uses 8). Never rounds to zero width.
        pool: the descriptor z: ``"avg"`` (paper: global average pooling), ``"max"`` (global max
            pooling), ``"avgmax"`` (SE with max-pooling added: ``z = (GAP(x) + GMP(x)) / 2``, as
            timm's ``add_maxpool``) or ``"avg_and_max"`` (CBAM eq. 2: both descriptors through the
            shared MLP, logits summed: ``s = sigma(MLP(GAP(x)) + MLP(GMP(x)))``).
        single_fc: the effective SE (eSE): one FC ``W: C -> C`` (with bias) replaces the
            bottleneck, no activation; ``rd_*`` and ``act_layer`` are then unused.
        act_layer: the bottleneck activation delta (name, class or factory; default ReLU).
        gate_layer: the gate (default sigmoid; ``"hard_sigmoid"`` for MobileNetV3 and eSE).
        bias: biases in the FC layers (paper: yes).

    Shape:
        - x: (B, C, L), (B, C, H, W) or (B, C, T, H, W).
        - output: same as x; attention (``return_attn``): the gate s, (B, C, 1, ...) broadcastable
          to x.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        *,
        pool: Pool = "avg",
        single_fc: bool = False,
        act_layer: LayerSpec = "relu",
        gate_layer: LayerSpec = "sigmoid",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        if pool not in POOLS:
            raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
        self.channels, self.pool, self.single_fc = channels, pool, single_fc
        factory = {"device": device, "dtype": dtype}
        # Linear on the pooled (B, C) vector equals the paper's 1x1 convs and works for any rank.
        if single_fc:
            self.fc1 = nn.Linear(channels, channels, bias=bias, **factory)  # eSE's single W: C -> C
            self.act: nn.Module = nn.Identity()
            self.fc2: nn.Module = nn.Identity()
        else:
            width = reduced_width(channels, rd_ratio, rd_channels, rd_divisor)
            self.fc1 = nn.Linear(channels, width, bias=bias, **factory)
            self.act = create_layer(act_layer, argument="act_layer")
            self.fc2 = nn.Linear(width, channels, bias=bias, **factory)
        self.gate = create_layer(gate_layer, argument="gate_layer")

    def excite(self, z: Tensor) -> Tensor:
        """The logits before the gate, ``W2 delta(W1 z)`` (or ``W z`` for eSE), (..., C) -> (..., C)."""
        return call_layer(self.fc2, call_layer(self.act, call_layer(self.fc1, z)))

    def attention(self, x: Tensor) -> Tensor:
        """The gate s, shaped (B, C, 1, ...) to broadcast over x."""
        check_input(x, "x", SPATIAL_LAYOUTS, C=self.channels, dtype=parameter_dtype(self))
        if self.pool == "avg_and_max":
            # both descriptors through the same MLP in one batch: (2, B, C) -> (B, C)
            pooled = torch.stack([channel_descriptor(x, "avg"), channel_descriptor(x, "max")])
            logits = self.excite(pooled).sum(dim=0)
        elif self.pool == "avgmax":
            logits = self.excite(0.5 * (channel_descriptor(x, "avg") + channel_descriptor(x, "max")))
        else:
            logits = self.excite(channel_descriptor(x, self.pool))  # (B, C)
        weights = call_layer(self.gate, logits)
        return weights.view(*weights.shape, *([1] * (x.dim() - 2)))  # (B, C) -> (B, C, 1, ...)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        scale = self.attention(x)
        out = x * scale
        return (out, scale) if return_attn else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, pool={self.pool!r}, single_fc={self.single_fc}"
