"""SAN: pairwise and patchwise self-attention over a local footprint.

Zhao, Jia and Koltun 2020, "Exploring Self-attention for Image Recognition" (CVPR 2020),
https://arxiv.org/abs/2004.13621; official code https://github.com/hszhao/SAN (CUDA/CuPy only).

Pure PyTorch here: the aggregation is a shift-and-accumulate over the k^2 taps
(:func:`attnzoo.functional.local_window.window_aggregate`), so the values are never unfolded
(k^2 = 49 times their memory in the usual re-implementation), and the layer runs on CPU and
exports to ONNX with standard operators.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.local_window import (
    check_window,
    window_aggregate,
    window_output_size,
    window_stack,
)
from attnzoo.functional.softmax import masked_softmax
from attnzoo.layers import plain_layer, reduced_width
from attnzoo.registry import Paper, Sample, image_input, register
from attnzoo.vision._norm import NormSpec, create_norm

__all__ = ["SANAttention", "san_position_offsets"]

Mode = Literal["pairwise", "patchwise"]


def san_position_offsets(
    height: int,
    width: int,
    kernel_size: int,
    *,
    stride: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """SAN's relative position: ``p_i - p_j`` for every pixel i and footprint tap j, (2, k^2, H', W').

    The coordinates are the official code's: x then y, each ``linspace(-1, 1, size)`` over the
    map (so a step is ``2 / (size - 1)`` and depends on the map's size), and the neighbour j is
    read with the same reflection padding as the features (a tap beyond the border takes the
    mirrored pixel's coordinate, as ``Subtraction(pad_mode=1)`` does).
    """
    grid = _coordinate_grid(height, width, device=device, dtype=dtype)  # (1, 2, H, W)
    return _footprint_differences(grid, kernel_size, stride)


def _coordinate_grid(
    height: int, width: int, *, device: torch.device | str | None, dtype: torch.dtype | None
) -> Tensor:
    """The official ``position(H, W)``: (1, 2, H, W), channel 0 the x coordinate, channel 1 the y
    coordinate, each ``linspace(-1, 1, size)`` over the map."""
    step_x = 2.0 / max(width - 1, 1)
    step_y = 2.0 / max(height - 1, 1)
    xs = torch.arange(width, device=device, dtype=dtype) * step_x - 1.0  # (W,)
    ys = torch.arange(height, device=device, dtype=dtype) * step_y - 1.0  # (H,)
    return torch.stack([xs.expand(height, width), ys.unsqueeze(1).expand(height, width)]).unsqueeze(0)


def _footprint_differences(field: Tensor, kernel_size: int, stride: int) -> Tensor:
    """``f_i - f_j`` of a (1, C, H, W) field for every output pixel i and footprint tap j:
    (C, k^2, H', W'), the neighbours read with reflection padding (official ``Subtraction``)."""
    centre = field[..., ::stride, ::stride].unsqueeze(2)  # (1, C, 1, H', W')
    neighbours = window_stack(
        field, kernel_size, stride=stride, padding_mode="reflect"
    )  # (1, C, k^2, H', W')
    return (centre - neighbours)[0]  # (C, k^2, H', W')


@register(
    "san",
    family="conv_attention",
    paper=Paper("Exploring Self-attention for Image Recognition", "2004.13621"),
    equation="pairwise: y_i = sum_{j in R(i)} softmax_j(gamma([phi(x_i) - psi(x_j), W_p (p_i - p_j)])) "
    "* beta(x_j); patchwise: y_i = sum_j gamma([phi(x_i), psi(x_R(i))])_j * beta(x_j) (no softmax); "
    "one weight map per 8 channels (channel c uses map c mod C/8), reflection padding",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B HW (C C_out + k^2 (C/16)^2 + k^2 C_out)); memory O(B HW (k^2 C_out/8 + k^2 C/16 + C_out)) "
    "(weights per shared group, never the k^2-unfolded values)",
    placement="conv",
    map_kind="local",
    linear_memory=True,
    samples=(
        Sample("mode=patchwise", kwargs={"mode": "patchwise"}, description="patchwise, no softmax"),
        Sample("kernel_size=3", kwargs={"kernel_size": 3}, description="the first SAN stage's footprint"),
        Sample(
            "patchwise,kernel_size=3",
            kwargs={"mode": "patchwise", "kernel_size": 3},
            description="patchwise with the first stage's footprint",
        ),
        Sample(
            "norm_layer=GroupNorm",
            {"norm_layer": lambda s: functools.partial(nn.GroupNorm, 1)},
            description="GroupNorm in the weight MLP instead of BatchNorm",
        ),
        Sample(
            "patchwise,norm_layer=None",
            {"mode": "patchwise", "norm_layer": None},
            description="patchwise without normalisation",
        ),
    ),
    notes="Follows the official code (hszhao/SAN): subtraction relation with the normalised-coordinate "
    "position term, BN-ReLU-conv-BN-ReLU-conv weight MLP, interleaved channel sharing (c mod C/8), "
    "reflection padding. Two official biases that cancel (conv_p's before the subtraction, the last "
    "pairwise conv's before the softmax over the footprint) are left out: same outputs, no dead "
    "parameters. norm_layer replaces the weight MLP's BatchNorms (None: none, and the conv before "
    "the second gets a bias). Runs on CPU and exports to ONNX, where the official CuPy ops raise.",
)
class SANAttention(nn.Module):
    """SAN self-attention (SAM): pairwise or patchwise weights over a k x k footprint.

    With phi, psi, beta 1x1 convolutions (``query``, ``key``, ``value``; official conv1, conv2,
    conv3), R(i) the k x k footprint around pixel i and gamma a small MLP (``weight_mlp``,
    official conv_w):

    - pairwise (paper eq. 2 with the subtraction relation and position encoding, Sec. 3.1):
      ``alpha_ij = softmax_{j in R(i)} gamma([phi(x_i) - psi(x_j), W_p (p_i - p_j)])``, where p are
      the pixel coordinates normalised to [-1, 1] and W_p a learned 2 x 2 map (``position``);
    - patchwise (eq. 4, concatenation relation): ``alpha_i = gamma([phi(x_i), psi(x_j) for j in
      R(i)])``, k^2 weights per map from the whole patch, used as they are (no softmax);

    and ``y_i = sum_{j in R(i)} alpha_ij (.) beta(x_j)``. The weights have C_out / s channels
    (s = ``share_channels`` = 8): output channel c uses weight channel ``c mod (C_out / s)``
    (the official aggregation kernel's interleaved sharing, not contiguous blocks). Neighbours
    beyond the border are read with reflection padding, as in the official kernels.

    gamma, pairwise: BN-ReLU-1x1 (r + 2 -> r, no bias)-BN-ReLU-1x1 (r -> C_out / s), with r the
    relation width (C / 16). Patchwise: BN-ReLU-1x1 ((k^2 + 1) r -> C_out / s, no bias)-BN-ReLU-
    1x1 (C_out / s -> k^2 C_out / s). Both run on a (B, ., k^2, H W) layout as the official code
    does, so official weights load one to one (less the two cancelling biases, see ``notes``).

    The values are never unfolded: the aggregation is a shift-and-accumulate over the k^2 taps
    (memory of one output plus the weights, which are k^2 per 8 channels).

    Args:
        channels: C, the input width.
        out_channels: C_out (official: ``mid_planes``); default ``channels``. Must be divisible
            by ``share_channels``.
        stride: output every ``stride`` pixels (the SAN networks use 1 and max-pool between
            stages).
        mode: ``"pairwise"`` or ``"patchwise"``.
        kernel_size: k, the footprint, odd (paper: 7; 3 in the first stage of the networks).
        rel_channels: r, the width of phi and psi (default C / 16, official ``rel_planes``).
        share_channels: s, how many channels share one weight map (paper: 8).
        norm_layer: the weight MLP's two normalisations, a factory ``(num_features, device=...,
            dtype=...) -> nn.Module`` applied to (B, ., k^2, H W) maps (default ``nn.BatchNorm2d``,
            the official code's); None: no normalisation.

    Shape:
        - x: (B, C, H, W), H and W larger than k // 2 (reflection padding).
        - output: (B, C_out, H', W'), H' = ceil(H / stride); attention (``return_attn``): the
          weights (B, C_out / s, H', W', k^2) (summing to 1 over k^2 for pairwise).
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        mode: Mode = "pairwise",
        kernel_size: int = 7,
        rel_channels: int | None = None,
        share_channels: int = 8,
        norm_layer: NormSpec = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        check_positive(channels=channels)
        check_positive(out_channels=out_channels)
        check_positive(stride=stride)
        check_positive(share_channels=share_channels)
        check_window(kernel_size)
        if mode not in ("pairwise", "patchwise"):
            raise ValueError(f"mode: expected 'pairwise' or 'patchwise', got {mode!r}")
        if out_channels % share_channels:
            raise ValueError(
                f"share_channels: expected a divisor of out_channels={out_channels}, got {share_channels}"
            )
        check_positive(rel_channels=rel_channels)  # by its name here (reduced_width calls it rd_channels)
        rel = reduced_width(channels, 1 / 16, rel_channels)
        self.channels, self.out_channels, self.stride = channels, out_channels, stride
        self.mode, self.kernel_size = mode, kernel_size
        self.rel_channels, self.share_channels = rel, share_channels
        weight_channels = out_channels // share_channels
        self.weight_channels = weight_channels
        factory = {"device": device, "dtype": dtype}
        self.query = nn.Conv2d(channels, rel, 1, **factory)  # phi (official conv1)
        self.key = nn.Conv2d(channels, rel, 1, **factory)  # psi (official conv2)
        self.value = nn.Conv2d(channels, out_channels, 1, **factory)  # beta (official conv3)
        taps = kernel_size * kernel_size
        if mode == "pairwise":
            self.weight_mlp = nn.Sequential(
                create_norm(norm_layer, rel + 2, **factory),
                nn.ReLU(inplace=True),  # in place: BN's backward needs its input only
                nn.Conv2d(rel + 2, rel, 1, bias=norm_layer is None, **factory),
                create_norm(norm_layer, rel, **factory),
                nn.ReLU(inplace=True),  # in place: BN's backward needs its input only
                # NOTE: the official conv has a bias; constant over the footprint, it cancels in
                # the softmax over j (and would never receive a gradient)
                nn.Conv2d(rel, weight_channels, 1, bias=False, **factory),
            )
            # W_p; NOTE: the official conv_p has a bias, which cancels in p_i - p_j
            self.position = nn.Conv2d(2, 2, 1, bias=False, **factory)
        else:
            self.weight_mlp = nn.Sequential(
                create_norm(norm_layer, rel * (taps + 1), **factory),
                nn.ReLU(inplace=True),  # in place: BN's backward needs its input only
                nn.Conv2d(rel * (taps + 1), weight_channels, 1, bias=norm_layer is None, **factory),
                create_norm(norm_layer, weight_channels, **factory),
                nn.ReLU(inplace=True),  # in place: BN's backward needs its input only
                nn.Conv2d(weight_channels, taps * weight_channels, 1, **factory),
            )

    def _position_term(self, x: Tensor) -> Tensor:
        """``W_p (p_i - p_j)`` for every output pixel i of ``x`` (B, C, H, W) and footprint tap j:
        (2, k^2, H', W').

        A plain ``position`` conv is read as its 2 x 2 weight applied to the offsets. Any other
        (hooked: pruning, weight or spectral normalisation, adapters, feature taps; or replaced)
        runs as itself where the official code calls ``conv_p``: on the (1, 2, H, W) coordinate
        grid, before the differences. W_p is linear, so both give W_p p_i - W_p p_j; and a bias
        (the official ``conv_p`` has one) cancels in the difference, as the fast path, which reads
        no bias, assumes.
        """
        k, s = self.kernel_size, self.stride
        height, width = x.shape[2], x.shape[3]
        if plain_layer(self.position, nn.Conv2d):
            offsets = san_position_offsets(
                height, width, k, stride=s, device=x.device, dtype=x.dtype
            )  # (2, k^2, H', W')
            # W_p (p_i - p_j): (2, 2) x (2, k^2, H', W') -> (2, k^2, H', W')
            return torch.einsum("oi,i...->o...", self.position.weight.flatten(1), offsets)
        grid = _coordinate_grid(height, width, device=x.device, dtype=x.dtype)  # (1, 2, H, W)
        return _footprint_differences(self.position(grid), k, s)  # (1, 2, H, W) -> (2, k^2, H', W')

    def _weights(self, x: Tensor) -> Tensor:
        """The footprint weights, (B, C_out / s, k^2, H', W')."""
        k, s = self.kernel_size, self.stride
        batch, out_h, out_w = x.shape[0], window_output_size(x.shape[2], s), window_output_size(x.shape[3], s)
        query = self.query(x)[..., ::s, ::s]  # (B, r, H', W'): the centre of every window
        keys = window_stack(self.key(x), k, stride=s, padding_mode="reflect")  # (B, r, k^2, H', W')
        if self.mode == "pairwise":
            relation = query.unsqueeze(2) - keys  # (B, r, 1, H', W') - (B, r, k^2, H', W')
            position = self._position_term(x)  # (2, k^2, H', W')
            features = torch.cat([relation, position.unsqueeze(0).expand(batch, -1, -1, -1, -1)], dim=1)
            # (B, r + 2, k^2, H', W') -> (B, r + 2, k^2, H' W'): the official layout for gamma
            logits = self.weight_mlp(features.flatten(3))  # (B, C_out / s, k^2, H' W')
            weights = masked_softmax(logits, dim=2)  # softmax over the footprint
        else:
            # (B, r, k^2, H', W') -> (B, r k^2, H', W'): channel c * k^2 + t, the official unfold order
            patch = torch.cat([query, keys.flatten(1, 2)], dim=1)  # (B, r (k^2 + 1), H', W')
            weights = self.weight_mlp(patch)  # (B, k^2 C_out / s, H', W')
            # (B, k^2 C_out / s, ...) -> (B, C_out / s, k^2, ...): channel w * k^2 + t, as officially viewed
        return weights.reshape(batch, self.weight_channels, k * k, out_h, out_w)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        weights = self._weights(x)
        out = window_aggregate(
            self.value(x),
            weights,
            self.kernel_size,
            stride=self.stride,
            padding_mode="reflect",
            sharing="interleaved",
        )  # (B, C_out, H', W')
        if not return_attn:
            return out
        # (B, C_out / s, k^2, H', W') -> (B, C_out / s, H', W', k^2)
        return out, weights.permute(0, 1, 3, 4, 2)
