"""SAGAN self-attention block.

Zhang, Goodfellow, Metaxas and Odena 2019, "Self-Attention Generative Adversarial Networks",
https://arxiv.org/abs/1805.08318. Official code: brain-research/self-attention-gan
(``sn_non_local_block_sim``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from attnzoo._checks import check_input, check_positive, check_variant, parameter_dtype
from attnzoo.functional.attend import attend_with_weights
from attnzoo.layers import reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._spatial import check_poolable, from_tokens, max_pool_tokens, to_tokens

__all__ = ["SAGANAttention"]

Variant = Literal["paper", "official"]
_POOL = (2, 2)


@register(
    "sagan",
    placement="stage",
    map_kind="pairwise",
    linear_memory=True,
    family="non_local",
    paper=Paper("Self-Attention Generative Adversarial Networks", "1805.08318"),
    equation="beta_{j,i} = softmax_i(f(x_i)^T g(x_j)); o_j = v(sum_i beta_{j,i} h(x_i)); "
    "y_j = gamma o_j + x_j, gamma = 0 at init; f, g, h: C -> C/8 (official h: C -> C/2), v: back to C",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B N^2 C / 8 + B N C^2); memory O(B N C) without maps (fused kernel), "
    "O(B N^2) with return_attn (N' = N/4 keys with subsample)",
    notes="variant='official': h to C/2 and keys/values max-pooled 2x2 (the official code). "
    "spectral_norm=True wraps the four 1x1 convs in torch's spectral_norm parametrization: off by "
    "default because parametrized modules cannot be pickled (state_dict works).",
    samples=(
        Sample("subsample", {"subsample": True}, description="2x2 max-pooled keys and values"),
        Sample("variant=official", {"variant": "official"}),
        Sample(
            "spectral_norm",
            {"spectral_norm": True},
            skips={
                "derivative": "in training each forward takes a power-iteration step whose u, v "
                "autograd holds constant (torch's spectral_norm, as the paper): not the derivative of "
                "the whole forward"
            },
        ),
    ),
)
class SAGANAttention(nn.Module):
    """SAGAN self-attention: softmax attention over all positions, gated residual.

    With 1x1 convolutions f, g, h (C -> C-bar) and v (C-bar -> C), paper section 3:

        ``s_ij = f(x_i)^T g(x_j)``, ``beta_{j,i} = exp(s_ij) / sum_i exp(s_ij)`` (no scaling),
        ``o_j = v(sum_i beta_{j,i} h(x_i))``, ``y_j = gamma o_j + x_j``, gamma = 0 at init.

    So position j's query is g(x_j) and f(x_i) are the keys. The paper takes C-bar = C/8 for all
    of f, g, h. NOTE: the official code differs: h (``sn_conv_g``) maps to C/2, and the keys and
    values are max-pooled 2x2 (N/4 of them); ``variant="official"`` sets both. Official names:
    ``sn_conv_theta`` = g (queries), ``sn_conv_phi`` = f (keys), ``sn_conv_g`` = h,
    ``sn_conv_attn`` = v. The convolutions have no bias in the paper (matrices W) and the code.

    Args:
        channels: C.
        rd_ratio: C-bar / C for the queries and keys (paper: 1/8).
        value_ratio: width of h as a ratio of C (default: 1/8 paper, 1/2 official).
        subsample: max-pool keys and values 2x2 (default: False paper, True official); H and W
            must be at least 2.
        spectral_norm: wrap f, g, h, v in ``torch.nn.utils.parametrizations.spectral_norm``, as
            SAGAN trains both networks. Off by default: a parametrized module cannot be pickled
            (``torch.save(module)``); state_dict, torch.compile and torch.export work.
        variant: ``"paper"`` or ``"official"`` (see above).
        bias: biases in the four convolutions (paper and official: none).

    Shape:
        - x: (B, C, H, W); output: the same.
        - attention (``return_attn``): beta as (B, N, N') with rows j summing to 1, N = H W
          (N' = N with the paper's defaults, floor(H/2) floor(W/2) with ``subsample``).
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 8,
        value_ratio: float | None = None,
        *,
        subsample: bool | None = None,
        spectral_norm: bool = False,
        variant: Variant = "paper",
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        check_variant(variant)
        official = variant == "official"
        self.channels, self.variant = channels, variant
        self.subsample = official if subsample is None else subsample
        value_ratio = (1 / 2 if official else 1 / 8) if value_ratio is None else value_ratio
        self.inner = reduced_width(channels, rd_ratio)
        self.value_width = reduced_width(channels, value_ratio)
        factory = {"device": device, "dtype": dtype}
        self.f = nn.Linear(channels, self.inner, bias=bias, **factory)  # keys
        self.g = nn.Linear(channels, self.inner, bias=bias, **factory)  # queries
        self.h = nn.Linear(channels, self.value_width, bias=bias, **factory)  # values
        self.v = nn.Linear(self.value_width, channels, bias=bias, **factory)  # back to C
        self.gamma = nn.Parameter(torch.zeros((), **factory))
        self.reset_parameters()
        if spectral_norm:
            for name in ("f", "g", "h", "v"):
                setattr(self, name, _spectral_norm(getattr(self, name)))

    def reset_parameters(self) -> None:
        """Official init: Glorot-uniform convolutions, zero biases, gamma = 0."""
        for layer in (self.f, self.g, self.h, self.v):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.gamma)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inner={self.inner}, value_width={self.value_width}, "
            f"subsample={self.subsample}, variant={self.variant!r}"
        )

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        spatial = x.shape[2:]
        if self.subsample:
            check_poolable(x, "x", _POOL)
        tokens = to_tokens(x)  # (B, C, H, W) -> (B, N, C), contiguous
        query = self.g(tokens)  # (B, N, C/8)
        key = self.f(tokens)  # (B, N, C/8)
        value = self.h(tokens)  # (B, N, C-bar_h)
        if self.subsample:
            key = max_pool_tokens(key, spatial, _POOL)  # (B, N/4, C/8)
            value = max_pool_tokens(value, spatial, _POOL)  # (B, N/4, C-bar_h)
        # the paper's logits are the bare dot product: no 1/sqrt(d) scale
        attended, maps = attend_with_weights(
            query, key, value, score="dot", scale=1.0, return_weights=return_attn
        )
        o = from_tokens(self.v(attended), spatial)  # (B, N, C) -> (B, C, H, W)
        out = x + self.gamma * o
        if maps is None:
            return out
        return out, maps
