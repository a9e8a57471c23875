"""Multi-head self-attention with a quadratic relative encoding: the layer that can be a convolution.

Cordonnier, Loukas, Jaggi 2020, "On the Relationship between Self-Attention and Convolutional
Layers", https://arxiv.org/abs/1911.03584 (ICLR 2020; code: epfml/attention-cnn).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from attnzoo._checks import check_input, check_pair, check_positive, parameter_dtype
from attnzoo.registry import Paper, Sample, image_input, register

__all__ = ["ConvAsAttention"]

#: alpha of the heads built by ``from_conv``: each head's softmax is one-hot to working precision
#: (the nearest other key is exp(-1e4) behind, 0 in float64), the theorem's alpha -> infinity.
HARD_ALPHA = 1e4


def _four_sides(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from p, (p_h, p_w) or (top, bottom, left, right)."""
    sides = (padding,) if isinstance(padding, int) else tuple(padding)
    if len(sides) == 1:
        sides = sides * 4
    elif len(sides) == 2:
        sides = (sides[0], sides[0], sides[1], sides[1])
    if len(sides) != 4 or any(not isinstance(p, int) or p < 0 for p in sides):
        raise ValueError(
            f"padding: expected p, (p_h, p_w) or (top, bottom, left, right) of non-negative ints, "
            f"got {padding!r}"
        )
    return sides  # type: ignore[return-value]


