"""Cross attention module (CAM) of the Cross Attention Network for few-shot classification.

Hou et al. 2019, "Cross Attention Network for Few-shot Classification", NeurIPS 2019 (section 4.2).
Official code: https://github.com/blue-blue272/fewshot-CAN (``torchFewShot/models/cam.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_pair, check_positive, check_variant, parameter_dtype
from attnzoo.functional.softmax import masked_softmax
from attnzoo.layers import NormLayer, create_norm, reduced_width
from attnzoo.registry import Paper, Sample, Sizes, example_image, register

__all__ = ["CrossAttentionModule"]


def _example_inputs(s: Sizes) -> tuple[Tensor, ...]:
    return example_image(s), example_image(s, seed=1)


@register(
    "cross_attention_module",
    placement="head",
    map_kind="spatial",
    family="non_local",
    paper=Paper("Cross Attention Network for Few-shot Classification", venue="NeurIPS 2019"),
    equation="R^p_ij = cos(P_i, Q_j); w = W2 relu(W1 mean_i R^p_i:) (m -> m/6 -> m); "
    "A^p_i = softmax_i(mean_j(R^p_ij w_j) / tau) , tau = 0.025; P' = P * (1 + A^p); same for Q",
    make_kwargs=lambda s: {"channels": s.width, "spatial_size": s.extent},
    make_inputs=_example_inputs,
    cost="time O(B m C + m^2 / r); memory O(B m C) (the m x m correlation is never formed: "
    "its row means and w-weighted sums factor through the normalised features)",
    notes="variant='official': BatchNorm after the first meta-fusion layer, as in cam.py (the paper "
    "writes W2 relu(W1 z)); norm_layer replaces that BatchNorm",
    samples=(
        Sample("variant=official", {"variant": "official"}),
        Sample(
            "variant=official,norm_layer=GroupNorm",
            {"variant": "official", "norm_layer": lambda s: functools.partial(nn.GroupNorm, 1)},
            description="GroupNorm on the meta-fusion hidden vector (trains with a batch of one)",
        ),
    ),
)
class CrossAttentionModule(nn.Module):
    """CAN's cross attention: reweight a class map and a query map by their mutual correlation.

    With P, Q the two maps reshaped to C x m (m = H W positions) and normalised per position::

        R^p = P_hat^T Q_hat                          (m x m cosine correlation; R^q = (R^p)^T)
        w^p = W2 relu(W1 GAP(R^p))                   (meta-fusion on the row mean, m -> m/r -> m)
        A^p_i = softmax_i( mean_j(R^p_ij w^p_j) / tau )
        P' = P * (1 + A^p)                           (residual reweighting)

    and symmetrically Q' from R^q with the same meta-fusion layers. GAP averages over the rows,
    so w^p is indexed by the positions of Q; tau = 0.025 and r = 6 (a 6 x 6 map: 36 -> 6 -> 36).
    Since mean_i R^p_ij = mean_i(P_hat_i) . Q_hat_j and mean_j R^p_ij w_j =
    P_hat_i . mean_j(w_j Q_hat_j), R is never formed: O(m C) time and memory per pair.

    The meta-fusion weights act on positions, so the spatial size is fixed at construction:
    ``spatial_size`` (6 for the paper's ResNet-12 on 84 x 84 images).

    Args:
        channels: C, the channels of both maps (checked; the module has no per-channel weights).
        spatial_size: the maps' (H, W), or one int for square maps.
        rd_ratio: 1/r, the meta-fusion bottleneck ratio (paper: 1/6).
        rd_channels: the bottleneck width, overriding ``rd_ratio``.
        temperature: tau (paper: 0.025).
        variant: ``"paper"`` (W2 relu(W1 z)) or ``"official"`` (W2 relu(BN(W1 z)), as in
            ``cam.py``).
        norm_layer: the official variant's norm of the hidden vector, called as
            ``norm_layer(m/r)`` on it as a (B, m/r, 1, 1) map like every vision norm_layer
            (default ``nn.BatchNorm2d``: there the BatchNorm of ``cam.py`` over (B, m/r), with the
            state_dict keys of earlier releases; e.g. ``functools.partial(nn.GroupNorm, 1)``,
            which needs no batch statistics; None: no norm). The paper's variant has no norm: it
            accepts only the default or None.

    Shape:
        - x: class (support) features (B, C, H, W); y: query features (B, C, H, W), the same size.
        - output: x reweighted, (B, C, H, W); with ``return_both=True`` the pair (x', y').
        - attention (``return_attn``): A^p, (B, 1, H, W), summing to one over positions
          (out = x * (1 + A^p)); with ``return_both`` a dict ``{"x": A^p, "y": A^q}``.
    """

    def __init__(
        self,
        channels: int,
        spatial_size: int | tuple[int, int] = 6,
        rd_ratio: float = 1 / 6,
        rd_channels: int | None = None,
        *,
        temperature: float = 0.025,
        variant: Literal["paper", "official"] = "paper",
        norm_layer: NormLayer = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        size = check_pair("spatial_size", spatial_size)
        if temperature <= 0:
            raise ValueError(f"temperature: expected a positive value, got {temperature}")
        check_variant(variant)
        if variant == "paper" and norm_layer is not nn.BatchNorm2d and norm_layer is not None:
            raise ValueError(
                f"norm_layer: the paper's meta-fusion has no normalisation (it is cam.py's, "
                f"variant='official'), expected the default or None with variant='paper', got {norm_layer!r}"
            )
        self.channels, self.spatial_size = channels, (int(size[0]), int(size[1]))
        self.positions = self.spatial_size[0] * self.spatial_size[1]  # m
        self.temperature, self.variant = temperature, variant
        hidden = reduced_width(self.positions, rd_ratio, rd_channels)
        factory = {"device": device, "dtype": dtype}
        # 1x1 convs on an (m, 1, 1) descriptor are linear layers over the m positions
        self.fc1 = nn.Linear(self.positions, hidden, **factory)  # W1
        self.norm = create_norm(norm_layer if variant == "official" else None, hidden, **factory)
        self.fc2 = nn.Linear(hidden, self.positions, **factory)  # W2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # as cam.py: N(0, 2 / n) with n = kernel area x out channels (He, fan-out)
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.weight, std=math.sqrt(2.0 / layer.out_features))

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, spatial_size={self.spatial_size}, temperature={self.temperature}, "
            f"variant={self.variant!r}"
        )

    def _kernel(self, descriptor: Tensor) -> Tensor:
        """Meta-fusion: (B, m) row means of R -> (B, m) kernel w."""
        # the norm layers take maps: (B, h) -> (B, h, 1, 1) -> (B, h)
        hidden = self.norm(self.fc1(descriptor)[:, :, None, None]).flatten(1)
        return self.fc2(F.relu(hidden))

    def _attention(self, own: Tensor, other: Tensor) -> Tensor:
        """A for ``own`` (B, m, C) normalised rows against ``other``: softmax over own positions."""
        # mean_i R_ij = mean_i(own_i) . other_j: (B, 1, C) @ (B, C, m) -> (B, m)
        descriptor = (own.mean(dim=1, keepdim=True) @ other.transpose(1, 2)).squeeze(1)
        kernel = self._kernel(descriptor)  # (B, m), indexed by the positions of `other`
        # mean_j R_ij w_j = own_i . mean_j(w_j other_j): (B, 1, m) @ (B, m, C) -> (B, 1, C)
        context = (kernel.unsqueeze(1) @ other) / other.shape[1]
        logits = (own @ context.transpose(1, 2)).squeeze(-1)  # (B, m, C) @ (B, C, 1) -> (B, m)
        return masked_softmax(logits / self.temperature)

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
        for name, t in (("x", x), ("y", y)):
            if tuple(t.shape[2:]) != self.spatial_size:
                raise ValueError(
                    f"{name}: expected the spatial size {self.spatial_size} given at construction (the "
                    f"meta-fusion layers act on its {self.positions} positions), got {tuple(t.shape[2:])}"
                )
        batch = x.shape[0]
        # (B, C, H, W) -> (B, C, m) -> (B, m, C), unit vectors per position (cosine correlation)
        p = F.normalize(x.flatten(2).transpose(1, 2), dim=-1, eps=1e-12)
        q = F.normalize(y.flatten(2).transpose(1, 2), dim=-1, eps=1e-12)
        attn_x = self._attention(p, q).view(batch, 1, *self.spatial_size)  # (B, m) -> (B, 1, H, W)
        out_x = x * (1 + attn_x).to(x.dtype)
        if not return_both:
            return (out_x, attn_x) if return_attn else out_x
        attn_y = self._attention(q, p).view(batch, 1, *self.spatial_size)
        out_y = y * (1 + attn_y).to(y.dtype)
        if return_attn:
            return (out_x, out_y), {"x": attn_x, "y": attn_y}
        return out_x, out_y
