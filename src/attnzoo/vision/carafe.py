"""CARAFE: content-aware reassembly of features, an upsampler with predicted k x k kernels.

Wang, Chen, Xu, Liu, Loy and Lin 2019, "CARAFE: Content-Aware ReAssembly of FEatures" (ICCV
2019), https://arxiv.org/abs/1905.02188; official operator: mmcv ``CARAFEPack`` (CUDA only,
exported to ONNX as a custom ``mmcv::`` op that standard runtimes reject).

Pure PyTorch here: the reassembly is a shift-and-accumulate over the k_up^2 taps on the input
map, every output sub-pixel of a window sharing the tap (no unfold of the input, which would be
k_up^2 = 25 times its memory, nor of an upsampled copy, 100 times); it runs on CPU, in half
precision, and exports to ONNX with standard operators.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo.functional.local_window import check_window, window_reassemble
from attnzoo.functional.softmax import masked_softmax
from attnzoo.registry import Paper, Sample, image_input, register

__all__ = ["CARAFE"]

#: The most bytes a tensor's storage can hold (its size is an int64).
_MAX_BYTES = 2**63 - 1


@register(
    "carafe",
    family="conv_attention",
    paper=Paper("CARAFE: Content-Aware ReAssembly of FEatures", "1905.02188"),
    equation="W = softmax_{k_up^2}(pixel_shuffle(conv_{k_enc}(conv_1x1(X)), sigma)); "
    "X'(l') = sum_{|n|,|m| <= k_up/2} W_{l'}(n, m) X(floor(l' / sigma) + (n, m))",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B HW (C C_m + k_enc^2 C_m sigma^2 k_up^2 + sigma^2 k_up^2 C)); "
    "memory O(B HW sigma^2 (C + G k_up^2)) (the output and the kernels, never an unfolded input)",
    shape_preserving=False,
    # an upsampler: it belongs to the heads and decoders that upsample features (FPN top-down
    # path, Mask R-CNN's mask head, UperNet), never inside a classification ResNet's blocks
    placement="head",
    map_kind="local",
    linear_memory=True,
    samples=(
        Sample("scale=3", kwargs={"scale": 3}, description="sigma = 3"),
        Sample("groups=2", kwargs={"groups": 2}, description="two kernel groups (mmcv up_group)"),
        Sample(
            "up_kernel=3",
            kwargs={"up_kernel": 3, "encoder_kernel": 1},
            description="k_up = 3 with a 1x1 encoder",
        ),
    ),
    notes="Layout as mmcv's CARAFEPack: encoder channel (g k_up^2 + t) sigma^2 + s before the pixel "
    "shuffle, softmax over the k_up^2 taps per group, the window of output pixel l' centred on "
    "floor(l' / sigma), zeros outside the map (still counted in the softmax). Encoder init "
    "N(0, 0.001), compressor xavier-uniform.",
)
class CARAFE(nn.Module):
    """CARAFE upsampler: every output pixel reassembles a k_up x k_up input window with its own kernel.

    Kernel prediction (paper Sec. 3.2): a channel compressor (1x1 conv C -> C_m = 64), a content
    encoder (k_enc x k_enc conv C_m -> G sigma^2 k_up^2), a pixel shuffle to (G k_up^2, sigma H,
    sigma W), and a kernel normaliser: softmax over the k_up^2 taps of each kernel. Reassembly
    (eq. 3): the output pixel l' = (i', j') takes the window of the input centred on
    l = (floor(i' / sigma), floor(j' / sigma)):

    ``X'_{l'} = sum_{n, m = -r..r} W_{l'}(n, m) X(i + n, j + m)``, r = k_up // 2,

    with zeros beyond the border (the softmax still spans all k_up^2 taps, as in mmcv). With G
    groups, channel c uses the kernels of group ``c // (C / G)``.

    A window larger than the map (k_up > H) is fine: its outside taps read zeros.

    Args:
        channels: C, the input width (divisible by ``groups``).
        scale: sigma, the upsampling factor (paper: 2).
        up_kernel: k_up, odd (paper: 5).
        encoder_kernel: k_enc, odd (paper: 3).
        encoder_dilation: dilation of the content encoder (mmcv default 1).
        compressed_channels: C_m (paper: 64).
        groups: G, kernel groups (mmcv ``up_group``, default 1).

    Shape:
        - x: (B, C, H, W).
        - output: (B, C, sigma H, sigma W); attention (``return_attn``): the kernels
          (B, G, sigma H, sigma W, k_up^2), summing to 1 over k_up^2.
    """

    def __init__(
        self,
        channels: int,
        scale: int = 2,
        *,
        up_kernel: int = 5,
        encoder_kernel: int = 3,
        encoder_dilation: int = 1,
        compressed_channels: int = 64,
        groups: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        check_positive(scale=scale)
        check_positive(encoder_dilation=encoder_dilation)
        check_positive(compressed_channels=compressed_channels)
        check_positive(groups=groups)
        check_window(up_kernel, "up_kernel")
        check_window(encoder_kernel, "encoder_kernel")
        if channels % groups:
            raise ValueError(f"groups: expected a divisor of channels={channels}, got {groups}")
        self.channels, self.scale, self.up_kernel, self.groups = channels, scale, up_kernel, groups
        factory = {"device": device, "dtype": dtype}
        self.compressor = nn.Conv2d(channels, compressed_channels, 1, **factory)
        self.encoder = nn.Conv2d(
            compressed_channels,
            groups * scale * scale * up_kernel * up_kernel,
            encoder_kernel,
            padding=encoder_dilation * (encoder_kernel - 1) // 2,
            dilation=encoder_dilation,
            **factory,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's init: xavier-uniform compressor, encoder N(0, 0.001), zero biases.

        With the encoder near zero every kernel starts close to a uniform k_up x k_up average.
        """
        nn.init.xavier_uniform_(self.compressor.weight)
        nn.init.zeros_(self.compressor.bias)
        nn.init.normal_(self.encoder.weight, std=0.001)
        nn.init.zeros_(self.encoder.bias)

    def _check_output_size(self, x: Tensor) -> None:
        batch, channels, height, width = x.shape
        out_bytes = batch * channels * (height * self.scale) * (width * self.scale) * x.element_size()
        if out_bytes > _MAX_BYTES:
            raise ValueError(
                f"x: upsampling a {height} x {width} map by scale={self.scale} gives a "
                f"{height * self.scale} x {width * self.scale} output of {out_bytes} bytes for batch "
                f"{batch} and {channels} channels of {x.dtype}, expected at most 2**63 - 1 (a "
                f"storage's size is an int64): split the map into tiles"
            )

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        self._check_output_size(x)
        batch, _, height, width = x.shape
        sigma, k, groups = self.scale, self.up_kernel, self.groups
        encoded = self.encoder(self.compressor(x))  # (B, G k^2 sigma^2, H, W)
        # The pixel shuffle would put channel (g k^2 + t) sigma^2 + s at sub-pixel s of the
        # sigma x sigma block of each input pixel; viewing the channels as (G, k^2, sigma^2)
        # reads the same kernels without shuffling them there and back (pixel_unshuffle of
        # pixel_shuffle is the identity). (B, G k^2 s^2, H, W) -> (B, G, k^2, s^2, H, W)
        logits = encoded.view(batch, groups, k * k, sigma * sigma, height, width)
        kernels = masked_softmax(logits, dim=2)  # normalised over the k_up^2 taps
        # every sub-pixel of an output block reads the same input window: (B, C, sigma H, sigma W)
        out = window_reassemble(x, kernels, k, sigma)
        if not return_attn:
            return out
        # (B, G, k^2, s^2, H, W) -> (B, G, k^2, sigma, sigma, H, W) -> (B, G, H, sigma, W, sigma, k^2)
        maps = kernels.unflatten(3, (sigma, sigma)).permute(0, 1, 5, 3, 6, 4, 2)
        return out, maps.reshape(batch, groups, height * sigma, width * sigma, k * k)
