"""GC block: global context block (simplified non-local pooling + SE-like transform).

Cao et al. 2019, "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
https://arxiv.org/abs/1904.11492.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_input, check_positive, parameter_dtype
from attnzoo._tracing import is_eager
from attnzoo.functional.softmax import masked_softmax, mean_of
from attnzoo.layers import LayerSpec, call_layer, create_layer, plain_layer, reduced_width
from attnzoo.registry import Paper, Sample, image_input, register

__all__ = ["GlobalContext"]

Pooling = Literal["att", "avg"]
Fusion = Literal["add", "scale", "scale_add"]
FUSIONS: tuple[str, ...] = ("add", "scale", "scale_add")


def _attention_pool(
    x: Tensor,
    key_weight: Tensor | None,
    *,
    logits: Tensor | None = None,
    float32_weights: bool = True,
) -> tuple[Tensor, Tensor]:
    """``sum_j alpha_j x_j`` with ``alpha = softmax_j(W_k x_j)``: (B, C) context, (B, HW) alpha.

    alpha is in float32 for half-precision inputs (the softmax's dtype; what the maps and the
    softmax backward need), the context in x's. Without ``float32_weights``, alpha is in x's
    dtype: the softmax kernels accumulate half-precision inputs in float32 (CPU and CUDA) and
    alpha meets x in x's dtype, so the context is the same, without the two casts (two of the 13
    operators of a small call).

    ``logits``, the (B, HW) ``W_k x_j`` computed by the caller (a key layer called as a module, so
    that its hooks run), replace the product on ``key_weight``, which is then unused.
    """
    flat = x.flatten(2)  # (B, C, H, W) -> (B, C, HW)
    if logits is None:
        # W_k x_j for every position, as a 1x1 conv: (B, C, H, W) -> (B, 1, H, W) -> (B, HW). NOTE:
        # not matmul(W_k, flat), which folds to one (B*HW, C) product and copies a transposed x first
        logits = F.conv2d(x, key_weight[:, :, None, None]).flatten(1)  # type: ignore[index]
    weights = masked_softmax(logits) if float32_weights else torch.softmax(logits, dim=-1)
    # (B, C, HW) @ (B, HW, 1) -> (B, C, 1) -> (B, C)
    context = torch.matmul(flat, weights.to(x.dtype).unsqueeze(-1)).squeeze(-1)
    return context, weights


class _AttentionPool(torch.autograd.Function):
    """:func:`_attention_pool` with a hand-written backward that writes x's gradient once.

    Autograd's backward of the plain operators gives x two full-size gradients of rank 1 per
    image, ``g_c alpha^T`` from the pooling product and ``W_k^T g_logits`` from the 1x1 conv,
    each a fresh buffer, and sums them with the block's residual gradient out of place (two more
    full-size buffers); its ``x^T g_c`` is a matrix-vector product on the transposed x, 14x
    slower here than the same sum read along x's rows. This backward forms the rank-2 gradient in
    one buffer (which autograd then accumulates the residual's gradient into, in place) and
    reads x along its rows in both reductions. It saves x, W_k and alpha, as autograd does.
    """

    generate_vmap_rule = True  # torch.func's vmap and grad compose with it (per-sample gradients)

    @staticmethod
    def forward(x: Tensor, key_weight: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return _attention_pool(x, key_weight)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        x, key_weight = inputs
        ctx.save_for_backward(x, key_weight, output[1])
        # an output nothing differentiates (alpha, unless the maps are trained on) gets None in the
        # backward, not a zero-filled gradient to allocate and add
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_context: Tensor | None, grad_weights: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        x, key_weight, weights = ctx.saved_tensors  # type: ignore[attr-defined]
        flat = x.flatten(2)  # (B, C, H, W) -> (B, C, HW)
        if grad_context is None:
            grad_context = x.new_zeros(x.shape[:2])
        # d loss / d alpha_j = g_c . x_j (+ the weights' own gradient): (B, 1, C) @ (B, C, HW) -> (B, HW)
        grad_alpha = torch.bmm(grad_context.unsqueeze(1), flat).squeeze(1).to(weights.dtype)
        if grad_weights is not None:
            grad_alpha = grad_alpha + grad_weights
        # softmax backward, in the softmax's dtype: alpha_j (g_j - sum_m alpha_m g_m)
        grad_logits = weights * (grad_alpha - (weights * grad_alpha).sum(-1, keepdim=True))  # (B, HW)
        grad_logits = grad_logits.to(x.dtype)
        grad_x = grad_key = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            # g_c alpha^T + W_k^T g_logits, rank 2 per image: (B, C, 2) @ (B, 2, HW) -> (B, C, HW)
            left = torch.stack([grad_context, key_weight.expand_as(grad_context)], -1)
            right = torch.stack([weights.to(x.dtype), grad_logits], 1)
            grad_x = torch.bmm(left, right).view_as(x)
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            # sum over images and positions of g_logits_j x_j: (B, C, HW) @ (B, HW, 1) -> (B, C, 1) -> (1, C)
            grad_key = torch.bmm(flat, grad_logits.unsqueeze(-1)).sum(0).t()
        return grad_x, grad_key


@register(
    "gc",
    placement="residual",
    map_kind="mixed",
    linear_memory=True,
    family="gating",
    paper=Paper("GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", "1904.11492"),
    equation="z_i = x_i + W_v2 relu(LN(W_v1 sum_j softmax_j(W_k x_j) x_j)), W_v1: C -> C/r, "
    "W_v2: C/r -> C, r = 16, W_v2 zero-initialised",
    make_kwargs=lambda s: {"channels": s.width},
    make_inputs=image_input,
    cost="time O(B C HW + B C^2 / r); memory O(B C HW) (no HW x HW map)",
    notes="fusion='scale' is the official code's multiplicative 'channel_mul' (x * sigmoid(.)); "
    "fusion='scale_add' both, each with its own transform (fusion_types=('channel_mul', "
    "'channel_add')); pooling='avg' replaces the attention pooling by global average pooling (the "
    "paper's ablation); layer_norm_eps sets the LayerNorm epsilon (timm's GlobalContext: 1e-6)",
    samples=(
        Sample("fusion=scale", {"fusion": "scale"}, description="official channel_mul"),
        Sample("fusion=scale_add", {"fusion": "scale_add"}, description="channel_mul and channel_add"),
        Sample("pooling=avg", {"pooling": "avg"}, description="global average pooling"),
        Sample("layer_norm=False", {"layer_norm": False}, description="no LayerNorm in the transform"),
        Sample("layer_norm_eps=1e-6", {"layer_norm_eps": 1e-6}, description="timm's LayerNorm epsilon"),
    ),
)
class GlobalContext(nn.Module):
    """Global context block: attention pooling to one context vector, a bottleneck transform, add.

    ``z_i = x_i + W_v2 ReLU(LN(W_v1 sum_j alpha_j x_j))`` with
    ``alpha_j = exp(W_k x_j) / sum_m exp(W_k x_m)`` (paper eq. 3): one softmax over all H*W
    positions (a single query-independent map, the simplified non-local block), then
    W_v1: C -> C/r, LayerNorm, ReLU, W_v2: C/r -> C (r = 16), and a broadcast addition to every
    position. W_v2 is zero-initialised so the block starts as the identity. In a ResNet it goes on
    the residual branch after the last 1x1 conv, before the addition.

    W_k has no bias: a constant added to every logit cancels in the softmax (the official code has
    one; it never receives a gradient). The pooling runs as one (C x HW) @ (HW x 1) product per
    image on the NCHW layout; it is not routed through :func:`attnzoo.functional.attend`, which
    would need a transposed (B, HW, C) copy of x for a single query (twice as slow here). The
    softmax runs in float32 for half-precision inputs.

    Args:
        channels: C.
        rd_ratio: 1/r, the transform's bottleneck ratio (paper: 1/16).
        rd_channels: the bottleneck width, overriding ``rd_ratio``.
        rd_divisor: round the bottleneck to a multiple of this (1 = floor of C/r).
        pooling: ``"att"`` (paper: softmax attention pooling) or ``"avg"`` (global average pooling,
            the paper's ablation / the official ``pooling_type='avg'``; no W_k).
        fusion: ``"add"`` (paper: z = x + transform), ``"scale"`` (the official code's
            ``channel_mul``: z = x * sigmoid(transform), SE-like) or ``"scale_add"`` (both, as the
            official ``fusion_types=('channel_mul', 'channel_add')``:
            z = x * sigmoid(T_scale(c)) + T_add(c), two transforms, both last layers zero-init;
            ``fc1``/``norm``/``fc2`` are T_add, ``scale_fc1``/``scale_norm``/``scale_fc2`` T_scale).
        layer_norm: the LayerNorm in the transform (paper: yes; it eases optimisation).
        layer_norm_eps: its epsilon (PyTorch's and the official code's 1e-5; timm uses 1e-6).
        act_layer: the transform's activation (default ReLU).
        bias: biases in W_v1 and W_v2 (the official 1x1 convs have them).

    Shape:
        - x: (B, C, H, W); output: the same.
        - attention (``return_attn``): ``{"position": alpha (B, 1, H, W), summing to 1 over H*W
          (uniform for ``pooling="avg"``), "channel": the transformed context (B, C, 1, 1), i.e.
          the added term for ``"add"`` and ``"scale_add"`` or the gate for ``"scale"``}``, and
          for ``"scale_add"`` also ``"gate"``, the scale's gate (B, C, 1, 1).
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        *,
        pooling: Pooling = "att",
        fusion: Fusion = "add",
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        act_layer: LayerSpec = "relu",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive(channels=channels)
        if pooling not in ("att", "avg"):
            raise ValueError(f"pooling: expected 'att' or 'avg', got {pooling!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion: expected one of {FUSIONS}, got {fusion!r}")
        if not layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps: expected a positive number, got {layer_norm_eps}")
        self.channels, self.pooling, self.fusion = channels, pooling, fusion
        width = reduced_width(channels, rd_ratio, rd_channels, rd_divisor)
        if layer_norm and width == 1 and rd_channels is None:
            # NOTE: LayerNorm over a single unit outputs its bias whatever the input (x - mean = 0),
            # which would cut the context off entirely; small C (C < 32 at r = 16) gets 2 units.
            width = 2
        self.rd_channels = width
        factory = {"device": device, "dtype": dtype}
        self.key = nn.Linear(channels, 1, bias=False, **factory) if pooling == "att" else None
        self.act = create_layer(act_layer, argument="act_layer")  # parameter-free: shared

        def norm() -> nn.Module:
            return nn.LayerNorm(width, eps=layer_norm_eps, **factory) if layer_norm else nn.Identity()

        self.fc1 = nn.Linear(channels, width, bias=bias, **factory)
        self.norm = norm()
        self.fc2 = nn.Linear(width, channels, bias=bias, **factory)
        self.scale_fc1 = self.scale_norm = self.scale_fc2 = None
        if fusion == "scale_add":
            self.scale_fc1 = nn.Linear(channels, width, bias=bias, **factory)
            self.scale_norm = norm()
            self.scale_fc2 = nn.Linear(width, channels, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: W_k Kaiming-normal (fan_in), W_v2 (weight and bias) zero."""
        if self.key is not None:
            nn.init.kaiming_normal_(self.key.weight, mode="fan_in", nonlinearity="relu")
        for fc1, norm, fc2 in self._transforms():
            fc1.reset_parameters()
            if isinstance(norm, nn.LayerNorm):
                norm.reset_parameters()
            nn.init.zeros_(fc2.weight)
            if fc2.bias is not None:
                nn.init.zeros_(fc2.bias)

    def _transforms(self) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
        layers = [(self.fc1, self.norm, self.fc2)]
        if self.scale_fc1 is not None:
            layers.append((self.scale_fc1, self.scale_norm, self.scale_fc2))
        return layers

    def pool(self, x: Tensor, *, maps: bool = True) -> tuple[Tensor, Tensor]:
        """The context vector sum_j alpha_j x_j, (B, C), and the pooling weights alpha, (B, HW):
        float32 for half-precision x where they are returned (``maps``) or differentiated. A key
        with hooks, or replaced by another module, runs as itself on the (B, HW, C) positions."""
        if self.key is None:
            flat = x.flatten(2)  # (B, C, H, W) -> (B, C, HW)
            context = mean_of(flat, -1)
            weights = torch.full_like(flat[:, 0], 1.0 / flat.shape[-1])  # (B, HW), uniform
            return context, weights
        if not plain_layer(self.key, nn.Linear):
            # a hooked or replaced key runs as itself (pruning's pre-hook recomputes its weight, an
            # adapter changes its output), and the pooling on plain autograd operators, which
            # differentiate whatever it computed: (B, C, H, W) -> (B, C, HW) -> (B, HW, C), a view
            positions = x.flatten(2).transpose(1, 2)
            logits = self.key(positions).squeeze(-1)  # (B, HW, 1) -> (B, HW)
            # float32 alpha where it is differentiated, as below; the key's own parameters may not
            # be a ``weight``, but whatever needs a gradient reaches the logits
            return _attention_pool(x, None, logits=logits, float32_weights=maps or logits.requires_grad)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.key.weight.requires_grad)
        if needs_grad and is_eager(x):
            # eager training: the hand-written backward (traced, compiled and exported graphs see
            # the plain operators)
            context, weights = _AttentionPool.apply(x, self.key.weight)
            return context, weights
        return _attention_pool(x, self.key.weight, float32_weights=maps or needs_grad)

    def transform(self, context: Tensor) -> Tensor:
        """W_v2 ReLU(LN(W_v1 c)), (B, C) -> (B, C) (for ``"scale_add"``: the added term)."""
        return call_layer(
            self.fc2, call_layer(self.act, call_layer(self.norm, call_layer(self.fc1, context)))
        )

    def scale_transform(self, context: Tensor) -> Tensor:
        """The scale's own transform of ``"scale_add"``, (B, C) -> (B, C)."""
        assert self.scale_fc1 is not None and self.scale_norm is not None and self.scale_fc2 is not None
        return call_layer(
            self.scale_fc2,
            call_layer(self.act, call_layer(self.scale_norm, call_layer(self.scale_fc1, context))),
        )

    def forward(self, x: Tensor, *, return_attn: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        check_input(x, "x", "B C H W", C=self.channels, dtype=parameter_dtype(self))
        context, weights = self.pool(x, maps=return_attn)
        batch, channels = context.shape
        term = self.transform(context).view(batch, channels, 1, 1)  # (B, C) -> (B, C, 1, 1)
        maps = {}
        if self.fusion == "add":
            out = x + term
        elif self.fusion == "scale":
            term = torch.sigmoid(term)
            out = x * term
        else:
            gate = torch.sigmoid(self.scale_transform(context)).view(batch, channels, 1, 1)
            out = torch.addcmul(term, x, gate)  # x * gate + term in one pass
            maps["gate"] = gate
        if return_attn:
            # (B, HW) -> (B, 1, H, W)
            position = weights.view(weights.shape[0], 1, *x.shape[2:])
            return out, {"position": position, "channel": term, **maps}
        return out
