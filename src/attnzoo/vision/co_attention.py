"""Co-attention between two feature maps (COSNet).

Lu et al. 2019, "See More, Know More: Unsupervised Video Object Segmentation With Co-Attention
Siamese Networks", CVPR 2019 (section 3.2, eqs. 1-8).
Official code: https://github.com/carrierlxk/COSNet (``deeplab/siamese_model_conf.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, check_variant, parameter_dtype
from attnzoo.functional.attend import attend_with_weights
from attnzoo.functional.softmax import masked_softmax
from attnzoo.layers import LayerSpec, NormLayer, create_layer, create_norm
from attnzoo.registry import Paper, Sample, Sizes, example_image, register

__all__ = ["CoAttention"]

FORMS = ("vanilla", "symmetric", "channel")


def _example_inputs(s: Sizes) -> tuple[Tensor, ...]:
    # a larger second frame: an affinity transposed by mistake fails the shape checks
    return example_image(s), example_image(s, side=s.extent + 2, seed=1)


@register(
    "co_attention",
    placement="head",
    map_kind="pairwise",
    linear_memory=True,
    family="non_local",
    paper=Paper(
        "See More, Know More: Unsupervised Video Object Segmentation With Co-Attention Siamese Networks",
        venue="CVPR 2019",
    ),
    equation="S = V_b^T W V_a; Z_a = V_b softmax_col(S), Z_b = V_a softmax_col(S^T); "
    "Z <- Z * sigmoid(w_f Z + b_f); out_a = conv3x3([Z_a, V_a]); W = W | P^T D P | D",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=_example_inputs,
    cost="time O(B HW_a HW_b C + B (HW_a + HW_b) C^2); memory O(B (HW_a + HW_b) C) on the fused "
    "path, O(B HW_a HW_b) with return_attn or variant='official'",
    notes="variant='official': the exemplar branch's weights are softmax(softmax(S^T, over a)^T, over "
    "b) (the official code applies the second softmax to already normalised weights), the gate has "
    "no bias, and each branch has its own fusion conv",
    samples=(
        Sample("form=symmetric", {"form": "symmetric"}),
        Sample("form=channel", {"form": "channel"}),
        Sample(
            "variant=official",
            {"variant": "official"},
            skips={
                "gradients": "the official variant fuses y only with return_both=True",
                "linear_memory": "the official affinity is formed once and normalised both ways",
            },
        ),
    ),
)
class CoAttention(nn.Module):
    """COSNet co-attention: each map attends over the other through a learned affinity.

    With V_a (C x HW_a) the features of ``x`` and V_b (C x HW_b) those of ``y``::

        S = V_b^T W V_a                                      (HW_b x HW_a affinity, eq. 1)
        Z_a = V_b softmax(S),   Z_b = V_a softmax(S^T)       (softmax over each column, eqs. 5-6)
        Z <- Z * sigmoid(w_f Z + b_f)                        (per-position gate, eqs. 7-8)
        out_a = conv3x3([Z_a, V_a])                          (concatenation + fusion)

    so position i of ``x`` reads a softmax over the positions of ``y`` (and vice versa). W is the
    vanilla C x C matrix (eq. 1), the symmetric W = P^T D P (eq. 3: a projection P into a common
    space with channel weights D) or the channel-wise diagonal W = D (eq. 4). Without
    ``return_attn`` both directions run through the fused attention kernel: q_i = W v_a,i against
    keys and values V_b, so the HW_b x HW_a affinity is never formed.

    Args:
        channels: C, the channels of both maps.
        form: ``"vanilla"`` (a linear map without bias, the official code), ``"symmetric"``
            (P^T D P; P starts as the identity and is not kept orthogonal: any P gives a symmetric
            W) or ``"channel"`` (D).
        variant: ``"paper"`` or ``"official"`` (see below).
        norm_layer: the normalisation after the fusion conv, called as ``norm_layer(C)``
            (default BatchNorm, as in the official code; the conv then has no bias). None: no
            normalisation, a conv with bias.
        act_layer: activation after the fusion (official: ReLU; None for none).

    ``variant="official"`` reproduces ``siamese_model_conf.py``: the weights of ``x``'s branch are
    ``softmax_b(softmax_a(S^T))`` (a second softmax over already normalised weights, close to
    uniform), the gate has no bias, and the two branches have separate fusion convs.

    Shape:
        - x: (B, C, H_a, W_a); y: (B, C, H_b, W_b) (sizes may differ).
        - output: (B, C, H_a, W_a), ``x``'s branch; with ``return_both=True`` the pair
          ``(out_a, out_b)``, out_b of shape (B, C, H_b, W_b).
        - attention (``return_attn``): (B, HW_a, HW_b), the weights of each position of ``x`` over
          ``y`` (rows sum to one); with ``return_both`` a dict ``{"x": ..., "y": (B, HW_b, HW_a)}``.
    """

    def __init__(
        self,
        channels: int,
        *,
        form: Literal["vanilla", "symmetric", "channel"] = "vanilla",
        variant: Literal["paper", "official"] = "paper",
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: LayerSpec = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        check_variant(variant)
        self.channels, self.form, self.variant = channels, form, variant
        factory = {"device": device, "dtype": dtype}
        self.weight: nn.Linear | None = None
        self.projection: nn.Parameter | None = None
        self.diagonal: nn.Parameter | None = None
        if form == "vanilla":
            self.weight = nn.Linear(channels, channels, bias=False, **factory)  # W
        if form == "symmetric":
            self.projection = nn.Parameter(torch.empty(channels, channels, **factory))  # P
        if form in ("symmetric", "channel"):
            self.diagonal = nn.Parameter(torch.empty(channels, **factory))  # D
        # NOTE: the official gate has no bias; the paper's gate (eq. 7) has b_f
        self.gate = nn.Linear(channels, 1, bias=variant == "paper", **factory)  # w_f, b_f
        self.fuse = self._fusion(channels, norm_layer, act_layer, factory)
        official = variant == "official"
        self.fuse_y = self._fusion(channels, norm_layer, act_layer, factory) if official else None
        self.reset_parameters()

    @staticmethod
    def _fusion(channels: int, norm_layer: NormLayer, act_layer: LayerSpec, factory: dict) -> nn.Sequential:
        bias = norm_layer is None  # a norm right after the conv removes any bias
        layers: list[nn.Module] = [nn.Conv2d(2 * channels, channels, 3, padding=1, bias=bias, **factory)]
        if norm_layer is not None:
            layers.append(create_norm(norm_layer, channels, **factory))
        layers.append(create_layer(act_layer, argument="act_layer"))
        return nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        # symmetric and channel-wise forms start as the plain dot product (W = I)
        if self.projection is not None:
            nn.init.eye_(self.projection)
        if self.diagonal is not None:
            nn.init.ones_(self.diagonal)

    def extra_repr(self) -> str:
        return f"{self.channels}, form={self.form!r}, variant={self.variant!r}"

    def _apply_weight(self, features: Tensor, transpose: bool = False) -> Tensor:
        """Rows v -> (W v)^T, or (W^T v)^T with ``transpose``: (B, N, C) -> (B, N, C)."""
        if self.weight is not None:
            # Linear computes v W^T, i.e. (W v)^T; v W is (W^T v)^T
            return features @ self.weight.weight if transpose else self.weight(features)
        assert self.diagonal is not None
        if self.projection is None:
            return features * self.diagonal  # D v
        # P^T D P v, symmetric: the same both ways; rows: ((v P^T) * d) P
        return ((features @ self.projection.t()) * self.diagonal) @ self.projection

    def _gated(self, z: Tensor) -> Tensor:
        return z * torch.sigmoid(self.gate(z))  # (B, N, C) * (B, N, 1)

    def _fused(self, fuse: nn.Module, z: Tensor, v: Tensor) -> Tensor:
        batch, channels, height, width = v.shape
        # (B, HW, C) -> (B, C, HW) -> (B, C, H, W)
        z = z.transpose(1, 2).reshape(batch, channels, height, width)
        return fuse(torch.cat([z, v], dim=1))  # (B, 2C, H, W) -> (B, C, H, W)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        return_both: bool = False,
        return_attn: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor | tuple[Tensor, Tensor], Tensor | dict[str, Tensor]]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        check_input(y, "y", "B C H W", B=x.shape[0], C=self.channels, dtype=x.dtype, dtype_source="x")
        # (B, C, H, W) -> (B, C, HW) -> (B, HW, C), contiguous for the fused kernel
        a = x.flatten(2).transpose(1, 2).contiguous()
        b = y.flatten(2).transpose(1, 2).contiguous()
        query_a = self._apply_weight(a)  # rows (W v_a,i)^T: S[j, i] = query_a[i] . v_b,j
        maps: dict[str, Tensor | None] = {}
        if self.variant == "official":
            # NOTE: deviates from the paper (official code): the x branch normalises twice
            logits = query_a @ b.transpose(1, 2)  # (B, HW_a, HW_b) = S^T
            over_a = masked_softmax(logits, dim=1)  # softmax(S^T) per column j
            weights_a = masked_softmax(over_a, dim=2)  # softmax over b of already normalised weights
            z_a = weights_a.to(b.dtype) @ b  # (B, HW_a, HW_b) @ (B, HW_b, C) -> (B, HW_a, C)
            maps["x"] = weights_a
            if return_both:
                z_b = over_a.transpose(1, 2).to(a.dtype) @ a  # (B, HW_b, HW_a) @ (B, HW_a, C)
                maps["y"] = over_a.transpose(1, 2)
        else:
            z_a, maps["x"] = attend_with_weights(query_a, b, b, score="dot", return_weights=return_attn)
            if return_both:
                query_b = self._apply_weight(b, transpose=True)  # rows (W^T v_b,j)^T
                z_b, maps["y"] = attend_with_weights(query_b, a, a, score="dot", return_weights=return_attn)
        out_a = self._fused(self.fuse, self._gated(z_a), x)
        if not return_both:
            return (out_a, maps["x"]) if return_attn else out_a
        fuse_b = self.fuse_y if self.fuse_y is not None else self.fuse
        out_b = self._fused(fuse_b, self._gated(z_b), y)
        return ((out_a, out_b), maps) if return_attn else (out_a, out_b)
