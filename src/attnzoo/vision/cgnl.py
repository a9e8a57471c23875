"""Compact generalized non-local block (CGNL): attention across positions AND channels, in O(C N).

Yue, Sun, Yuan, Zhou, Ding and Xu 2018, "Compact Generalized Non-local Network" (NeurIPS 2018),
https://arxiv.org/abs/1810.13125. Official code: KaiyuYue/cgnl-network.pytorch (``model/resnet.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, check_variant, parameter_dtype
from attnzoo.functional.global_reasoning import compact_generalized_attention
from attnzoo.layers import reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._spatial import SPATIAL_LAYOUTS

__all__ = ["CompactGeneralizedNonLocal"]

Kernel = Literal["dot", "gaussian"]
Variant = Literal["paper", "official"]


@register(
    "cgnl",
    family="non_local",
    paper=Paper("Compact Generalized Non-local Network", "1810.13125"),
    equation="per group g of G = 8: vec(Y_g) = f(vec(theta_g), vec(phi_g)) vec(g_g) over all C/G*N "
    "(channel, position) entries; dot kernel: Y_g = theta_g (phi_g . g_g); Gaussian: Taylor order 3; "
    "Z = X + GN(W_z Y) (grouped 1x1, GroupNorm zero-initialised)",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B C N (order + 1)); memory O(B C N (order + 1)): the (C N)^2 kernel matrix is "
    "never formed (Taylor factorisation)",
    returns_attn=False,
    placement="stage",
    linear_memory=True,
    samples=(
        Sample(
            "gaussian",
            kwargs={"kernel": "gaussian"},
            description="Gaussian RBF, Taylor order 3",
            thorough=True,
        ),
        Sample(
            "gaussian_official",
            kwargs={"kernel": "gaussian", "variant": "official"},
            description="the official simplified coefficient exp(-2 gamma)",
        ),
        Sample("use_scale", kwargs={"use_scale": True}, description="group sums / sqrt(C/G N)"),
        Sample("groups_1", kwargs={"groups": 1}, description="one group: attention over all C N"),
    ),
    notes="variant='official' (Gaussian kernel only): the authors' code replaces the Taylor "
    "coefficient exp(-gamma (theta^2 + phi^2)) by the constant exp(-2 gamma); use_scale=True "
    "divides by sqrt(C/G N) (the official option, off in its networks). No attention map: the "
    "(C N)^2 kernel matrix is never formed.",
)
class CompactGeneralizedNonLocal(nn.Module):
    """CGNL block: a non-local operation whose "positions" are all (channel, position) pairs.

    theta, phi, g are 1x1 convolutions C -> C/2 (no bias). Their channels are split into G groups;
    within a group every entry (channel c, position j) is a position of its own, M = C/(2G) * N of
    them, and ``vec(Y) = f(vec(theta), vec(phi)) vec(g)`` with an M x M kernel matrix (paper sec.
    3). That matrix is never formed:

    - ``kernel="dot"``: f(t, p) = t p, so ``Y = theta * (sum_j phi_j g_j)``: one scalar per group.
    - ``kernel="gaussian"``: f(t, p) = exp(-gamma (t - p)^2), Taylor-expanded to ``order`` (3):
      ``f ~ exp(-gamma t^2) exp(-gamma p^2) sum_k (2 gamma)^k / k! t^k p^k``, so (order + 1)
      scalars per group.

    Then ``Z = X + GN(W_z Y)`` with W_z a 1x1 conv C/2 -> C grouped by G and GroupNorm(G, C) whose
    weight and bias start at zero (the block starts as the identity). Convs are initialised
    N(0, 0.01) as in the official networks. Sums over entries run in float32 for half inputs.

    Args:
        channels: C (C/2 and C divisible by ``groups``).
        inner_channels: the width of theta, phi, g (default C/2).
        groups: G (official: 8).
        kernel: ``"dot"`` (CGNL) or ``"gaussian"`` (CGNLx).
        order: Taylor order of the Gaussian kernel (official: 3).
        gamma: the Gaussian's gamma (official: 1e-4).
        variant: ``"paper"`` (the exact Taylor coefficient) or ``"official"`` (the constant
            exp(-2 gamma) of the authors' code); only for the Gaussian kernel.
        use_scale: divide each group's sums by sqrt(M) (official option, off in its networks).

    Shape:
        - x: (B, C, L), (B, C, H, W) or (B, C, T, H, W); output: the same.
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int | None = None,
        *,
        groups: int = 8,
        kernel: Kernel = "dot",
        order: int = 3,
        gamma: float = 1e-4,
        variant: Variant = "paper",
        use_scale: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels, inner_channels=inner_channels, groups=groups)
        if kernel not in ("dot", "gaussian"):
            raise ValueError(f"kernel: expected 'dot' or 'gaussian', got {kernel!r}")
        check_variant(variant)
        if variant == "official" and kernel != "gaussian":
            raise ValueError(
                "variant: 'official' changes the Gaussian kernel's coefficient; use kernel='gaussian'"
            )
        if order < 0:
            raise ValueError(f"order: expected a Taylor order >= 0, got {order}")
        if gamma <= 0:
            raise ValueError(f"gamma: expected a positive value, got {gamma}")
        inner = inner_channels or reduced_width(channels, 1 / 2)
        if inner % groups or channels % groups:
            raise ValueError(
                f"groups: expected a positive divisor of both channels ({channels}) and "
                f"inner_channels ({inner}), got {groups}"
            )
        self.channels, self.inner_channels, self.groups = channels, inner, groups
        self.kernel, self.order, self.gamma = kernel, order, gamma
        self.variant, self.use_scale = variant, use_scale
        factory = {"device": device, "dtype": dtype}
        # 1x1 convolutions over the flattened positions (B, C, N): one path for 1-3 spatial dims
        self.theta = nn.Conv1d(channels, inner, 1, bias=False, **factory)
        self.phi = nn.Conv1d(channels, inner, 1, bias=False, **factory)
        self.g = nn.Conv1d(channels, inner, 1, bias=False, **factory)
        self.out_proj = nn.Conv1d(inner, channels, 1, groups=groups, bias=False, **factory)
        self.norm = nn.GroupNorm(groups, channels, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: convs N(0, 0.01), GroupNorm weight and bias zero."""
        for conv in (self.theta, self.phi, self.g, self.out_proj):
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inner_channels={self.inner_channels}, groups={self.groups}, "
            f"kernel={self.kernel!r}, order={self.order}, gamma={self.gamma}, "
            f"variant={self.variant!r}, use_scale={self.use_scale}"
        )

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "x", SPATIAL_LAYOUTS, C=self.channels, dtype=parameter_dtype(self))
        flat = x.flatten(2)  # (B, C, *S) -> (B, C, N)
        y = compact_generalized_attention(
            self.theta(flat),
            self.phi(flat),
            self.g(flat),
            self.groups,
            kernel=self.kernel,
            order=self.order,
            gamma=self.gamma,
            coefficient=self.variant,
            use_scale=self.use_scale,
        )
        return x + self.norm(self.out_proj(y)).view_as(x)  # (B, C, N) -> (B, C, *S)
