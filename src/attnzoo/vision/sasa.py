"""Stand-alone self-attention (SASA): local multi-head attention over a k x k window.

Ramachandran, Parmar, Vaswani, Bello, Levskaya, Shlens 2019, "Stand-Alone Self-Attention in Vision
Models", https://arxiv.org/abs/1906.05909. No official code was released.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.window import window_attention
from attnzoo.registry import Paper, Sample, example_image, image_input, register

__all__ = ["SASA"]


@register(
    "sasa",
    family="conv_attention",
    paper=Paper("Stand-Alone Self-Attention in Vision Models", "1906.05909"),
    equation="y_ij = sum_{ab in N_k(ij)} softmax_ab(q_ij . k_ab + q_ij . r_{a-i,b-j}) v_ab, "
    "r = concat(r^row_{a-i}, r^col_{b-j}), per head; k = 7, 8 heads; out-of-image keys masked",
    make_kwargs=lambda s: {"in_channels": s.width, "num_heads": 4},
    make_inputs=image_input,
    cost="time O(B HW C (b + 2r)^2 / b^2 (1 + 2(b + 2r) / d)) with tiles of b = 2k; "
    "memory O(B C HW (b + 2r)^2 / b^2 (1 + 2(b + 2r) / d)), no k^2-fold key copy",
    placement="conv",
    map_kind="local",
    notes="clamp_window=True is NATTEN's neighbourhood attention (windows shifted inside the image); "
    "the paper's border keys are masked. The relative embeddings are split per head: each head's "
    "query has a row half and a column half. Strided layers average-pool 2x2 after attention.",
    samples=(
        Sample("clamp_window", {"clamp_window": True}, thorough=True, description="NATTEN's clamped windows"),
        Sample("kernel_size=3", {"kernel_size": 3}, description="a 3 x 3 window"),
        Sample(
            "small_map",
            inputs=lambda s: (example_image(s, side=5),),
            description="a 7 x 7 window on a 5 x 5 map (border keys masked)",
        ),
        Sample("block_size=4", {"block_size": 4}, description="smaller tiles (more halo)"),
    ),
)
class SASA(nn.Module):
    """Stand-alone local self-attention: the k x k spatial convolution replaced by attention.

    For each pixel ij and each head (paper eq. 2-3)::

        y_ij = sum_{(a, b) in N_k(ij)} softmax_ab(q_ij^T k_ab + q_ij^T r_{a-i, b-j}) v_ab

    with ``q = W_Q x``, ``k = W_K x``, ``v = W_V x`` (1x1 projections, separate per head through
    the channel split) and the relative embedding ``r_{a-i, b-j} = concat(r^row_{a-i},
    r^col_{b-j})``: half of each head's query dimensions meet row offsets, half column offsets.
    The logits are not scaled (the paper's equation). The heads' outputs are concatenated (no
    output projection). A strided layer is followed by 2x2 average pooling (the paper's
    downsampling), so its output is ``ceil(H / stride)`` on a side.

    Border handling: keys outside the image are masked, so a border query attends over fewer
    keys; NOT zero keys that stay in the softmax (the pitfall of the leaderj1001 and timm
    HaloAttn code, whose padded keys keep the logit ``q . r`` and dilute border outputs).
    ``clamp_window=True`` gives neighbourhood attention instead (NATTEN): the window is shifted
    to stay inside the image, every query sees k x k keys, offsets reach +-(k - 1) and the
    relative tables have 2k - 1 rows.

    Even window sizes are refused (no centred window). A window larger than the map is fine in
    the masked form (each query sees the keys of the window that lie in the image, the whole map
    once k >= 2 max(H, W) - 1) and an error with ``clamp_window`` (the window cannot fit).

    Computed in tiles of ``block_size`` (default 2k) queries with a halo of k // 2 through the
    fused kernel: the window edges and the image border are folded into an augmented dot
    product (:func:`attnzoo.functional.window.window_attention`); no k^2-fold copy of the keys.
    A non-finite key reaches the queries of its whole tile (through the dot product), not only
    those of its window: non-finite inputs give non-finite outputs either way. Heads of at most
    8 dimensions (without ``clamp_window`` or ``block_size``) are computed by shift-and-accumulate
    over the k^2 taps instead (the (B, N, k^2, H, W) logits; the tiles' 2 (b + 2r) code entries
    would be 5x such a head's own dimensions).

    Args:
        in_channels: C_in.
        out_channels: C (default ``in_channels``); a multiple of ``2 * num_heads``.
        kernel_size: k, the window side (paper: 7); odd.
        stride: 1, or the average-pooling factor after attention.
        num_heads: N (paper: 8).
        clamp_window: NATTEN's clamped windows instead of masked border keys.
        block_size: the tile side of the computation (default 2k); more than k // 2.
        qkv_bias: biases in the 1x1 projections (the paper's layers have none).

    Shape:
        - x: (B, C_in, H, W).
        - output: (B, C, ceil(H / stride), ceil(W / stride)); attention (``return_attn``):
          (B, N, H, W, k * k) window weights at the input resolution, tap (a, b) at a * k + b,
          zero for masked keys, summing to 1 over the window.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        kernel_size: int = 7,
        *,
        stride: int = 1,
        num_heads: int = 8,
        clamp_window: bool = False,
        block_size: int | None = None,
        qkv_bias: bool = False,
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
            block_size=block_size,
        )
        if kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size: expected an odd window side (a window centred on its pixel), got {kernel_size}"
            )
        if out_channels % (2 * num_heads):
            raise ValueError(
                f"out_channels: expected a multiple of 2 * num_heads = {2 * num_heads} (each head's "
                f"query splits into a row half and a column half), got {out_channels}"
            )
        if block_size is not None and block_size <= kernel_size // 2:
            raise ValueError(
                f"block_size: expected more than kernel_size // 2 = {kernel_size // 2}, got {block_size}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.num_heads = kernel_size, stride, num_heads
        self.clamp_window, self.block_size = clamp_window, block_size
        self.head_dim = out_channels // num_heads
        factory = {"device": device, "dtype": dtype}
        # W_Q, W_K, W_V as one 1x1 projection on (B, HW, C) tokens
        self.qkv = nn.Linear(in_channels, 3 * out_channels, bias=qkv_bias, **factory)
        # offsets -r..r (masked windows) or -(k-1)..k-1 (clamped windows), per head, d / 2 each
        offsets = 2 * kernel_size - 1 if clamp_window else kernel_size
        self.rel_rows = nn.Parameter(torch.empty(offsets, num_heads, self.head_dim // 2, **factory))
        self.rel_cols = nn.Parameter(torch.empty(offsets, num_heads, self.head_dim // 2, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the paper gives no initialisation; N(0, d^-1/2) keeps q . r on the scale of q . k
        nn.init.normal_(self.rel_rows, std=self.head_dim**-0.5)
        nn.init.normal_(self.rel_cols, std=self.head_dim**-0.5)
        self.qkv.reset_parameters()

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.in_channels, dtype=parameter_dtype(self))
        batch, _, height, width = x.shape
        if self.clamp_window and not isinstance(x, fx.Proxy) and min(height, width) < self.kernel_size:
            raise ValueError(
                f"x: clamp_window=True needs the {self.kernel_size} x {self.kernel_size} window to fit "
                f"inside the map, expected H, W >= {self.kernel_size}, got {height} x {width}"
            )
        tokens = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C): channels last for the Linear
        qkv = self.qkv(tokens).view(batch, height, width, 3, self.num_heads, self.head_dim)
        # (B, H, W, 3, h, d) -> (3, B, h, H, W, d)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
        out, weights = window_attention(
            q,
            k,
            v,
            self.rel_rows,
            self.rel_cols,
            self.kernel_size,
            clamp=self.clamp_window,
            block_size=self.block_size,
            return_weights=return_attn,
        )
        # (B, h, H, W, d) -> (B, h, d, H, W) -> (B, C, H, W), a fresh NCHW tensor
        out = out.permute(0, 1, 4, 2, 3).flatten(1, 2)
        if self.stride > 1:
            out = F.avg_pool2d(out, self.stride, ceil_mode=True)
        return (out, weights) if weights is not None else out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"num_heads={self.num_heads}, clamp_window={self.clamp_window}"
        )
