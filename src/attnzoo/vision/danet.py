"""DANet dual attention: position attention (PAM) and channel attention (CAM).

Fu, Liu, Tian, Li, Bao, Fang and Lu 2019, "Dual Attention Network for Scene Segmentation",
https://arxiv.org/abs/1809.02983. Official code: junfu1115/DANet (``PAM_Module``, ``CAM_Module``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, check_variant, parameter_dtype
from attnzoo.functional.attend import attend_with_weights
from attnzoo.functional.softmax import compute_dtype, masked_softmax
from attnzoo.layers import reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._spatial import from_tokens, to_tokens

__all__ = ["BRANCHES", "ChannelAttentionModule", "DualAttention", "PositionAttentionModule"]

BRANCHES: tuple[str, ...] = ("position", "channel")
CamVariant = Literal["paper", "official"]


class PositionAttentionModule(nn.Module):
    """PAM: every position attends to every position, ``E = alpha S + A``.

    ``s_ji = softmax_i(B_i . C_j)`` over the N = H W positions (no scaling), with B, C 1x1
    convolutions to C/8 and D a 1x1 convolution to C; ``E_j = alpha sum_i s_ji D_i + A_j``,
    alpha = 0 at init. In the code's names C is the query (the output position j) and B the key.
    The key has no bias: ``q_j . b_k`` is the same for every key i, so the softmax cancels it.

    Args:
        channels: C.
        rd_ratio: C' / C for B and C (paper and code: 1/8).

    Shape:
        - x: (B, C, H, W); output: the same; attention: (B, N, N), rows summing to 1.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 8,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.channels = channels
        self.inner = reduced_width(channels, rd_ratio)
        self.query = nn.Linear(channels, self.inner, **factory)
        self.key = nn.Linear(channels, self.inner, bias=False, **factory)
        self.value = nn.Linear(channels, channels, **factory)
        self.alpha = nn.Parameter(torch.zeros((), **factory))

    def reset_parameters(self) -> None:
        for layer in (self.query, self.key, self.value):
            layer.reset_parameters()
        nn.init.zeros_(self.alpha)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        tokens = to_tokens(x)  # (B, C, H, W) -> (B, N, C), contiguous
        q, k, v = self.query(tokens), self.key(tokens), self.value(tokens)  # (B, N, C'), (B, N, C)
        # the paper's energy is the bare product B^T C: scale 1, not 1/sqrt(C')
        attended, maps = attend_with_weights(q, k, v, score="dot", scale=1.0, return_weights=return_attn)
        out = x + self.alpha * from_tokens(attended, x.shape[2:])  # (B, N, C) -> (B, C, H, W)
        return out if maps is None else (out, maps)


