"""Generalized spatial attention with the four terms E1..E4 of Zhu et al.

Zhu et al. 2019, "An Empirical Study of Spatial Attention Mechanisms in Deep Networks",
https://arxiv.org/abs/1904.05873.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.attend import attend_with_weights
from attnzoo.layers import plain_layer
from attnzoo.registry import Paper, Sample, image_input, register

__all__ = ["GeneralizedAttention", "relative_position_embedding"]

TERM_NAMES = ("query-key content", "query content-relative position", "key content", "relative position")


def relative_position_embedding(
    length_q: int,
    length_k: int,
    dim: int,
    *,
    q_stride: int = 1,
    kv_stride: int = 1,
    magnitude: float = 1.0,
    wave_length: float = 1000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sinusoids of the 1-D offsets between query and key coordinates, (L_q, L_k, dim / 2).

    For query coordinate ``a * q_stride`` and key coordinate ``b * kv_stride`` the offset is
    ``r = magnitude * (a q_stride - b kv_stride)`` (query minus key, as in mmcv) and the embedding
    is ``[sin(r / lambda_i), cos(r / lambda_i)]`` for ``lambda_i = wave_length^(4 i / dim)``,
    ``i = 0 .. dim/4 - 1``. The x and y offsets each get one, so the concatenated position
    encoding R_{q,k} has ``dim`` entries. (The opposite offset sign is the same model with the
    sine columns of the following projection negated.)
    """
    if dim % 4:
        raise ValueError(f"dim: expected a multiple of 4 (sin and cos of x and y offsets), got {dim}")
    q_pos = torch.arange(length_q, device=device, dtype=dtype) * q_stride
    k_pos = torch.arange(length_k, device=device, dtype=dtype) * kv_stride
    offsets = (q_pos[:, None] - k_pos[None, :]) * magnitude  # (L_q, L_k)
    exponents = torch.arange(dim // 4, device=device, dtype=dtype) * (4.0 / dim)
    wave = torch.pow(torch.full((), wave_length, device=device, dtype=dtype), exponents)  # (dim/4,)
    angles = offsets[..., None] / wave  # (L_q, L_k, dim/4)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (L_q, L_k, dim/2)


def _parse_terms(attention_type: str) -> tuple[bool, bool, bool, bool]:
    if (
        not isinstance(attention_type, str)
        or len(attention_type) != 4
        or set(attention_type) - {"0", "1"}
        or "1" not in attention_type
    ):
        raise ValueError(
            "attention_type: expected four '0'/'1' flags for E1..E4 (query-key content, query "
            f"content-relative position, key content, relative position), at least one set; got "
            f"{attention_type!r}"
        )
    e1, e2, e3, e4 = (flag == "1" for flag in attention_type)
    return e1, e2, e3, e4


@register(
    "generalized_attention",
    placement="stage",
    map_kind="pairwise",
    linear_memory=True,
    family="non_local",
    paper=Paper("An Empirical Study of Spatial Attention Mechanisms in Deep Networks", "1904.05873"),
    equation="y_q = x_q + gamma * sum_m W_m sum_k A_m(q, k) W'_m x_k, A_m ∝ exp(sum_j beta_j E_j): "
    "E1 = z_q^T U_m^T V^C_m x_k, E2 = z_q^T U_m^T V^R_m R_{q,k}, E3 = u_m^T V^C_m x_k, "
    "E4 = v_m^T V^R_m R_{q,k}",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B HW H'W' (d + H' + W') M + B HW C^2), H' W' = HW / s^2; memory O(B M HW (d + H' + W')) "
    "without maps (fused kernel; the E2/E4 logits stay factorised), O(B M HW H'W') with return_attn",
    notes="mmcv-compatible parameter names; no q_stride or spatial_range (mmcv's local window); "
    "mmcv's E2-without-E4 branch pairs the y-offset term with the transposed query, this one does not",
    samples=(
        *(Sample(f"attention_type={t}", {"attention_type": t}) for t in ("1000", "0100", "0010", "0001")),
        Sample("kv_stride=1", {"kv_stride": 1}),
    ),
)
class GeneralizedAttention(nn.Module):
    """Generalized attention: any subset of the four attention factors E1..E4, multi-head.

    For query q (content z_q) and key k (content x_k) in head m, with R_{q,k} the sinusoidal
    encoding of the relative x and y offsets::

        E1 = z_q^T U_m^T V^C_m x_k      query and key content (Transformer attention)
        E2 = z_q^T U_m^T V^R_m R_{q,k}  query content and relative position
        E3 = u_m^T V^C_m x_k            key content only (a learnable saliency vector u_m)
        E4 = v_m^T V^R_m R_{q,k}        relative position only (a learnable vector v_m)
        A_m(q, k) = softmax_k(sum_j beta_j E_j),  beta = attention_type ("1111": all four)
        y_q = x_q + gamma * sum_m W_m sum_k A_m(q, k) W'_m x_k

    ``U_m`` (query), ``V^C_m`` (key), ``W'_m`` (value) and ``W_m`` (output) are 1x1 convs;
    ``V^R_m R = (V^R_x R_x + V^R_y R_y) / sqrt(2)`` projects the x- and y-offset sinusoids (the
    split and the 1/sqrt(2) are the official mmcv code's). Logits are unscaled, as in the paper's
    formulation and mmcv. Keys and values are taken every ``kv_stride`` pixels (a strided subsample,
    mmcv's 1x1 average pooling). ``gamma`` is zero at init, so the block starts as the identity.

    Computation: E1 and E3 fold into one product ``(U z_q + u_m)^T V^C x_k``. E2 and E4 are
    separable in x and y, ``E = e_x[q, w'] + e_y[q, h']`` for key (h', w'), so they enter the
    same fused kernel as extra channels: the query gets ``[e_x[q, :], e_y[q, :]]`` (W' + H'
    values) and each key the one-hot codes of its column and row. No (HW x H'W') logit matrix is
    formed unless ``return_attn``; the position logits cost O(B M HW (H' + W')) memory.

    Args:
        channels: C.
        num_heads: M (mmdet's configs: 8). Head width d = C // M (floor, as mmcv).
        attention_type: four '0'/'1' flags for E1..E4, e.g. ``"1111"``, ``"0010"`` (key content
            only; then every query shares one map, computed once), ``"1000"`` (plain attention).
        kv_stride: subsampling of keys and values (mmdet's configs: 2).
        position_embedding_dim: width of R (x and y halves); default C rounded down to a multiple
            of 4 (mmcv: C).
        position_magnitude: multiplies the offsets before the sinusoids (mmcv: 1).
        wave_length: the sinusoids' longest wavelength base (mmcv: 1000).

    Shape:
        - x: (B, C, H, W); output: the same.
        - attention (``return_attn``): (B, M, HW, H'W') per head, softmax over the H'W' keys
          (H' = ceil(H / kv_stride), keys row-major); float32 for half-precision inputs.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 8,
        attention_type: str = "1111",
        kv_stride: int = 2,
        *,
        position_embedding_dim: int | None = None,
        position_magnitude: float = 1.0,
        wave_length: float = 1000.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        if num_heads <= 0 or channels // num_heads == 0:
            raise ValueError(
                f"num_heads: expected 1..{channels} heads for {channels} channels, got {num_heads}"
            )
        if kv_stride < 1:
            raise ValueError(f"kv_stride: expected a positive stride, got {kv_stride}")
        self.terms = _parse_terms(attention_type)
        e1, e2, e3, e4 = self.terms
        if position_embedding_dim is None:
            position_embedding_dim = max(4, channels - channels % 4)
        if position_embedding_dim <= 0 or position_embedding_dim % 4:
            raise ValueError(
                f"position_embedding_dim: expected a positive multiple of 4, got {position_embedding_dim}"
            )
        self.channels, self.num_heads, self.kv_stride = channels, num_heads, kv_stride
        self.attention_type = attention_type
        self.head_dim = channels // num_heads
        self.position_embedding_dim = position_embedding_dim
        self.position_magnitude, self.wave_length = position_magnitude, wave_length
        inner = self.head_dim * num_heads
        factory = {"device": device, "dtype": dtype}
        # names follow mmcv's GeneralizedAttention, so its state dicts load
        self.query_conv = nn.Conv2d(channels, inner, 1, bias=False, **factory) if e1 or e2 else None
        self.key_conv = nn.Conv2d(channels, inner, 1, bias=False, **factory) if e1 or e3 else None
        self.value_conv = nn.Conv2d(channels, inner, 1, bias=False, **factory)
        half = position_embedding_dim // 2
        self.appr_geom_fc_x = nn.Linear(half, inner, bias=False, **factory) if e2 or e4 else None
        self.appr_geom_fc_y = nn.Linear(half, inner, bias=False, **factory) if e2 or e4 else None
        self.appr_bias = nn.Parameter(torch.empty(inner, **factory)) if e3 else None
        self.geom_bias = nn.Parameter(torch.empty(inner, **factory)) if e4 else None
        self.proj_conv = nn.Conv2d(inner, channels, 1, bias=True, **factory)
        self.gamma = nn.Parameter(torch.zeros(1, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # mmcv: kaiming uniform (fan_in, leaky_relu a=1, i.e. bound sqrt(3 / fan_in)), zero biases,
        # u_m and v_m uniform in +-1/sqrt(2d), gamma = 0
        for layer in (
            self.query_conv,
            self.key_conv,
            self.value_conv,
            self.appr_geom_fc_x,
            self.appr_geom_fc_y,
            self.proj_conv,
        ):
            if layer is not None:
                nn.init.kaiming_uniform_(layer.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
        nn.init.zeros_(self.proj_conv.bias)
        bound = 1.0 / math.sqrt(2 * self.head_dim)
        for bias in (self.appr_bias, self.geom_bias):
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)
        nn.init.zeros_(self.gamma)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_heads={self.num_heads}, "
            f"attention_type={self.attention_type!r}, kv_stride={self.kv_stride}"
        )

    def _heads(self, source: Tensor, tokens: Tensor, conv: nn.Module) -> Tensor:
        """The 1x1 conv of the (B, C, H, W) map ``source`` as a product on its (B, N, C)
        ``tokens``, split into heads: (B, M, N, d), unit stride in d. A hooked or replaced conv
        runs as itself on ``source``."""
        batch, length, _ = tokens.shape
        if plain_layer(conv, nn.Conv2d):
            projected = F.linear(tokens, conv.weight.flatten(1), conv.bias)  # (B, N, M d)
        else:
            projected = conv(source).flatten(2).transpose(1, 2)  # (B, M d, H, W) -> (B, N, M d)
        # (B, N, M d) -> (B, N, M, d) -> (B, M, N, d)
        return projected.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _position_features(self, h: int, w: int, hk: int, wk: int, ref: Tensor) -> tuple[Tensor, Tensor]:
        """V^R_x R_x and V^R_y R_y per head: (W, W', M, d) and (H, H', M, d)."""
        fc_x, fc_y = self.appr_geom_fc_x, self.appr_geom_fc_y
        assert fc_x is not None and fc_y is not None
        # sinusoids of offsets up to ~100 lose their phase in half precision: build them in fp32
        # (fp64 for a fp64 module) and cast once
        work = torch.float64 if fc_x.weight.dtype == torch.float64 else torch.float32
        kwargs = {
            "kv_stride": self.kv_stride,
            "magnitude": self.position_magnitude,
            "wave_length": self.wave_length,
            "device": ref.device,
            "dtype": work,
        }
        emb_x = relative_position_embedding(w, wk, self.position_embedding_dim, **kwargs)
        emb_y = relative_position_embedding(h, hk, self.position_embedding_dim, **kwargs)
        scale = 1.0 / math.sqrt(2.0)
        feat_x = fc_x(emb_x.to(fc_x.weight.dtype)) * scale  # (W, W', M d)
        feat_y = fc_y(emb_y.to(fc_y.weight.dtype)) * scale  # (H, H', M d)
        heads, d = self.num_heads, self.head_dim
        # (L_q, L_k, M d) -> (L_q, L_k, M, d)
        return feat_x.view(w, wk, heads, d), feat_y.view(h, hk, heads, d)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        batch, _, h, w = x.shape
        heads, d = self.num_heads, self.head_dim
        e1, e2, e3, e4 = self.terms
        x_kv = x[:, :, :: self.kv_stride, :: self.kv_stride]  # (B, C, H', W')
        hk, wk = x_kv.shape[-2], x_kv.shape[-1]
        tokens = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        tokens_kv = x_kv.flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, H'W', C)
        v = self._heads(x_kv, tokens_kv, self.value_conv)  # (B, M, H'W', d)
        q = self._heads(x, tokens, self.query_conv) if self.query_conv is not None else None
        k = self._heads(x_kv, tokens_kv, self.key_conv) if self.key_conv is not None else None

        if self.terms == (False, False, True, False):
            # key content only: one map shared by every query, computed once (as mmcv does)
            assert self.appr_bias is not None and k is not None
            u = self.appr_bias.view(1, heads, 1, d).expand(batch, heads, 1, d)
            shared, weights = attend_with_weights(u, k, v, score="dot", return_weights=return_attn)
            context = shared.expand(batch, heads, h * w, d)  # (B, M, 1, d) -> (B, M, HW, d)
            if weights is not None:
                weights = weights.expand(batch, heads, h * w, hk * wk)
        else:
            q_parts: list[Tensor] = []
            k_parts: list[Tensor] = []
            if e1 or e3:
                assert k is not None
                u = self.appr_bias.view(1, heads, 1, d) if self.appr_bias is not None else None
                if e1:
                    assert q is not None
                    q_parts.append(q if u is None else q + u)  # E1 + E3 = (U z_q + u_m)^T V^C x_k
                else:
                    assert u is not None
                    q_parts.append(u.expand(batch, heads, h * w, d))
                k_parts.append(k)
            if e2 or e4:
                feat_x, feat_y = self._position_features(h, w, hk, wk, x)
                g = self.geom_bias.view(1, heads, 1, d) if self.geom_bias is not None else None
                if e2:
                    assert q is not None
                    # E2 + E4 = (U z_q + v_m)^T V^R R; (B, M, HW, d) -> (B, M, H, W, d)
                    qp = (q if g is None else q + g).reshape(batch, heads, h, w, d)
                    e_x = torch.einsum("bmhwd,wvmd->bmhwv", qp, feat_x)  # (B, M, H, W, W')
                    e_y = torch.einsum("bmhwd,hgmd->bmhwg", qp, feat_y)  # (B, M, H, W, H')
                else:
                    assert g is not None
                    gv = g.view(heads, d)
                    # position only: (M, W, W') and (M, H, H'), broadcast to every query
                    e_x = torch.einsum("md,wvmd->mwv", gv, feat_x)[None, :, None]
                    e_y = torch.einsum("md,hgmd->mhg", gv, feat_y)[None, :, :, None]
                    e_x = e_x.expand(batch, heads, h, w, wk)
                    e_y = e_y.expand(batch, heads, h, w, hk)
                # (B, M, H, W, W' + H') -> (B, M, HW, W' + H')
                q_parts.append(torch.cat([e_x, e_y], dim=-1).reshape(batch, heads, h * w, wk + hk))
                # key n' = h' W' + w' carries one-hots of its column w' and its row h', so that
                # [e_x, e_y] . code = e_x[q, w'] + e_y[q, h']
                col_code = torch.eye(wk, device=x.device, dtype=v.dtype).repeat(hk, 1)  # (H'W', W')
                row_code = torch.eye(hk, device=x.device, dtype=v.dtype).repeat_interleave(wk, dim=0)
                codes = torch.cat([col_code, row_code], dim=-1)  # (H'W', W' + H')
                k_parts.append(codes.expand(batch, heads, hk * wk, wk + hk))
            q_all = torch.cat(q_parts, dim=-1) if len(q_parts) > 1 else q_parts[0]
            k_all = torch.cat(k_parts, dim=-1) if len(k_parts) > 1 else k_parts[0]
            context, weights = attend_with_weights(q_all, k_all, v, score="dot", return_weights=return_attn)

        # (B, M, HW, d) -> (B, HW, M, d) -> (B, HW, M d)
        merged = context.transpose(1, 2).reshape(batch, h * w, heads * d)
        if plain_layer(self.proj_conv, nn.Conv2d):
            projected = F.linear(merged, self.proj_conv.weight.flatten(1), self.proj_conv.bias)  # (B, HW, C)
            # (B, HW, C) -> (B, C, HW) -> (B, C, H, W)
            projected = projected.transpose(1, 2).reshape(batch, self.channels, h, w)
        else:  # hooked or replaced: as itself, on (B, HW, M d) -> (B, M d, HW) -> (B, M d, H, W)
            projected = self.proj_conv(merged.transpose(1, 2).reshape(batch, heads * d, h, w))
        out = x + self.gamma * projected
        return (out, weights) if return_attn else out