def gaussian_axis_weights(
    centers: Tensor,
    log_alpha: Tensor,
    size: tuple[int, int],
    padding: tuple[int, int, int, int],
    stride: tuple[int, int],
    window: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """The factors of each head's positional softmax over a padded (H, W) grid: (N_h, H_out, H_p)
    over rows and (N_h, W_out, W_p) over columns, in float32 (float64 for float64 parameters).

    ``softmax_k(-alpha ||k - q - Delta||^2) = softmax_y(-alpha (y - y_q - Delta_y)^2)
    softmax_x(-alpha (x - x_q - Delta_x)^2)``: the squared distance is a sum over the axes and the
    padded grid is the product of a row range and a column range. Query i sits at pixel i s.
    A leaf of ``torch.fx`` graphs (its shape arithmetic needs concrete sizes).
    """
    top, bottom, left, right = padding
    height, width = size
    compute = torch.float64 if centers.dtype == torch.float64 else torch.float32
    alpha = log_alpha.to(compute).exp()[:, None, None]  # (h, 1, 1)
    centers = centers.to(compute)

    def axis(n_out: int, step: int, first: int, last: int, centre: Tensor) -> Tensor:
        keys = torch.arange(first, last, device=centre.device, dtype=compute)  # padded positions
        queries = torch.arange(n_out, device=centre.device, dtype=compute) * step
        # (h, n_out, n_keys): key - query - Delta of every head
        shift = keys[None, None, :] - queries[None, :, None] - centre[:, None, None]
        return torch.softmax(-alpha * shift.square(), dim=-1)

    out_h = (height + top + bottom - window[0]) // stride[0] + 1
    out_w = (width + left + right - window[1]) // stride[1] + 1
    rows = axis(out_h, stride[0], -top, height + bottom, centers[:, 0])
    cols = axis(out_w, stride[1], -left, width + right, centers[:, 1])
    return rows, cols


fx.wrap("gaussian_axis_weights")


@register(
    "conv_as_attention",
    family="conv_attention",
    paper=Paper("On the Relationship between Self-Attention and Convolutional Layers", "1911.03584"),
    equation="MHSA(X) = sum_h softmax_k(-alpha_h ||k - q - Delta_h||^2) X W_h + b (quadratic relative "
    "encoding v_h . r_delta, r_delta = (||delta||^2, delta)); alpha -> inf, K^2 heads: a K x K conv",
    make_kwargs=lambda s: {"in_channels": s.width},
    make_inputs=image_input,
    cost="time O(B N_h C_in HW (H + W) + B HW N_h C_in C_out); memory O(B N_h C_in HW + N_h (H^2 + W^2)) "
    "(the positional softmax factorises into a row and a column softmax: no HW x HW matrix)",
    placement="conv",
    map_kind="pairwise",
    notes="content-independent (the paper's quadratic-encoding experiments, the official code's default "
    "use_attention_data=False); ConvAsAttention.from_conv(conv) reproduces a given nn.Conv2d exactly "
    "(strided, dilated, grouped, non-square, even kernels, any zero padding).",
    samples=(
        Sample(
            "padding=1",
            {"padding": 1, "window": 3},
            thorough=True,
            description="keys over a zero-padded grid, like a 3 x 3 conv",
        ),
        Sample("num_heads=4", {"num_heads": 4}, description="4 heads"),
    ),
)
class ConvAsAttention(nn.Module):
    """Positional multi-head self-attention that can express any K x K convolution (K^2 heads).

    Each head h attends with the quadratic relative encoding of the paper (eq. 9):
    ``score_h(q, k) = -alpha_h ||k - q - Delta_h||^2`` (up to a constant,
    ``v_h . r_delta`` with ``r_delta = (||delta||^2, delta_1, delta_2)``,
    ``v_h = -alpha_h (1, -2 Delta_h)``): a Gaussian attention centred at the shift Delta_h from
    the query, of inverse width alpha_h, independent of the content. The output (eq. 6)::

        MHSA(X)_q = sum_h sum_k softmax_k(score_h(q, k)) X_k W_h + b

    with ``W_h = W_val^h W_out^h`` (C_in x C_out each, stored as one Linear over the heads'
    concatenated C_in-wide outputs, as in the official code). As alpha -> infinity each head
    picks the one pixel at q + Delta_h, and with the K^2 shifts of a K x K grid the layer is a
    K x K convolution (Theorem 1): :meth:`from_conv` builds that layer from an ``nn.Conv2d``.
    Learned (the default): centres initialised N(0, 2^2) (official ``gaussian_init_mu_std``),
    alpha = exp(log_alpha) from 1, trained with the rest.

    Keys range over the image padded by ``padding`` zero pixels (no padding: the softmax runs over
    the image, as in the official code); query (i, j) sits at pixel (i s, j s) for stride s. The
    isotropic Gaussian makes the softmax over the 2-D grid the product of a softmax over rows and
    one over columns, so the layer computes ``A_row^h X A_col^h^T`` per head: O(H^2 + W^2)
    weights, never the HW x HW matrix (returned only when ``return_attn`` asks for it).

    Args:
        in_channels: C_in.
        out_channels: C_out (default ``in_channels``).
        num_heads: N_h (paper: 9, a 3 x 3 kernel's worth).
        stride: queries on every s-th pixel (output ``ceil(H / s)`` with the default window).
        padding: zero pixels around the key grid: p, (p_h, p_w) or (top, bottom, left, right).
        window: the receptive extent that sets the output size as a convolution's kernel does,
            ``H_out = floor((H + top + bottom - window_h) / s) + 1``; default ``1 + top + bottom``
            (the output keeps ``ceil(H / s)``).
        centre_std: std of the initial centres (official: 2).
        bias: the output bias b.

    Shape:
        - x: (B, C_in, H, W).
        - output: (B, C_out, H_out, W_out); attention (``return_attn``): (B, N_h, H_out W_out,
          H_p W_p) over the padded key grid, rows summing to 1 (the same for every item).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        num_heads: int = 9,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        window: int | Sequence[int] | None = None,
        centre_std: float = 2.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        check_positive(in_channels=in_channels, out_channels=out_channels, num_heads=num_heads)
        strides = check_pair("stride", stride, "(s_h, s_w)")
        self.padding = _four_sides(padding)
        top, bottom, left, right = self.padding
        if window is None:
            windows = (1 + top + bottom, 1 + left + right)
        else:
            windows = check_pair("window", window, "(w_h, w_w)")
        self.in_channels, self.out_channels, self.num_heads = in_channels, out_channels, num_heads
        self.stride, self.window, self.centre_std = strides, windows, centre_std
        factory = {"device": device, "dtype": dtype}
        # Delta_h = (dy, dx) and alpha_h = exp(log_alpha_h): the quadratic encoding of each head
        self.centers = nn.Parameter(torch.empty(num_heads, 2, **factory))
        self.log_alpha = nn.Parameter(torch.empty(num_heads, **factory))
        # sum_h W_h as one (N_h C_in -> C_out) map: input index h * C_in + c
        self.value = nn.Linear(num_heads * in_channels, out_channels, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.centers, std=self.centre_std)
        nn.init.zeros_(self.log_alpha)
        self.value.reset_parameters()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ConvAsAttention:
        """The attention layer whose output equals ``conv``'s (Theorem 1): K_h K_w heads, one per tap.

        Head (a, b) is centred on the tap's pixel, ``Delta = (a d_h - top, b d_w - left)``
        relative to the query pixel (i s_h, j s_w), with alpha so large that its softmax is
        one-hot; its W_h is the tap's (C_out x C_in) slice of the kernel (block-diagonal for a
        grouped conv). Strided, dilated, grouped, non-square and even kernels and any zero
        padding ('same', 'valid', ints) are supported.

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``.
            ValueError: a padding mode other than 'zeros' (reflection or circular padding puts
                image pixels, not zeros, outside the image, which a softmax over positions
                cannot weight by the kernel).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"conv: expected padding_mode='zeros', got {conv.padding_mode!r} (only zero padding is "
                f"a key grid of zero pixels)"
            )
        (k_h, k_w), (d_h, d_w), stride = conv.kernel_size, conv.dilation, conv.stride
        if isinstance(conv.padding, str):
            # 'same' pads d (K - 1) in total, the odd pixel at the bottom/right (as F.conv2d does)
            total_h, total_w = (d_h * (k_h - 1), d_w * (k_w - 1)) if conv.padding == "same" else (0, 0)
            padding = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        else:
            padding = (conv.padding[0], conv.padding[0], conv.padding[1], conv.padding[1])
        weight = conv.weight.detach()
        factory = {"device": weight.device, "dtype": weight.dtype}
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            num_heads=k_h * k_w,
            stride=stride,
            padding=padding,
            window=(d_h * (k_h - 1) + 1, d_w * (k_w - 1) + 1),
            bias=conv.bias is not None,
            **factory,
        )
        rows = torch.arange(k_h, **factory) * d_h - padding[0]
        cols = torch.arange(k_w, **factory) * d_w - padding[2]
        # (K_h, K_w, 2) -> (K_h K_w, 2): head a * K_w + b is tap (a, b)
        centers = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
        # a grouped kernel (C_out, C_in / g, K_h, K_w) as the dense block-diagonal (C_out, C_in, K_h, K_w)
        dense = torch.zeros(conv.out_channels, conv.in_channels, k_h, k_w, **factory)
        per_in, per_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
        for g in range(conv.groups):
            dense[g * per_out : (g + 1) * per_out, g * per_in : (g + 1) * per_in] = weight[
                g * per_out : (g + 1) * per_out
            ]
        with torch.no_grad():
            layer.centers.copy_(centers)
            layer.log_alpha.fill_(math.log(HARD_ALPHA))
            # (C_out, C_in, K_h, K_w) -> (C_out, K_h, K_w, C_in) -> (C_out, K_h K_w C_in): head-major
            layer.value.weight.copy_(dense.permute(0, 2, 3, 1).reshape(conv.out_channels, -1))
            if conv.bias is not None:
                layer.value.bias.copy_(conv.bias.detach())
        return layer

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H_out, W_out) for an (H, W) input."""
        top, bottom, left, right = self.padding
        return (
            (height + top + bottom - self.window[0]) // self.stride[0] + 1,
            (width + left + right - self.window[1]) // self.stride[1] + 1,
        )

    def axis_weights(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Each head's positional softmax as a row factor (N_h, H_out, H_p) and a column factor
        (N_h, W_out, W_p) (:func:`gaussian_axis_weights`)."""
        return gaussian_axis_weights(
            self.centers, self.log_alpha, (height, width), self.padding, self.stride, self.window
        )

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.in_channels, dtype=parameter_dtype(self))
        batch, _, height, width = x.shape
        if not isinstance(x, fx.Proxy) and min(self.output_size(height, width)) < 1:
            raise ValueError(
                f"x: expected a map of at least the window {self.window} after padding {self.padding}, "
                f"got {height} x {width}"
            )
        rows, cols = self.axis_weights(height, width)
        top, bottom, left, right = self.padding
        padded = F.pad(x, (left, right, top, bottom))  # (B, C, H_p, W_p): zero keys outside the image
        rows, cols = rows.to(x.dtype), cols.to(x.dtype)
        # sum over key rows, then key columns:
        # (B, C, H_p, W_p) -> (B, h, C, H_out, W_p) -> (B, h, C, H_out, W_out)
        per_head = torch.einsum("hiy,bcyx->bhcix", rows, padded)
        per_head = torch.einsum("bhcix,hjx->bhcij", per_head, cols)
        # (B, h, C, H_out, W_out) -> (B, H_out, W_out, h, C) -> (B, H_out, W_out, h C): head-major
        per_head = per_head.permute(0, 3, 4, 1, 2).flatten(3)
        out = self.value(per_head).permute(0, 3, 1, 2)  # (B, H_out, W_out, C_out) -> (B, C_out, H_out, W_out)
        if not return_attn:
            return out
        # (h, H_out, H_p) x (h, W_out, W_p) -> (h, H_out, W_out, H_p, W_p) -> (h, N_q, N_k)
        dense = torch.einsum("hiy,hjx->hijyx", rows, cols).flatten(3).flatten(1, 2)
        return out, dense.expand(batch, *dense.shape)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, num_heads={self.num_heads}, stride={self.stride}, "
            f"padding={self.padding}, window={self.window}"
        )