class ChannelAttentionModule(nn.Module):
    """CAM: every channel attends to every channel, ``E = beta X + A``.

    With A reshaped to (C, N): ``x_ji = softmax_i(A_i . A_j)`` over the C channels (no
    projections) and ``E_j = beta sum_i x_ji A_i + A_j``, beta = 0 at init. The C x C map is small;
    it is computed in float32 for half-precision inputs, because the energies are sums over all
    N positions and reach the thousands.

    Args:
        channels: C.
        variant: ``"paper"``: softmax(A A^T). ``"official"``: NOTE: deviates from the paper as
            the official code does: softmax(rowmax(E) - E), which equals softmax(-E), i.e. each
            channel attends most to the channels LEAST similar to it.

    Shape:
        - x: (B, C, H, W); output: the same; attention: (B, C, C), rows summing to 1.
    """

    def __init__(
        self,
        channels: int,
        *,
        variant: CamVariant = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_variant(variant, "cam_variant")
        self.channels, self.variant = channels, variant
        self.beta = nn.Parameter(torch.zeros((), device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.beta)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        features = x.flatten(2)  # (B, C, H, W) -> (B, C, N), a view
        compute = features.to(compute_dtype(x.dtype))  # C x C sums over N positions: float32 for half
        energy = compute @ compute.transpose(1, 2)  # (B, C, N) @ (B, N, C) -> (B, C, C)
        if self.variant == "official":
            energy = energy.amax(dim=-1, keepdim=True) - energy
        maps = masked_softmax(energy)  # (B, C, C)
        attended = (maps @ compute).to(x.dtype)  # (B, C, C) @ (B, C, N) -> (B, C, N)
        out = x + self.beta * attended.view_as(x)  # (B, C, N) -> (B, C, H, W)
        return (out, maps) if return_attn else out


@register(
    "danet",
    placement="stage",
    map_kind="mixed",
    linear_memory=True,
    family="non_local",
    paper=Paper("Dual Attention Network for Scene Segmentation", "1809.02983"),
    equation="PAM: E_j = alpha sum_i softmax_i(B_i . C_j) D_i + A_j; CAM: E_j = beta sum_i "
    "softmax_i(A_i . A_j) A_i + A_j (channels); out = PAM(A) + CAM(A); alpha = beta = 0 at init",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B N^2 C / 8 + B N C^2); memory O(B N C + B C^2) without maps (fused kernel for "
    "PAM), O(B N^2) with return_attn",
    notes="cam_variant='official': softmax(max - energy) as in the official CAM_Module; "
    "branches=('position',) or ('channel',) for one module alone. The segmentation head's 3x3 "
    "conv/BN/ReLU layers around each module are not part of the mechanism.",
    samples=(
        Sample("branches=position", {"branches": ("position",)}),
        Sample("branches=channel", {"branches": ("channel",)}),
        Sample("cam_variant=official", {"cam_variant": "official"}),
    ),
)
class DualAttention(nn.Module):
    """DANet's position and channel attention modules, summed.

    ``out = PAM(A) + CAM(A)`` (paper section 3.4: the two modules' outputs are fused by an
    element-wise sum), each a residual block with a zero-initialised gate (alpha for PAM, beta
    for CAM). NOTE: deviates from the official head, which puts 3x3 conv + BN + ReLU layers
    (to C/4) before and after each module: those belong to the segmentation head, not the
    mechanism. With both branches the output at init is therefore 2A. No fixed H, W (a popular
    re-implementation hard-codes 7 x 7).

    Args:
        channels: C.
        rd_ratio: PAM's query/key width C' / C (paper: 1/8).
        branches: which modules run: a non-empty subset of ``("position", "channel")``.
        cam_variant: ``"paper"`` (softmax(A A^T)) or ``"official"`` (softmax(max - A A^T)).

    Shape:
        - x: (B, C, H, W); output: the same.
        - attention (``return_attn``): ``{"position": (B, N, N), "channel": (B, C, C)}`` for the
          branches that run, N = H W.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 8,
        *,
        branches: Sequence[str] = BRANCHES,
        cam_variant: CamVariant = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        if isinstance(branches, str):
            branches = (branches,)
        branches = tuple(branches)
        if not branches or any(b not in BRANCHES for b in branches) or len(set(branches)) != len(branches):
            raise ValueError(
                f"branches: expected a non-empty subset of {BRANCHES} without repeats, got {branches!r}"
            )
        self.channels, self.branches = channels, branches
        factory = {"device": device, "dtype": dtype}
        self.pam = PositionAttentionModule(channels, rd_ratio, **factory) if "position" in branches else None
        self.cam = (
            ChannelAttentionModule(channels, variant=cam_variant, **factory)
            if "channel" in branches
            else None
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, branches={self.branches}"

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        outputs: list[Tensor] = []
        maps: dict[str, Tensor] = {}
        for name, module in (("position", self.pam), ("channel", self.cam)):
            if module is None:
                continue
            if return_attn:
                out, maps[name] = module(x, return_attn=True)
            else:
                out = module(x)
            outputs.append(out)
        out = outputs[0] if len(outputs) == 1 else outputs[0] + outputs[1]
        return (out, maps) if return_attn else out
