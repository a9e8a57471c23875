"""Attention-augmented convolution: a convolution concatenated with 2-D relative self-attention.

Bello, Zoph, Vaswani, Shlens, Le 2019, "Attention Augmented Convolutional Networks",
https://arxiv.org/abs/1904.09925 (TensorFlow code in its appendix only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.heads import merge_heads
from attnzoo.functional.window import relative_attention_2d
from attnzoo.registry import Paper, Sample, image_input, register

__all__ = ["AAConv2d", "attention_widths"]


def attention_widths(
    out_channels: int, key_ratio: float, value_ratio: float, num_heads: int, min_key_head_dim: int = 0
) -> tuple[int, int]:
    """(d_k, d_v) of an augmented layer: ``kappa F_out`` and ``upsilon F_out`` rounded to
    multiples of the head count (at least one dimension per head), d_k at least
    ``min_key_head_dim`` per head (the paper's ResNets: 20)."""

    def per_heads(width: float) -> int:
        return max(num_heads, round(width / num_heads) * num_heads)

    if min_key_head_dim < 0:
        raise ValueError(f"min_key_head_dim: expected a width >= 0 (0: no floor), got {min_key_head_dim}")
    key_dim = max(per_heads(key_ratio * out_channels), min_key_head_dim * num_heads)
    return key_dim, per_heads(value_ratio * out_channels)


@register(
    "aa_conv",
    family="conv_attention",
    paper=Paper("Attention Augmented Convolutional Networks", "1904.09925"),
    equation="AAConv(X) = Concat[Conv(X), MHA(X)]; O_h = softmax((Q_h K_h^T + S_H^rel + S_W^rel) / "
    "sqrt(d_k^h)) V_h, S^rel_ij = q_i . r[y_j - y_i] (+ r[x_j - x_i]); kappa = upsilon = 0.2, N_h = 8",
    make_kwargs=lambda s: {"in_channels": s.width, "max_size": 16},
    make_inputs=image_input,
    cost="time O(B (HW)^2 (d_k + d_v + H + W) + B HW C_in C_out k^2); memory O(B N_h HW (d_k + H + W)) "
    "(the relative logits folded into the fused kernel's dot product; no HW x HW matrix)",
    placement="conv",
    map_kind="pairwise",
    notes="scale_relative=False adds the relative logits unscaled (timm's BottleneckAttn default, "
    "scale_pos_embed=False); the paper scales the whole logit by 1/sqrt(d_k^h). The relative tables "
    "cover maps up to max_size on a side. A strided layer computes attention on 2x2 average-pooled "
    "input (the paper).",
    samples=(
        Sample(
            "scale_relative=False", {"scale_relative": False}, description="timm's unscaled relative logits"
        ),
        Sample(
            "relative=False", {"relative": False}, thorough=True, description="no relative logits (plain MHA)"
        ),
        Sample(
            "resnet",
            {"value_ratio": 0.1, "min_key_head_dim": 4, "bias": False},
            description="the paper's ResNet setting k = 2v = 0.2 (20 key dims a head at full width)",
        ),
    ),
)
class AAConv2d(nn.Module):
    """Attention-augmented convolution: ``Concat[Conv(X), MHA(X)]`` with 2-D relative logits.

    A k x k convolution gives ``F_out - d_v`` channels; multi-head self-attention over all
    positions gives ``d_v`` channels (paper eq. 1-5)::

        O_h = softmax((Q_h K_h^T + S_H^rel + S_W^rel) / sqrt(d_k^h)) V_h
        MHA(X) = Concat[O_1, ..., O_Nh] W^O,     AAConv(X) = Concat[Conv(X), MHA(X)]

    with 1x1 projections to queries and keys (d_k) and values (d_v), ``W^O`` a d_v x d_v 1x1
    conv, and ``S^rel[i, j] = q_i . r^H[y_j - y_i] + q_i . r^W[x_j - x_i]``: relative height and
    width embeddings, learned (created once, shared by the heads, initialised N(0, d_k^h^-1/2) as
    in the paper's code). ``d_k = kappa F_out``, ``d_v = upsilon F_out`` (rounded to multiples of
    N_h). A strided layer runs the attention on 2x2 average-pooled input (the paper's
    downsampling) beside the strided convolution.

    Without maps requested the relative logits are folded into the fused kernel's dot product:
    each query is augmented with its H + W relative scores and each key with one-hot codes of
    its row and column (:func:`attnzoo.functional.window.relative_attention_2d`), so memory stays
    O(HW (d_k + H + W)) per head, not the (HW)^2 logits of the paper's "relative to absolute"
    implementation (the blow-up of leaderj1001's version, which also materialises
    (B, N_h, H, H, W, W)).

    Args:
        in_channels: F_in.
        out_channels: F_out (default ``in_channels``); more than d_v.
        kernel_size: the convolution's window (odd; paper 3).
        stride: the convolution's stride; the attention input is average-pooled by it.
        num_heads: N_h (paper: 8).
        key_ratio: kappa = d_k / F_out (paper: 0.2).
        value_ratio: upsilon = d_v / F_out (paper: 0.2; its ResNets use k = 2v = 0.2).
        min_key_head_dim: a floor on d_k / N_h (the paper's ResNets: 20; default none).
        relative: add the relative logits (paper); False gives plain multi-head attention.
        scale_relative: scale the relative logits with the content logits by 1/sqrt(d_k^h) (paper);
            False adds them unscaled, as timm's ``BottleneckAttn`` does by default.
        max_size: the largest map side the relative tables cover (tables of 2 max_size - 1 rows).
        bias: biases in the convolution and the 1x1 projections (the paper's ``tf.layers``
            defaults have them; a network with BN after the layer does not need them).

    Shape:
        - x: (B, F_in, H, W), H, W <= ``max_size`` (after the stride).
        - output: (B, F_out, H', W'), H' = ceil(H / stride); attention (``return_attn``):
          (B, N_h, H'W', H'W'), each row summing to 1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        num_heads: int = 8,
        key_ratio: float = 0.2,
        value_ratio: float = 0.2,
        min_key_head_dim: int = 0,
        relative: bool = True,
        scale_relative: bool = True,
        max_size: int = 64,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        check_positive(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            stride=stride,
            num_heads=num_heads,
            max_size=max_size,
        )
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd size (a 'same' convolution), got {kernel_size}")
        for name, ratio in (("key_ratio", key_ratio), ("value_ratio", value_ratio)):
            if not 0 < ratio < 1:
                raise ValueError(f"{name}: expected a fraction of out_channels in (0, 1), got {ratio}")
        key_dim, value_dim = attention_widths(
            out_channels, key_ratio, value_ratio, num_heads, min_key_head_dim
        )
        if value_dim >= out_channels:
            raise ValueError(
                f"out_channels: expected more than d_v = {value_dim} (value_ratio {value_ratio} rounded "
                f"to a multiple of num_heads = {num_heads}) to leave convolution channels, got {out_channels}"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.key_head_dim = key_dim // num_heads
        self.relative, self.scale_relative, self.max_size = relative, scale_relative, max_size
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(
            in_channels, out_channels - value_dim, kernel_size, stride, kernel_size // 2, bias=bias, **factory
        )
        # W_q, W_k, W_v as one 1x1 projection on (B, HW, F_in) tokens, then W^O (d_v x d_v)
        self.qkv = nn.Linear(in_channels, 2 * key_dim + value_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(value_dim, value_dim, bias=bias, **factory)
        if relative:
            # offsets -(M - 1) .. M - 1 at rows 0 .. 2M - 2, shared by the heads
            self.rel_height = nn.Parameter(torch.empty(2 * max_size - 1, self.key_head_dim, **factory))
            self.rel_width = nn.Parameter(torch.empty(2 * max_size - 1, self.key_head_dim, **factory))
        else:
            self.register_parameter("rel_height", None)
            self.register_parameter("rel_width", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        self.qkv.reset_parameters()
        self.out_proj.reset_parameters()
        if self.rel_height is not None and self.rel_width is not None:
            # the paper's appendix: tf.random_normal_initializer(dkh ** -0.5)
            nn.init.normal_(self.rel_height, std=self.key_head_dim**-0.5)
            nn.init.normal_(self.rel_width, std=self.key_head_dim**-0.5)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.in_channels, dtype=parameter_dtype(self))
        conv_out = self.conv(x)  # (B, F_out - d_v, H', W')
        if self.stride > 1:
            # ceil_mode keeps the size of the strided 'same' convolution, ceil(H / stride)
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        height, width = x.shape[-2:]
        if self.relative and not isinstance(x, fx.Proxy) and max(height, width) > self.max_size:
            raise ValueError(
                f"x: the relative position tables cover maps up to max_size={self.max_size} on a side, "
                f"expected H, W <= {self.max_size} (after the stride), got {height} x {width}; build the "
                f"layer with a larger max_size"
            )
        heads, d_k, d_v = self.num_heads, self.key_dim, self.value_dim
        tokens = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C): channels last for the Linear
        q, k, v = self.qkv(tokens).split([d_k, d_k, d_v], dim=-1)
        # (B, H, W, h * d) -> (B, H, W, h, d) -> (B, h, H, W, d)
        q, k, v = (t.unflatten(-1, (heads, -1)).permute(0, 3, 1, 2, 4) for t in (q, k, v))
        scale = self.key_head_dim**-0.5
        out, weights = relative_attention_2d(
            q,
            k,
            v,
            self.rel_height,
            self.rel_width,
            scale=scale,
            relative_scale=1.0 if self.scale_relative else 1.0 / scale,
            return_weights=return_attn,
        )
        attn_out = self.out_proj(merge_heads(out))  # (B, h, HW, d_v / h) -> (B, HW, d_v)
        # (B, HW, d_v) -> (B, d_v, HW) -> (B, d_v, H, W)
        attn_out = attn_out.transpose(1, 2).unflatten(2, (height, width))
        result = torch.cat([conv_out, attn_out.to(conv_out.dtype)], dim=1)
        return (result, weights) if weights is not None else result

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, num_heads={self.num_heads}, "
            f"d_k={self.key_dim}, d_v={self.value_dim}, relative={self.relative}, "
            f"scale_relative={self.scale_relative}"
        )
