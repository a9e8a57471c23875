"""Disentangled non-local block: a whitened pairwise term plus a separate unary term.

Yin, Yao, Cao, Li, Zhang, Lin and Hu 2020, "Disentangled Non-Local Neural Networks",
https://arxiv.org/abs/2006.06668. Official code: yinmh17/DNL-Semantic-Segmentation and the
authors' ``DNLHead`` in mmsegmentation.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import SPATIAL_LAYOUTS, check_input, check_positive, check_variant, parameter_dtype
from attnzoo.functional.attend import attend_with_weights
from attnzoo.functional.softmax import masked_softmax
from attnzoo.layers import NormLayer, reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._spatial import to_tokens
from attnzoo.vision._token_norm import apply_token_norm, create_token_norm, zero_init_last_norm

__all__ = ["DisentangledNonLocal"]

Variant = Literal["paper", "official"]


@register(
    "dnl",
    placement="stage",
    map_kind="mixed",
    linear_memory=True,
    family="non_local",
    paper=Paper("Disentangled Non-Local Neural Networks", "2006.06668"),
    equation="w_ij = softmax_j((q_i - mu_q)^T (k_j - mu_k) / tau) + softmax_j(W_m x_j); "
    "y_i = sum_j w_ij g(x_j); z_i = BN(W_z y_i) + x_i",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B N^2 C); memory O(B N C) without maps (whitened q, k through the fused kernel; "
    "the unary term is a pooling), O(B N^2) with return_attn",
    notes="variant='official' scales the pairwise logits by 1/sqrt(C') and uses temperature 0.05 "
    "(mmsegmentation's DNLHead defaults); the unary conv has no bias (a softmax over positions "
    "cancels it), nor do theta and phi (whitening cancels theirs).",
    samples=(
        Sample("variant=official", {"variant": "official"}),
        Sample(
            "norm_layer=GroupNorm",
            {"norm_layer": lambda s: functools.partial(nn.GroupNorm, 2)},
            description="GroupNorm on the output (trains with a batch of one)",
        ),
        Sample("norm_layer=None", {"norm_layer": None}, description="no norm; W_z zero-initialised"),
    ),
)
class DisentangledNonLocal(nn.Module):
    """Disentangled non-local (DNL) block.

    With ``q_i = W_q x_i``, ``k_j = W_k x_j`` (theta and phi, to C' = C/2) and the means over
    positions ``mu_q = mean_i q_i``, ``mu_k = mean_j k_j`` (per image), the attention is
    (paper eq. for omega^D)::

        w_ij = softmax_j( s (q_i - mu_q)^T (k_j - mu_k) / tau )  +  softmax_j( W_m x_j )
               \\________ whitened pairwise term ________/       \\___ unary term ___/

    and, as in the non-local block it extends, ``y_i = sum_j w_ij g(x_j)``,
    ``z_i = BN(W_z y_i) + x_i`` with the BN scale zero-initialised (identity at init). ``s`` is 1
    (paper) or 1/sqrt(C') (``use_scale``), ``tau`` the temperature (paper: 1).

    Inside the softmax over j, the terms of the whitened product that do not depend on j
    (``-q_i . mu_k`` and ``mu_q . mu_k``) cancel, so subtracting mu_k does not change the
    weights; subtracting mu_q does: it removes the unary ``mu_q . k_j`` that the plain non-local
    block hides in its pairwise term. The equation is implemented as written (both means
    subtracted, then the fused kernel), which also centres the logits.

    Args:
        channels: C.
        rd_ratio: C' / C (1/2, as the non-local block).
        rd_channels: C' directly.
        temperature: tau, dividing the pairwise logits (default: 1 paper, 0.05 official).
        use_scale: multiply the pairwise logits by 1/sqrt(C') (default: False paper, True
            official).
        variant: ``"paper"`` or ``"official"`` (mmsegmentation ``DNLHead``: ``use_scale=True``,
            ``temperature=0.05``); explicit ``temperature`` / ``use_scale`` override it.
        norm_layer: the normalisation after W_z, called as ``norm_layer(C)`` on the (B, C, N)
            tokens of every input rank viewed as (B, C, 1, N) (default ``nn.BatchNorm2d``: the
            statistics of the paper's BN on the input and the state_dict keys of earlier
            releases; e.g. ``functools.partial(nn.GroupNorm, 32)``; norms that reject 4-D maps are
            refused). Its weight, when it has one, is zero-initialised (identity at init). None:
            no norm, W_z with a bias and itself zero-initialised. As
            :class:`~attnzoo.vision.non_local.NonLocalBlock`.

    Shape:
        - x: (B, C, L), (B, C, H, W) or (B, C, T, H, W); output: the same.
        - attention (``return_attn``): ``{"pairwise": (B, N, N), "unary": (B, N)}``, each row a
          softmax over the N positions (the full weights are ``pairwise + unary[:, None, :]``).
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 2,
        rd_channels: int | None = None,
        *,
        temperature: float | None = None,
        use_scale: bool | None = None,
        variant: Variant = "paper",
        norm_layer: NormLayer = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        check_variant(variant)
        official = variant == "official"
        temperature = (0.05 if official else 1.0) if temperature is None else temperature
        if not temperature > 0:
            raise ValueError(f"temperature: expected a positive value, got {temperature}")
        self.channels, self.variant = channels, variant
        self.temperature = float(temperature)
        self.use_scale = official if use_scale is None else use_scale
        self.inner = reduced_width(channels, rd_ratio, rd_channels)
        factory = {"device": device, "dtype": dtype}
        # whitening subtracts the mean over positions, which removes any bias: none on theta, phi
        self.theta = nn.Linear(channels, self.inner, bias=False, **factory)
        self.phi = nn.Linear(channels, self.inner, bias=False, **factory)
        self.g = nn.Linear(channels, self.inner, **factory)
        # W_m: the unary logits; a bias would be cancelled by the softmax over positions
        self.unary = nn.Linear(channels, 1, bias=False, **factory)
        # a bias before the norm is cancelled or redundant with its shift: only without a norm
        self.w_z = nn.Linear(self.inner, channels, bias=norm_layer is None, **factory)
        self.norm = create_token_norm(norm_layer, channels, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: theta, phi, g, W_z ~ N(0, 0.01); W_m default; norm scale 0 (or W_z = 0)."""
        for layer in (self.theta, self.phi, self.g, self.w_z):
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        self.unary.reset_parameters()
        zero_init_last_norm(self.norm, self.w_z)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inner={self.inner}, temperature={self.temperature}, "
            f"use_scale={self.use_scale}"
        )

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        check_input(x, "x", SPATIAL_LAYOUTS, C=self.channels, dtype=parameter_dtype(self))
        spatial = x.shape[2:]
        tokens = to_tokens(x)  # (B, C, *S) -> (B, N, C), contiguous
        query, key = self.theta(tokens), self.phi(tokens)  # (B, N, C')
        # whitening: subtract the per-image mean over positions (dim 1) from queries and keys
        query = query - query.mean(dim=1, keepdim=True)
        key = key - key.mean(dim=1, keepdim=True)
        value = self.g(tokens)  # (B, N, C')
        scale = (self.inner**-0.5 if self.use_scale else 1.0) / self.temperature
        pairwise_out, pairwise = attend_with_weights(
            query, key, value, score="dot", scale=scale, return_weights=return_attn
        )
        # unary term: one softmax over positions shared by every query, i.e. a global pooling
        unary = masked_softmax(self.unary(tokens).squeeze(-1))  # (B, N, 1) -> (B, N)
        # (B, 1, N) @ (B, N, C') -> (B, 1, C'), broadcast to every position i
        unary_out = unary.to(value.dtype).unsqueeze(1) @ value
        y = pairwise_out + unary_out  # (B, N, C')
        z = apply_token_norm(self.norm, self.w_z(y).transpose(1, 2))  # (B, N, C) -> (B, C, N)
        out = x + z.unflatten(2, spatial)  # (B, C, N) -> (B, C, *S)
        if pairwise is None:
            return out
        return out, {"pairwise": pairwise, "unary": unary}
