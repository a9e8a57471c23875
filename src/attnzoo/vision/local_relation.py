"""Local relation layer (LR-Net): attention over a k x k window from -(q - k)^2 and a geometric prior.

Hu, Zhang, Xie and Lin 2019, "Local Relation Networks for Image Recognition" (ICCV 2019),
https://arxiv.org/abs/1904.11491.

Pure PyTorch: the logits and the aggregation are shift-and-accumulate loops over the k^2 taps
(:mod:`attnzoo.functional.local_window`), never an unfold of the values (49 times their memory
at k = 7); it runs on CPU and exports to ONNX with standard operators, where the authors' kernel
is CUDA-only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.local_window import (
    check_window,
    window_aggregate,
    window_border_mask,
    window_neg_sq_distance,
    window_offsets,
)
from attnzoo.functional.softmax import masked_softmax
from attnzoo.registry import Paper, Sample, image_input, register

__all__ = ["LocalRelation"]


@register(
    "local_relation",
    family="conv_attention",
    paper=Paper("Local Relation Networks for Image Recognition", "1904.11491"),
    equation="w_g(p', p) = softmax_{p in k x k window of p', inside the map}(-(q_g(p') - k_g(p))^2 "
    "+ MLP_g(p - p')); y_c(p') = sum_p w_{g(c)}(p', p) x_c(p), m = 8 channels per g; out = W_o y",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B HW (C C_out + 2 C C/m + k^2 C)); memory O(B HW (k^2 C/m + C + C_out)) "
    "(logits per group of m channels, never the k^2-unfolded values)",
    placement="conv",
    map_kind="local",
    linear_memory=True,
    samples=(
        Sample("kernel_size=3", kwargs={"kernel_size": 3}, description="a 3 x 3 window"),
        Sample(
            "key_channels",
            kwargs={"key_channels": lambda s: 2 * s.width // 8},
            description="two query/key channels per aggregation group",
        ),
        Sample("channel_sharing=4", kwargs={"channel_sharing": 4}, description="m = 4"),
    ),
    notes="Out-of-image neighbours are masked out of the softmax (the authors' kernel gives them a "
    "-100 logit); the geometric prior is an MLP on the true relative offsets. A popular "
    "re-implementation feeds the prior random coordinates (torch.rand, never learned), uses a "
    "dot product per channel instead of -(q - k)^2 and zero-pads the border keys.",
)
class LocalRelation(nn.Module):
    """Local relation layer: softmax over a k x k window of appearance plus geometry, per group.

    With q = W_q x and k = W_k x (1x1 convs to C/m channels, one per aggregation group), for the
    output position p' and every p in its k x k window Omega(p') (paper eq. 2-4):

    ``w_g(p', p) = softmax_{p in Omega(p')} (Phi(q_g(p'), k_g(p)) + G_g(p - p'))``

    with the appearance composability ``Phi(q, k) = -(q - k)^2`` (summed over the group's
    query/key channels when there are several) and the geometric prior G: a two-layer MLP
    (1x1 conv, ReLU, 1x1 conv) on the relative offset ``(dy, dx) / (k // 2)`` of the tap, one
    output per group, learned. The input is aggregated directly, m channels sharing one weight
    map (channel sharing, the contiguous block ``g = c // m``):
    ``y_c(p') = sum_p w_{g(c)}(p', p) x_c(p)``, followed by a 1x1 conv to ``out_channels``.

    Neighbours outside the map are masked (they do not enter the softmax); the window is never
    zero-padded into the weights. A window larger than the map is fine: its outside taps are
    masked, and the centre always remains.

    Memory: the logits are k^2 per group of m channels; the values are visited tap by tap.

    Args:
        channels: C, the input width, divisible by ``channel_sharing``.
        out_channels: width of the output 1x1 conv (default ``channels``).
        stride: output every ``stride`` pixels (the window stays centred on the output pixel).
        kernel_size: k, odd (paper: 7).
        channel_sharing: m, channels per aggregation weight map (paper: 8).
        key_channels: width of q and k, a multiple of C / m (default C / m: one per group).
        prior_channels: hidden width of the geometric prior's MLP (default max(C / m, 8)).

    Shape:
        - x: (B, C, H, W).
        - output: (B, C_out, H', W'), H' = ceil(H / stride); attention (``return_attn``): the
          weights (B, C / m, H', W', k^2), summing to 1 over k^2, 0 at outside taps.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        kernel_size: int = 7,
        channel_sharing: int = 8,
        key_channels: int | None = None,
        prior_channels: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        check_positive(channels=channels)
        check_positive(out_channels=out_channels)
        check_positive(stride=stride)
        check_positive(channel_sharing=channel_sharing)
        check_window(kernel_size)
        if channels % channel_sharing:
            raise ValueError(
                f"channel_sharing: expected a divisor of channels={channels}, got {channel_sharing}"
            )
        groups = channels // channel_sharing
        key_channels = groups if key_channels is None else key_channels
        check_positive(key_channels=key_channels)
        if key_channels % groups:
            raise ValueError(
                f"key_channels: expected a multiple of the {groups} aggregation groups (C / m), "
                f"got {key_channels}"
            )
        prior_channels = max(groups, 8) if prior_channels is None else prior_channels
        check_positive(prior_channels=prior_channels)
        self.channels, self.out_channels, self.stride = channels, out_channels, stride
        self.kernel_size, self.channel_sharing, self.groups = kernel_size, channel_sharing, groups
        self.key_channels = key_channels
        factory = {"device": device, "dtype": dtype}
        self.query = nn.Conv2d(channels, key_channels, 1, bias=False, **factory)
        self.key = nn.Conv2d(channels, key_channels, 1, bias=False, **factory)
        self.geometry_prior = nn.Sequential(
            nn.Linear(2, prior_channels, **factory),
            nn.ReLU(),
            # no bias: a constant over the window cancels in the softmax
            nn.Linear(prior_channels, groups, bias=False, **factory),
        )
        self.proj = nn.Conv2d(channels, out_channels, 1, bias=False, **factory)
        # the (dy, dx) offset of every tap, scaled to [-1, 1]: the geometric prior's input (k^2, 2)
        half = max(kernel_size // 2, 1)
        offsets = torch.tensor(window_offsets(kernel_size), dtype=torch.float64) / half
        buffer_dtype = dtype or torch.get_default_dtype()
        self.register_buffer("offsets", offsets.to(device=device, dtype=buffer_dtype), persistent=False)

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        k, s, groups = self.kernel_size, self.stride, self.groups
        query = self.query(x)[..., ::s, ::s]  # (B, K, H', W'): the centre of every window
        # -(q - k)^2 summed over each group's K / G channels, keys zero outside (masked below)
        appearance = window_neg_sq_distance(query, self.key(x), k, groups, stride=s)  # (B, G, k^2, H', W')
        prior = self.geometry_prior(self.offsets.to(x.dtype)).t()  # (k^2, 2) -> (k^2, G) -> (G, k^2)
        inside = window_border_mask(x.shape[2], x.shape[3], k, stride=s, device=x.device)  # (k^2, H', W')
        # the prior and the border as one additive term: -inf where the neighbour is outside
        bias = torch.where(inside, prior[:, :, None, None], float("-inf"))  # (G, k^2, H', W')
        # in place: the logits are the one (B, G, k^2, H', W') buffer besides the weights
        weights = masked_softmax(appearance.add_(bias), dim=2)  # (B, G, k^2, H', W'), over the window
        out = self.proj(window_aggregate(x, weights, k, stride=s))  # (B, C, H', W') -> (B, C_out, H', W')
        if not return_attn:
            return out
        return out, weights.permute(0, 1, 3, 4, 2)  # (B, G, k^2, H', W') -> (B, G, H', W', k^2)
