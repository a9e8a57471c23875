"""SAG-Mask: the spatial attention-guided mask head of CenterMask.

Lee and Park 2020, "CenterMask: Real-Time Anchor-Free Instance Segmentation",
https://arxiv.org/abs/1911.06667.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnzoo._checks import check_input, check_variant, parameter_dtype
from attnzoo.functional.softmax import mean_of
from attnzoo.layers import LayerSpec, create_layer
from attnzoo.registry import Paper, Sample, Sizes, image_input, register

__all__ = ["SAGMask"]

Variant = Literal["paper", "official"]

#: RoI Align output side the paper feeds the head (masks come out at twice this: 28 x 28).
ROI_SIDE = 14


@register(
    "sag_mask",
    placement="head",
    map_kind="spatial",
    linear_memory=True,
    family="gating",
    paper=Paper("CenterMask: Real-Time Anchor-Free Instance Segmentation", "1911.06667"),
    equation="X = relu(conv3x3)^4(RoI); A = sigmoid(conv3x3([max_c X; mean_c X])); X_sag = A * X; "
    "masks = conv1x1(relu(deconv2x2_s2(X_sag)))",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    default_sizes=Sizes(width=32, extent=ROI_SIDE),
    shape_preserving=False,
    cost="time O(B HW (C D + 3 D^2) 9 + B HW D^2 + 4 B HW D K); memory O(B D HW + 4 B K HW) "
    "(D conv channels, K classes)",
    notes="a mask head: (B, C, 14, 14) RoI features -> (B, classes, 28, 28) mask logits; "
    "variant='official' pools [mean; max] (the authors' code) instead of the paper's [max; mean]",
    samples=(Sample("variant=official", {"variant": "official"}),),
)
class SAGMask(nn.Module):
    """Spatial attention-guided mask head: conv stack, spatial attention, 2x upsampling, class masks.

    ``X = (ReLU o conv3x3)^4(RoI)``, ``A_sag(X) = sigma(F_3x3([P_max; P_avg]))`` with P_max, P_avg
    the channel-wise max and mean maps (paper eq. 1, a 3x3 conv where CBAM uses 7x7),
    ``X_sag = A_sag(X) * X`` (eq. 2), then a 2x2 transposed conv of stride 2 with ReLU to 28 x 28
    and a 1x1 conv to one mask logit map per class. It takes RoI-Align features (14 x 14 in the
    paper) and returns mask logits at twice their side; a batch of zero RoIs passes through.

    Initialisation as the authors' code (Detectron2's mask head): MSRA (Kaiming-normal, fan_out)
    convs with zero biases, the mask predictor N(0, 0.001^2). The spatial-attention conv has no bias.

    Args:
        channels: C, the RoI feature channels (256 for an FPN).
        num_classes: K, one mask per class (80 for COCO; 1 for class-agnostic masks).
        conv_channels: D, the width of the four convs and the deconv; None: D = C (the paper's
            256 = C of its FPN features).
        num_convs: convs before the attention (paper: 4).
        kernel_size: the attention conv's size (paper: 3, not CBAM's 7). Odd.
        act_layer: activation after every conv and the deconv (ReLU).
        gate_layer: the attention gate (sigmoid).
        variant: ``"paper"`` (pooled maps in the order [max; mean], as eq. 1) or ``"official"``
            ([mean; max] as the authors' code, so its attention weights load here).

    Shape:
        - x: (B, C, H, W) RoI features (H = W = 14 in the paper).
        - output: (B, K, 2H, 2W) mask logits.
        - attention (``return_attn``): A_sag, (B, 1, H, W).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int = 80,
        conv_channels: int | None = None,
        num_convs: int = 4,
        kernel_size: int = 3,
        *,
        act_layer: LayerSpec = "relu",
        gate_layer: LayerSpec = "sigmoid",
        variant: Variant = "paper",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        conv_channels = channels if conv_channels is None else conv_channels
        for name, value in (
            ("channels", channels),
            ("num_classes", num_classes),
            ("conv_channels", conv_channels),
        ):
            if value <= 0:
                raise ValueError(f"{name}: expected a positive count, got {value}")
        if num_convs < 0:
            raise ValueError(f"num_convs: expected a count >= 0, got {num_convs}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd positive size, got {kernel_size}")
        check_variant(variant)
        self.channels, self.num_classes, self.variant = channels, num_classes, variant
        factory = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers.append(
                nn.Conv2d(channels if i == 0 else conv_channels, conv_channels, 3, padding=1, **factory)
            )
            layers.append(create_layer(act_layer, argument="act_layer"))
        self.convs = nn.Sequential(*layers)
        width = conv_channels if num_convs > 0 else channels
        self.attn_conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **factory)
        self.gate = create_layer(gate_layer, argument="gate_layer")
        self.deconv = nn.ConvTranspose2d(width, conv_channels, 2, stride=2, **factory)
        self.deconv_act = create_layer(act_layer, argument="act_layer")
        self.predictor = nn.Conv2d(conv_channels, num_classes, 1, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MSRA fill (Kaiming-normal, fan_out, zero bias) and a N(0, 0.001^2) mask predictor."""
        for layer in [*self.convs, self.attn_conv, self.deconv]:
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def attention(self, x: Tensor) -> Tensor:
        """A_sag(x), (B, 1, H, W), for features x (B, D, H, W) after the conv stack."""
        max_map = x.max(dim=1, keepdim=True).values  # (B, 1, H, W); max, not amax: faster backward
        mean_map = mean_of(x, 1, keepdim=True)  # (B, 1, H, W)
        # NOTE: the official code concatenates [mean; max]; the paper writes P_max . P_avg
        maps = [mean_map, max_map] if self.variant == "official" else [max_map, mean_map]
        return self.gate(self.attn_conv(torch.cat(maps, dim=1)))

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        features = self.convs(x)
        weights = self.attention(features)
        attended = features * weights
        masks = self.predictor(self.deconv_act(self.deconv(attended)))  # (B, K, 2H, 2W)
        return (masks, weights) if return_attn else masks
